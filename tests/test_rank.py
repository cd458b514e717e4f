"""Dimension metrics and the streamed spectrum against numpy SVD, scipy entropy and hand-worked cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import entropy

from qkrank.rank import SpectrumAccumulator, all_metrics, erank, pr, pr_cov, stable_rank, top_energy_share

RTOL = 1e-9


def _vectors(kind: str, n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """n × d vectors: Gaussian, rank 5, or with singular values spread over six decades, all with a mean."""
    if kind == "random":
        x = rng.standard_normal((n, d))
    elif kind == "low_rank":
        x = rng.standard_normal((n, 5)) @ rng.standard_normal((5, d))
    else:
        u, _ = np.linalg.qr(rng.standard_normal((n, d)))
        v, _ = np.linalg.qr(rng.standard_normal((d, d)))
        x = (u * np.logspace(0, -6, d)) @ v.T
    return x + 0.1 * np.abs(x).mean() * rng.standard_normal(d)


def _streamed(x: np.ndarray, chunk_sizes: list[int]) -> SpectrumAccumulator:
    """(heads, n, d) array added in chunks of the given sizes, cycling until every row is in."""
    acc, start, i = SpectrumAccumulator(), 0, 0
    while start < x.shape[-2]:
        size = chunk_sizes[i % len(chunk_sizes)]
        acc.add(torch.from_numpy(x[..., start : start + size, :]))
        start, i = start + size, i + 1
    return acc


def _brute_force_metrics(x: np.ndarray) -> dict[str, float]:
    """The four metrics straight from numpy's SVD and covariance, written independently of qkrank.rank."""
    sv = np.linalg.svd(x, compute_uv=False)
    eig = np.linalg.eigvalsh(np.cov(x, rowvar=False))
    return {"pr": np.linalg.norm(sv, 1) ** 2 / np.linalg.norm(sv) ** 2,
            "pr_cov": eig.sum() ** 2 / (eig**2).sum(),
            "erank": np.exp(entropy(sv / sv.sum())),
            "stable_rank": np.linalg.norm(x, "fro") ** 2 / np.linalg.norm(x, 2) ** 2}


@pytest.mark.parametrize("kind", ["random", "low_rank", "ill_conditioned"])
def test_streamed_spectra_and_metrics_match_numpy(kind):
    rng = np.random.default_rng(7)
    heads, n, d = 3, 1500, 32
    x = np.stack([_vectors(kind, n, d, rng) for _ in range(heads)])
    acc = _streamed(x, [1, 37, 400, 256])
    sv, eig = acc.singular_values(), acc.covariance_eigenvalues()
    assert sv.shape == eig.shape == (heads, d)
    metrics = all_metrics(sv, eig)
    for h in range(heads):
        ref_sv = np.linalg.svd(x[h], compute_uv=False)
        ref_eig = np.linalg.svd(x[h] - x[h].mean(0), compute_uv=False) ** 2 / (n - 1)
        if kind == "low_rank":
            # Beyond the rank (6 with the mean, 5 centered) both are rounding noise near 0: compare those
            # absolutely, on the scale of the largest value.
            assert ref_sv[6] < 1e-12 * ref_sv[0] and ref_eig[5] < 1e-24 * ref_eig[0]
            np.testing.assert_allclose(sv[h], ref_sv, rtol=RTOL, atol=RTOL * ref_sv[0])
            np.testing.assert_allclose(eig[h], ref_eig, rtol=RTOL, atol=RTOL * ref_eig[0])
        else:
            np.testing.assert_allclose(sv[h], ref_sv, rtol=RTOL)
            np.testing.assert_allclose(eig[h], ref_eig, rtol=RTOL)
        for name, value in _brute_force_metrics(x[h]).items():
            np.testing.assert_allclose(metrics[name][h], value, rtol=RTOL, err_msg=name)


def test_ill_conditioned_case_defeats_a_gram_matrix_but_not_the_qr_stream():
    """Why the accumulator streams a QR factor: σ from XᵀX lose ε·cond² relative accuracy, σ from R only ε·cond."""
    rng = np.random.default_rng(3)
    x = _vectors("ill_conditioned", 2000, 32, rng)
    ref = np.linalg.svd(x, compute_uv=False)
    assert ref[0] / ref[-1] > 1e5
    gram = np.sqrt(np.clip(np.linalg.eigvalsh(x.T @ x)[::-1], 0, None))
    assert np.max(np.abs(gram - ref) / ref) > 1e-7
    streamed = _streamed(x[None], [300]).singular_values()[0]
    assert np.max(np.abs(streamed - ref) / ref) < RTOL


def test_chunking_does_not_change_the_spectrum():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 600, 16)) + 3.0
    one = _streamed(x, [600])
    many = _streamed(x, [1, 2, 97])
    np.testing.assert_allclose(many.singular_values(), one.singular_values(), rtol=1e-12)
    np.testing.assert_allclose(many.covariance_eigenvalues(), one.covariance_eigenvalues(), rtol=1e-11)


def test_state_does_not_grow_with_the_number_of_vectors():
    acc = SpectrumAccumulator()
    rng = np.random.default_rng(0)
    for _ in range(20):
        acc.add(torch.from_numpy(rng.standard_normal((4, 512, 16))))
    assert acc.n == 20 * 512
    assert tuple(acc.r_centered.shape) == (4, 16, 16) and tuple(acc.mean.shape) == (4, 1, 16)


def test_fewer_vectors_than_dimensions_pads_with_zero():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 5, 16))
    acc = _streamed(x, [2])
    sv, eig = acc.singular_values()[0], acc.covariance_eigenvalues()[0]
    assert sv.shape == eig.shape == (16,)
    np.testing.assert_allclose(sv[:5], np.linalg.svd(x[0], compute_uv=False), rtol=RTOL)
    np.testing.assert_allclose(sv[5:], 0, atol=1e-12)
    assert np.all(eig[4:] < 1e-20)  # 5 centered vectors span at most 4 dimensions


def test_empty_accumulator_is_an_error():
    with pytest.raises(ValueError, match="no vectors"):
        SpectrumAccumulator().singular_values()


def test_known_vectors_give_known_spectra():
    # Rows 3·e1 and 1·e2 (and zero rows): σ = (3, 1, 0, 0). The set {±2e1, ±2e2}: mean 0, λ = (8/3, 8/3, 0).
    x = np.zeros((1, 4, 4))
    x[0, 0, 0], x[0, 1, 1] = 3.0, 1.0
    np.testing.assert_allclose(_streamed(x, [3]).singular_values()[0], [3, 1, 0, 0], atol=1e-14)
    pts = np.array([[[2.0, 0, 0], [-2, 0, 0], [0, 2, 0], [0, -2, 0]]])
    np.testing.assert_allclose(_streamed(pts, [1]).covariance_eigenvalues()[0], [8 / 3, 8 / 3, 0], atol=1e-14)


@pytest.mark.parametrize("d", [1, 7, 32])
def test_equal_singular_values_give_the_dimension(d):
    sv = np.full(d, 2.5)
    for metric in (pr, erank, stable_rank):
        np.testing.assert_allclose(metric(sv), d, rtol=1e-14)
    np.testing.assert_allclose(pr_cov(np.full(d, 0.3)), d, rtol=1e-14)


def test_one_nonzero_singular_value_gives_one():
    sv = np.array([4.0, 0, 0, 0])
    for metric in (pr, pr_cov, erank, stable_rank):
        assert metric(sv) == pytest.approx(1.0, rel=1e-14)


def test_hand_worked_values():
    sv = np.array([3.0, 1.0])
    assert pr(sv) == pytest.approx(16 / 10)  # (3+1)² / (9+1)
    assert stable_rank(sv) == pytest.approx(10 / 9)  # (9+1) / 9
    # p = (3/4, 1/4): exp(−(¾ ln ¾ + ¼ ln ¼)) = 4 / 3^(3/4)
    assert erank(sv) == pytest.approx(4 / 3**0.75)
    assert erank(np.array([1.0, 1.0, 0.0, 0.0])) == pytest.approx(2.0)
    assert pr_cov(np.array([2.0, 2.0, 0.0])) == pytest.approx(2.0)  # 16 / 8
    assert stable_rank(np.array([2.0, 1.0, 1.0])) == pytest.approx(6 / 4)


def test_metrics_work_per_head_on_the_last_axis():
    sv = np.array([[1.0, 1.0, 1.0], [5.0, 0.0, 0.0]])
    np.testing.assert_allclose(pr(sv), [3.0, 1.0])
    np.testing.assert_allclose(top_energy_share(sv, 0.34), [2 / 3, 1.0])  # ⌈0.34·3⌉ = 2 largest
    assert set(all_metrics(sv, sv**2)) == {"pr", "pr_cov", "erank", "stable_rank"}


def test_per_sequence_pr_matches_numpy_on_each_sequence():
    from qkrank.rank import per_sequence_pr

    rng = np.random.default_rng(3)
    heads, n_seq, seq_len, d = 3, 4, 40, 16
    x = rng.standard_normal((heads, n_seq * seq_len, d)) * rng.uniform(0.1, 3, size=d)
    got = per_sequence_pr(torch.from_numpy(x), seq_len)
    expected = [[pr(np.linalg.svd(x[h, s * seq_len:(s + 1) * seq_len], compute_uv=False)) for h in range(heads)]
                for s in range(n_seq)]
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    # n matters: PR of one isotropic sequence of 40 vectors in 16 dims is well below the pooled PR of 160
    iso = rng.standard_normal((1, 4000, 16))
    assert per_sequence_pr(torch.from_numpy(iso), 40).mean() < pr(np.linalg.svd(iso[0], compute_uv=False)) - 1
    with pytest.raises(ValueError, match="whole sequences"):
        per_sequence_pr(torch.from_numpy(x), 7)


def test_weight_spectra_split_rows_by_head_and_use_columns_as_vectors():
    from qkrank.rank import weight_spectra

    rng = np.random.default_rng(4)
    w = rng.standard_normal((2 * 8, 20))
    sv, eig = weight_spectra(torch.from_numpy(w), 2)
    for h in range(2):
        block = w[h * 8:(h + 1) * 8]
        np.testing.assert_allclose(sv[h], np.linalg.svd(block, compute_uv=False), rtol=1e-12)
        np.testing.assert_allclose(eig[h], np.sort(np.linalg.eigvalsh(np.cov(block)))[::-1], rtol=1e-10)
