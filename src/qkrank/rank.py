"""Dimension metrics of sets of vectors: pure maths on arrays, nothing of models or files.

Conventions: ``sv`` are the singular values σ of an (n × d) matrix X of vectors, uncentered (seed 004
§4.2); ``eig`` are the eigenvalues λ of the covariance of the mean-centered vectors. Every function works
on the last axis, so a (heads, d) array gives one value per head. docs/hdf5.md explains pr vs pr_cov.
"""

from __future__ import annotations

import math

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
    """Every metric of METRICS, each of shape sv.shape[:-1]."""
    return {"pr": pr(sv), "pr_cov": pr_cov(eig), "erank": erank(sv), "stable_rank": stable_rank(sv)}


def per_sequence_pr(vectors: torch.Tensor, seq_len: int) -> np.ndarray:
    """PR of each sequence alone: (heads, n_seq · seq_len, d) sequence-major vectors → (n_seq, heads).

    Each sequence's seq_len × d matrix gets its own uncentered σ and pr = (Σσ)² / Σσ², so n = seq_len.
    """
    heads, n_tokens, d = vectors.shape
    if n_tokens % seq_len:
        raise ValueError(f"per_sequence_pr: {n_tokens} vectors are not whole sequences of {seq_len}")
    x = vectors.detach().to(torch.float64).reshape(heads, n_tokens // seq_len, seq_len, d).transpose(0, 1)
    return pr(torch.linalg.svdvals(x).cpu().numpy())


def weight_spectra(weight: torch.Tensor, n_heads: int) -> tuple[np.ndarray, np.ndarray]:
    """σ and column-covariance λ of each head's block of a projection weight (n_heads · d, d_model).

    Head h's block W_h (d × d_model) maps the residual stream to its d-dimensional q or k, so its d_model
    columns are d-vectors, the weight's counterpart of the activation vectors: σ = σ(W_h) and λ are the
    eigenvalues of the covariance of the mean-centered columns (÷ (d_model − 1)). Both (n_heads, d).
    """
    rows, d_model = weight.shape
    if rows % n_heads:
        raise ValueError(f"weight_spectra: {rows} rows do not split into {n_heads} heads")
    columns = weight.detach().to(torch.float64).reshape(n_heads, rows // n_heads, d_model).transpose(1, 2)
    acc = SpectrumAccumulator()
    acc.add(columns)
    return acc.singular_values(), acc.covariance_eigenvalues()


def _svdvals_padded(r: torch.Tensor, dim: int) -> np.ndarray:
    """σ of a triangular factor, descending, zero-padded to ``dim`` when fewer than ``dim`` rows were seen."""
    sv = torch.linalg.svdvals(r).cpu().numpy()
    if sv.shape[-1] < dim:
        sv = np.concatenate([sv, np.zeros(sv.shape[:-1] + (dim - sv.shape[-1],))], axis=-1)
    return sv


class SpectrumAccumulator:
    """σ of raw vectors and λ of their covariance, streamed in chunks; memory O(heads·d²), not O(tokens).

    Keeps the count n, the mean μ and a triangular factor R of the centered vectors, (X−μ)ᵀ(X−μ) = RᵀR.
    A chunk B (n_b vectors, mean μ_b) merges exactly (Chan, Golub & LeVeque 1979):
    S = S_a + (B−μ_b)ᵀ(B−μ_b) + (n_a·n_b/n)(μ_a−μ_b)ᵀ(μ_a−μ_b), so R ← qr_R([R; B−μ_b; √(n_a·n_b/n)(μ_a−μ_b)]).
    Raw σ: XᵀX = S + n·μᵀμ, so σ(X) = σ(qr_R([R; √n·μ])); covariance λ = σ(R)² / (n−1).
    Every step adds rows, nothing is subtracted or squared, so σ keep a relative error ~ε·cond(X); a Gram
    matrix XᵀX would square the condition number (ε·cond²). Works in float64 on the vectors' device.
    """

    def __init__(self):
        self.n = 0
        self.mean: torch.Tensor | None = None  # (heads, 1, d)
        self.r_centered: torch.Tensor | None = None  # (heads, ≤d, d)

    def add(self, vectors: torch.Tensor) -> None:
        """Add a chunk of shape (heads, n_chunk, d)."""
        x = vectors.detach().to(torch.float64)
        n_b = x.shape[-2]
        if n_b == 0:
            return
        mean_b = x.mean(-2, keepdim=True)
        if self.n == 0:
            stacked, mean = x - mean_b, mean_b
        else:
            n = self.n + n_b
            bridge = math.sqrt(self.n * n_b / n) * (self.mean - mean_b)
            stacked = torch.cat([self.r_centered, x - mean_b, bridge], dim=-2)
            mean = self.mean + (mean_b - self.mean) * (n_b / n)
        self.r_centered = torch.linalg.qr(stacked, mode="r").R
        self.mean, self.n = mean, self.n + n_b

    def _require_data(self) -> None:
        if self.n == 0:
            raise ValueError("SpectrumAccumulator: no vectors were added")

    def singular_values(self) -> np.ndarray:
        """σ of all vectors added (uncentered), shape (heads, d), descending."""
        self._require_data()
        raw = torch.linalg.qr(torch.cat([self.r_centered, math.sqrt(self.n) * self.mean], dim=-2), mode="r").R
        return _svdvals_padded(raw, self.mean.shape[-1])

    def covariance_eigenvalues(self) -> np.ndarray:
        """λ of the (n−1)-normalised covariance of all vectors added, shape (heads, d), descending."""
        self._require_data()
        return _svdvals_padded(self.r_centered, self.mean.shape[-1]) ** 2 / max(1, self.n - 1)
