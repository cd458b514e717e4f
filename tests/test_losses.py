"""The chunked head loss (train.fused) against the plain head: F.cross_entropy of materialised logits."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from qkrank.bench.steps import BENCH_OPTIM
from qkrank.losses import CHUNK_BYTES, chunk_rows, linear_cross_entropy
from qkrank.model import GPT, ModelConfig
from qkrank.optim import build_optimizers


def _inputs(n: int, d: int, vocab: int, dtype=torch.float64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen, dtype=dtype, requires_grad=True)
    weight = (torch.randn(vocab, d, generator=gen, dtype=dtype) * 0.5).requires_grad_()
    targets = torch.randint(0, vocab, (n,), generator=gen)
    return hidden, weight, targets


def _loss_and_grads(fn, hidden, weight, targets):
    hidden.grad = weight.grad = None
    loss = fn(hidden, weight, targets)
    (3 * loss).backward()  # a scale other than 1 reaches the saved gradients through backward
    return loss.detach(), hidden.grad / 3, weight.grad / 3


@pytest.mark.parametrize("rows", [1, 7, 40, 41, 1000])
def test_equals_cross_entropy_of_the_logits_in_float64_for_any_chunking(rows):
    hidden, weight, targets = _inputs(41, 6, 13)
    plain = _loss_and_grads(lambda h, w, t: F.cross_entropy(h @ w.t(), t), hidden, weight, targets)
    fused = _loss_and_grads(lambda h, w, t: linear_cross_entropy(h, w, t, rows), hidden, weight, targets)
    for got, expected in zip(fused, plain, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    assert fused[0].dtype == torch.float64


def test_gradients_pass_gradcheck():
    hidden, weight, targets = _inputs(12, 4, 9)
    assert torch.autograd.gradcheck(lambda h, w: linear_cross_entropy(h, w, targets, 5), (hidden, weight))


def test_under_bf16_autocast_it_matches_the_plain_heads_autocast_loss():
    hidden, weight, targets = _inputs(256, 32, 500, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = _loss_and_grads(lambda h, w, t: F.cross_entropy((h @ w.t()).float(), t), hidden, weight, targets)
        fused = _loss_and_grads(lambda h, w, t: linear_cross_entropy(h, w, t, 64), hidden, weight, targets)
    # Same bf16 logits, float32 softmax: the losses agree to float32 rounding; the gradients to bf16's (the
    # plain head rounds the weight's gradient to bf16 once, here each chunk's part is added in float32).
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-6, atol=1e-6)
    for got, expected in zip(fused[1:], plain[1:], strict=True):
        torch.testing.assert_close(got, expected, rtol=2e-2, atol=1e-2 * expected.abs().max().item())
    assert fused[1].dtype == fused[2].dtype == torch.float32  # gradients in the parameters' dtype


def test_without_gradients_it_computes_the_loss_only():
    hidden, weight, targets = _inputs(30, 4, 11)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, 4)
        expected = F.cross_entropy(hidden @ weight.t(), targets)
    assert not loss.requires_grad and loss.grad_fn is None
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)

    def matmul_flops(grad_mode: bool) -> int:
        with torch.set_grad_enabled(grad_mode), FlopCounterMode(display=False) as counter:
            linear_cross_entropy(hidden, weight, targets, 4)
        return counter.get_total_flops()

    logits = 2 * 30 * 4 * 11
    assert matmul_flops(False) == logits  # validation: the logits' product only
    assert matmul_flops(True) == 3 * logits  # training: also both gradients, in the same pass



def test_chunks_hold_at_most_chunk_bytes_of_float32_logits():
    assert chunk_rows(50257) == CHUNK_BYTES // (4 * 50257) == 1335
    assert chunk_rows(4096, chunk_bytes=4 * 4096 * 100) == 100
    assert chunk_rows(10**9) == 1  # a vocabulary too large for the budget still gets one row per chunk


@pytest.mark.parametrize("hidden_shape,weight_shape,targets_shape,match", [
    ((4, 3, 2), (5, 2), (4,), "not \\(n, d\\)"),
    ((4, 3), (5, 2), (4,), "not \\(n, d\\)"),
    ((4, 2), (5, 2), (3,), "targets \\(3,\\) do not match 4 rows"),
])
def test_bad_shapes_are_refused_by_name(hidden_shape, weight_shape, targets_shape, match):
    with pytest.raises(ValueError, match=match):
        linear_cross_entropy(torch.zeros(hidden_shape), torch.zeros(weight_shape),
                             torch.zeros(targets_shape, dtype=torch.long))


@pytest.mark.parametrize("mode", ["learned", "frozen", "none"])
def test_the_models_fused_loss_gives_the_plain_loss_and_gradients(mode):
    """float32, tied head: the loss and every parameter's gradient of one forward/backward."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=16,
                      norm_mode=mode)
    models = {"plain": GPT(cfg)}
    models["fused"] = copy.deepcopy(models["plain"])
    batch = torch.randint(0, cfg.vocab_size, (4, 17), generator=torch.Generator().manual_seed(1))
    losses = {}
    for name, model in models.items():
        logits, loss = model(batch[:, :-1], batch[:, 1:], fused_loss=name == "fused")
        assert (logits is None) is (name == "fused")  # the fused head makes no logits
        loss.backward()
        losses[name] = loss.item()
    assert losses["fused"] == pytest.approx(losses["plain"], rel=1e-6)
    fused = dict(models["fused"].named_parameters())
    for name, p in models["plain"].named_parameters():
        torch.testing.assert_close(fused[name].grad, p.grad, rtol=1e-4, atol=1e-4 * p.grad.abs().max().item(),
                                   msg=name)


def test_the_fused_loss_compiles_into_one_graph_with_the_eager_result():
    """torch.compile (train.compile) traces the autograd Function whole; aot_eager needs no C compiler."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=61, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32,
                            max_seq_len=8)).double()
    batch = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(3))
    results = []
    for forward in (model, torch.compile(model, backend="aot_eager", fullgraph=True)):
        model.zero_grad(set_to_none=True)
        _, loss = forward(batch[:, :-1], batch[:, 1:], fused_loss=True)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-12, atol=0)
    for compiled, eager in zip(results[1][1], results[0][1], strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-10, atol=1e-12)


def test_fused_adamw_takes_the_steps_of_the_default_adamw():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32,
                            max_seq_len=8))
    copies = {fused: copy.deepcopy(model) for fused in (False, True)}
    optimizers = {fused: build_optimizers(m, "muon", BENCH_OPTIM, fused=fused) for fused, m in copies.items()}
    assert optimizers[True]["adamw"].defaults["fused"] and not optimizers[False]["adamw"].defaults["fused"]
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        grads = {name: torch.randn(p.shape, generator=gen) for name, p in model.named_parameters()}
        for fused, m in copies.items():
            for name, p in m.named_parameters():
                p.grad = grads[name].clone()
            for opt in optimizers[fused].values():
                opt.step()
    plain = dict(copies[False].named_parameters())
    for name, p in copies[True].named_parameters():
        torch.testing.assert_close(p, plain[name], rtol=1e-6, atol=1e-7, msg=name)
