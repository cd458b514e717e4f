"""The output head's loss without its logits: mean cross-entropy of ``hidden @ weightᵀ``, a chunk of rows at a
time (the ``fused`` switch; docs/training.md).

The plain head materialises (tokens × vocab) logits several times over: bf16 logits, their float32 copy,
log-softmax, and the same again in the backward pass; at 88m's 16 × 1024 tokens and GPT-2's 50,257-word
vocabulary each float32 copy is 3.3 GB. Here each chunk's logits live only while the chunk is processed: the
forward pass computes the loss and, when a gradient is wanted, the gradients of ``hidden`` and ``weight`` too
(the softmax minus the one-hot target is all they need), and the backward pass only scales them.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

# A chunk's float32 logits at most this big: memory stays flat in tokens, and the matmuls stay large.
CHUNK_BYTES = 256 * 2**20


def chunk_rows(vocab_size: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Rows per chunk so that one chunk's float32 logits fit in ``chunk_bytes``."""
    return max(1, chunk_bytes // (4 * vocab_size))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int,
                grad_enabled: bool) -> torch.Tensor:
        n = hidden.shape[0]
        # needs_input_grad follows requires_grad even under no_grad (validation): the caller's grad mode decides.
        wants_grad = grad_enabled and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        device_type = hidden.device.type
        # Under autocast the matmuls run in its dtype, as the plain head's would; softmax and sums in float32.
        low = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
        acc = torch.promote_types(torch.float32, hidden.dtype)  # softmax and sums: float32, or float64 if given
        h, w = hidden.to(low), weight.to(low)
        loss = torch.zeros((), dtype=acc, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if wants_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if wants_grad else None
        with torch.autocast(device_type, enabled=False):
            for start in range(0, n, rows):
                h_c, t_c = h[start:start + rows], targets[start:start + rows]
                logits = (h_c @ w.t()).to(acc)
                lse = torch.logsumexp(logits, dim=-1)
                loss += (lse - logits.gather(1, t_c[:, None]).squeeze(1)).sum()
                if wants_grad:
                    # d(mean loss)/d logits = (softmax − one-hot) / n, in place of the logits.
                    g = logits.sub_(lse[:, None]).exp_()
                    g[torch.arange(len(t_c), device=g.device), t_c] -= 1
                    g = g.div_(n).to(low)
                    grad_hidden[start:start + rows] = g @ w
                    grad_weight += (g.t() @ h_c).to(acc)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss / n

    @staticmethod
    @once_differentiable  # the gradients were computed in forward: they have no graph to differentiate again
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, (grad_weight * grad_loss).to(ctx.weight_dtype), None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         rows: int | None = None) -> torch.Tensor:
    """Mean over rows of cross_entropy(hidden @ weightᵀ, targets): hidden (n, d), weight (vocab, d), targets
    (n,) int64, every one a class (no ``ignore_index``: training never masks targets); ``rows`` per chunk
    (default: chunk_rows of the vocabulary). Equal to the plain head's loss and gradients up to rounding.
    Without grad mode (validation) it computes the loss only."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} "
                         f"are not (n, d) and (vocab, d)")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"linear_cross_entropy: targets {tuple(targets.shape)} do not match {hidden.shape[0]} rows")
    return _LinearCrossEntropy.apply(hidden, weight, targets, rows or chunk_rows(weight.shape[0]),
                                     torch.is_grad_enabled())
