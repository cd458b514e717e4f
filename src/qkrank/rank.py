"""Dimension metrics of sets of vectors: pure maths on arrays, nothing of models or files.

Conventions: ``sv`` are the singular values σ of an (n × d) matrix of vectors (uncentered, as in
seed 004 §4.2); ``eig`` are the eigenvalues λ of the covariance of the mean-centered vectors.
Every function works on the last axis, so a (heads, d) array gives one value per head.
"""

from __future__ import annotations

import numpy as np
import torch

METRICS = ("pr", "pr_cov", "erank", "stable_rank")


def pr(sv: np.ndarray) -> np.ndarray:
    """Participation ratio of singular values (the seeds' PR): (Σσ)² / Σσ². Equal σ → d; one σ → 1."""
    sv = np.asarray(sv, dtype=np.float64)
    return sv.sum(-1) ** 2 / (sv**2).sum(-1)


def pr_cov(eig: np.ndarray) -> np.ndarray:
    """Participation ratio of covariance eigenvalues (Gao et al. 2017): (Σλ)² / Σλ², on centered vectors."""
    eig = np.asarray(eig, dtype=np.float64)
    return eig.sum(-1) ** 2 / (eig**2).sum(-1)


def erank(sv: np.ndarray) -> np.ndarray:
    """Entropy effective rank (Roy & Vetterli 2007): exp(−Σ pᵢ log pᵢ), pᵢ = σᵢ / Σσ (0 log 0 = 0)."""
    sv = np.asarray(sv, dtype=np.float64)
    p = sv / sv.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p), 0.0)
    return np.exp(-terms.sum(-1))


def stable_rank(sv: np.ndarray) -> np.ndarray:
    """Stable rank: Σσ² / σ_max²."""
    sv = np.asarray(sv, dtype=np.float64)
    return (sv**2).sum(-1) / sv.max(-1) ** 2


def top_energy_share(sv: np.ndarray, fraction: float) -> np.ndarray:
    """Share of Σσ² carried by the largest ⌈fraction·d⌉ singular values (spectral concentration)."""
    sv = np.sort(np.asarray(sv, dtype=np.float64), axis=-1)[..., ::-1]
    k = max(1, int(np.ceil(fraction * sv.shape[-1])))
    energy = sv**2
    return energy[..., :k].sum(-1) / energy.sum(-1)


def all_metrics(sv: np.ndarray, eig: np.ndarray) -> dict[str, np.ndarray]:
    return {"pr": pr(sv), "pr_cov": pr_cov(eig), "erank": erank(sv), "stable_rank": stable_rank(sv)}


class SpectrumAccumulator:
    """Singular values and covariance eigenvalues of vectors streamed in chunks, memory O(heads·d²).

    Keeps the triangular factor R of a running QR decomposition (XᵀX = RᵀR), so σ(X) = σ(R) without
    squaring the condition number as a Gram matrix would; a second R of the vectors minus a fixed shift
    (the first chunk's mean) gives the covariance without cancellation. Works in float64.
    """

    def __init__(self):
        self.r_raw: torch.Tensor | None = None
        self.r_shifted: torch.Tensor | None = None
        self.shift: torch.Tensor | None = None
        self.sum_shifted: torch.Tensor | None = None
        self.n = 0

    @staticmethod
    def _update(r: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        stacked = x if r is None else torch.cat([r, x], dim=-2)
        return torch.linalg.qr(stacked, mode="r").R

    def add(self, vectors: torch.Tensor) -> None:
        """Add a chunk of shape (heads, n_chunk, d)."""
        x = vectors.detach().to("cpu", torch.float64)
        if self.shift is None:
            self.shift = x.mean(-2, keepdim=True)
            self.sum_shifted = torch.zeros_like(self.shift)
        xs = x - self.shift
        self.r_raw = self._update(self.r_raw, x)
        self.r_shifted = self._update(self.r_shifted, xs)
        self.sum_shifted += xs.sum(-2, keepdim=True)
        self.n += x.shape[-2]

    def singular_values(self) -> np.ndarray:
        """σ of all vectors added, shape (heads, d), descending."""
        return torch.linalg.svdvals(self.r_raw).numpy()

    def covariance_eigenvalues(self) -> np.ndarray:
        """λ of the (n−1)-normalised covariance, shape (heads, d), descending, clipped at 0."""
        delta = self.sum_shifted / self.n
        gram = self.r_shifted.transpose(-1, -2) @ self.r_shifted
        cov = (gram - self.n * delta.transpose(-1, -2) @ delta) / max(1, self.n - 1)
        eig = torch.linalg.eigvalsh(cov).flip(-1).clamp_min(0)
        return eig.numpy()
