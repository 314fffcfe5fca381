"""Causal self-attention kernels, chosen once per process.

Rows are right-padded (or packed with per-sample position ids in a later version), so a plain causal mask is
exact for every token that carries a label: a real token never attends to the padding that follows it.

``use_flash_attn: true`` picks the fastest exact kernel available: the ``flash_attn`` package when it is
importable on a CUDA device, otherwise torch SDPA restricted to its fused kernels (cuDNN, flash,
memory-efficient; whichever the device supports for the shape). ``false`` leaves the choice to torch SDPA's
default dispatcher, which on CPU is the math kernel.
"""
from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

FUSED_SDPA_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]


@dataclasses.dataclass(frozen=True)
class AttentionOptions:
    """How decoder layers compute attention; fixed for a run, handed to every family's attention module."""

    use_flash_attn: bool = False
    """Fastest exact kernel available (see the module docstring)."""


@functools.cache
def flash_attn_func():
    """The ``flash_attn`` package's kernel, or None where it is not installed."""
    try:
        from flash_attn import flash_attn_func as func
    except ImportError:
        return None
    return func


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: AttentionOptions,
                     position_ids: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Causal attention over ``[batch, heads, seq, head_dim]`` tensors; k and v may have fewer (grouped) heads.

    ``position_ids`` (``[batch, seq]``) are the rows' token positions; every family passes them so that packed
    rows (several samples per row, positions restarting at 0) can keep attention within each sample.
    Returns ``[batch, seq, heads, head_dim]`` so the caller can merge the heads without a transpose copy.
    """
    use_flash_attn = options.use_flash_attn
    n_heads, n_kv_heads = q.shape[1], k.shape[1]
    if use_flash_attn and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and flash_attn_func():
        # flash_attn takes [batch, seq, heads, dim] and handles grouped kv heads itself.
        return flash_attn_func()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
                                 softmax_scale=scale)
    if n_kv_heads != n_heads:
        k = k.repeat_interleave(n_heads // n_kv_heads, dim=1)
        v = v.repeat_interleave(n_heads // n_kv_heads, dim=1)
    if use_flash_attn and q.is_cuda:
        with sdpa_kernel(FUSED_SDPA_BACKENDS, set_priority=True):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    else:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return out.transpose(1, 2)
