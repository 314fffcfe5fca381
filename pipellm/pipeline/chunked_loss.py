"""The output projection and cross entropy of the last stage, a chunk of tokens at a time (``loss_chunk_tokens``).

Computed whole, a micro batch's logits take tokens x vocab x (2 bytes in bf16 + 4 for the fp32 copy the loss
reads + 4 for its gradient + 2 for the gradient in bf16): 12.6 GB for llama-7B's 32k vocabulary at 32k tokens.
Here only one chunk's logits exist at a time, in the forward and again in the backward, which recomputes them
(one more forward matmul of the head: the price of the memory).

Each chunk's loss and gradients are computed exactly as the whole-batch loss computes them for those rows (the
same operations, through autograd); only the weight gradient is a sum over chunks, accumulated in fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipellm.data import IGNORE_INDEX


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                reduction: str = "sum") -> torch.Tensor:
    # The whole-batch path's operations: logits in the weights' precision, the loss in fp32.
    logits = F.linear(hidden, weight)
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction=reduction)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """The sum over tokens (``reduction`` ``sum``) or each token's loss (``none``: 0 where not labelled)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_tokens, reduction="sum"):
        per_token = reduction == "none"
        total = torch.zeros(hidden.shape[0] if per_token else (), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            loss = _chunk_loss(hidden[rows], weight, targets[rows], reduction)
            if per_token:
                total[rows] = loss
            else:
                total += loss
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk_tokens, ctx.reduction = chunk_tokens, reduction
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, targets = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        for start in range(0, hidden.shape[0], ctx.chunk_tokens):
            rows = slice(start, start + ctx.chunk_tokens)
            with torch.enable_grad():
                chunk = hidden[rows].detach().requires_grad_(need_hidden)
                chunk_weight = weight.detach().requires_grad_(need_weight)
                loss = _chunk_loss(chunk, chunk_weight, targets[rows], ctx.reduction)
                inputs = [t for t, needed in ((chunk, need_hidden), (chunk_weight, need_weight)) if needed]
                grad_out = grad_total[rows] if ctx.reduction == "none" else grad_total
                grads = list(torch.autograd.grad(loss, inputs, grad_out))
            if need_hidden:
                grad_hidden[rows] = grads.pop(0)
            if need_weight:
                grad_weight += grads.pop(0)
        return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None, None


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 chunk_tokens: int) -> torch.Tensor:
    """Sum over labelled tokens (``targets != IGNORE_INDEX``) of ``cross_entropy(hidden @ weight.T, targets)``, in fp32.

    ``hidden``: (tokens, d); ``weight``: (vocab, d), a parameter or a tensor computed from one (autograd carries
    its gradient back); ``targets``: (tokens,).
    """
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk_tokens)


def chunked_linear_token_losses(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                chunk_tokens: int) -> torch.Tensor:
    """Each token's ``cross_entropy(hidden @ weight.T, targets)`` in fp32, ``(tokens,)``, 0 where not labelled
    (per-token log-probs for preference objectives)."""
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk_tokens, "none")


def liger_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """What ``chunked_linear_cross_entropy`` returns, by liger-kernel's fused linear + cross entropy
    (``speed.loss_kernel: liger``; CUDA only): it projects chunks of its own choosing, keeps the softmax in fp32
    and writes the input and weight gradients in the forward. The weight gradient is accumulated in fp32, as here.
    Compared with ``chunked_linear_cross_entropy`` by ``tests/test_speed_gpu.py`` (not run on a GPU yet)."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy(hidden, weight, targets, ignore_index=IGNORE_INDEX, reduction="sum",
                                            accum_dtype=torch.float32)
