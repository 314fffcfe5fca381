"""Causal self-attention kernels, chosen once per process.

Rows are right-padded, so a plain causal mask is exact for every token that carries a label: a real token
never attends to the padding that follows it. Packed rows (``packing: true``) hold several samples whose
position ids restart at 0; with ``AttentionOptions.packed`` a query at position p of its sample sees only the
p keys before it in the row and itself, i.e. its own sample (key j is visible to query i iff
``i - position_ids[i] <= j <= i``). The mask is derived from the position ids, the only per-token tensor that
travels between pipeline stages, so no stage needs more than it already has.

``use_flash_attn: true`` picks the fastest exact kernel available: the ``flash_attn`` package when it is
importable on a CUDA device, otherwise torch SDPA restricted to its fused kernels (cuDNN, flash,
memory-efficient; whichever the device supports for the shape). ``false`` leaves the choice to torch SDPA's
default dispatcher, which on CPU is the math kernel.

Attention that needs a mask (packed rows, ALiBi) and is not served by ``flash_attn`` follows
``AttentionOptions.backend``: FlexAttention with a document block mask (``pipellm.models.flex_attention``: no
dense mask, fully masked blocks skipped) or SDPA with the dense mask. Unpacked rows without ALiBi always take
SDPA's causal fused path.
"""
from __future__ import annotations

import dataclasses
import functools
import weakref

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from pipellm.models.flex_attention import document_attention, uses_flex

FUSED_SDPA_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
SDPA_BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
"""``speed.sdpa_backend`` -> the one SDPA kernel it names."""


@dataclasses.dataclass(frozen=True)
class AttentionOptions:
    """How decoder layers compute attention; fixed for a run, handed to every family's attention module."""

    use_flash_attn: bool = False
    """Fastest exact kernel available (see the module docstring)."""
    packed: bool = False
    """Rows may hold several samples (positions restarting at 0): attention stays within each sample."""
    backend: str = "auto"
    """Attention that needs a mask (packed rows, ALiBi): ``flex`` (FlexAttention), ``sdpa`` (a dense mask) or
    ``auto`` (FlexAttention on CUDA, SDPA on CPU); see ``pipellm.models.flex_attention.uses_flex``."""
    sdpa_backend: str = "auto"
    """The one SDPA kernel on CUDA (``SDPA_BACKENDS``: ``speed.sdpa_backend``), or ``auto``: see ``sdpa_backends``."""


@functools.cache
def flash_attn_varlen_func():
    """The ``flash_attn`` package's variable-length kernel, or None where it is not installed."""
    try:
        from flash_attn import flash_attn_varlen_func as func
    except ImportError:
        return None
    return func


def sample_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """``[batch, 1, seq, seq]`` bool: query i sees key j iff j is in i's sample and not after i."""
    seq = position_ids.shape[-1]
    i = torch.arange(seq, device=position_ids.device)
    j = i[None, :]
    first = (i[None, :] - position_ids)[:, :, None]  # [batch, seq, 1]: where each query's sample starts
    return ((j <= i[:, None]) & (j >= first))[:, None]


_VARLEN_CACHE: list = [None]


def varlen_layout(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(cu_seqlens int32, max_seqlen)`` of the samples of flattened rows, for flash-attn's varlen kernel.

    Every layer of a stage receives the same ``position_ids`` tensor for a micro batch; the layout (which needs
    one device-to-host copy) is computed once per tensor.
    """
    cached = _VARLEN_CACHE[0]
    if cached is not None and cached[0]() is position_ids:
        return cached[1], cached[2]
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    cu_seqlens = torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    _VARLEN_CACHE[0] = (weakref.ref(position_ids), cu_seqlens, max_seqlen)
    return cu_seqlens, max_seqlen


@functools.cache
def flash_attn_func():
    """The ``flash_attn`` package's kernel, or None where it is not installed."""
    try:
        from flash_attn import flash_attn_func as func
    except ImportError:
        return None
    return func


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: AttentionOptions,
                     position_ids: torch.Tensor, scale: float | None = None,
                     alibi_slopes: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention over ``[batch, heads, seq, head_dim]`` tensors; k and v may have fewer (grouped) heads.

    ``position_ids`` (``[batch, seq]``) are the rows' token positions; every family passes them so that packed
    rows (several samples per row, positions restarting at 0) can keep attention within each sample.
    Returns ``[batch, seq, heads, head_dim]`` so the caller can merge the heads without a transpose copy.

    ``alibi_slopes`` (``[heads]``, fp32) adds ALiBi's bias ``slope * (key position - query position)`` to the
    scores (bloom, baichuan2-13b). That equals the references' ``slope * key position`` up to a per-query
    constant, which softmax ignores, and it is what ``flash_attn`` computes natively.
    """
    use_flash_attn = options.use_flash_attn
    n_heads, n_kv_heads = q.shape[1], k.shape[1]
    flash = use_flash_attn and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    if flash and options.packed and flash_attn_varlen_func():
        batch, _, seq, dim = q.shape
        cu_seqlens, max_seqlen = varlen_layout(position_ids)
        out = flash_attn_varlen_func()(q.transpose(1, 2).reshape(batch * seq, n_heads, dim),
                                       k.transpose(1, 2).reshape(batch * seq, n_kv_heads, dim),
                                       v.transpose(1, 2).reshape(batch * seq, n_kv_heads, v.shape[-1]),
                                       cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True,
                                       softmax_scale=scale, alibi_slopes=alibi_slopes)
        return out.view(batch, seq, n_heads, -1)
    if flash and not options.packed and flash_attn_func():
        # flash_attn takes [batch, seq, heads, dim] and handles grouped kv heads itself.
        return flash_attn_func()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
                                 softmax_scale=scale, alibi_slopes=alibi_slopes)
    if (options.packed or alibi_slopes is not None) and uses_flex(options.backend, q.device):
        return document_attention(q, k, v, position_ids, options.packed, scale, alibi_slopes).transpose(1, 2)
    if n_kv_heads != n_heads:
        k = k.repeat_interleave(n_heads // n_kv_heads, dim=1)
        v = v.repeat_interleave(n_heads // n_kv_heads, dim=1)
    if options.packed:
        kwargs = dict(attn_mask=sample_mask(position_ids), scale=scale)
    else:
        kwargs = dict(is_causal=True, scale=scale)
    if alibi_slopes is not None:
        kwargs = dict(attn_mask=alibi_mask(position_ids, alibi_slopes, q.dtype, options.packed), scale=scale)
    backends = sdpa_backends(options, q)
    if backends is None:
        out = F.scaled_dot_product_attention(q, k, v, **kwargs)
    else:
        with sdpa_kernel(backends, set_priority=True):
            out = F.scaled_dot_product_attention(q, k, v, **kwargs)
    return out.transpose(1, 2)


def sdpa_backends(options: AttentionOptions, q: torch.Tensor) -> list[SDPBackend] | None:
    """The SDPA kernels allowed on CUDA, in priority order: the one ``sdpa_backend`` names, else the fused ones
    with ``use_flash_attn``; None: torch's own choice (always on CPU)."""
    if not q.is_cuda:
        return None
    if options.sdpa_backend != "auto":
        return [SDPA_BACKENDS[options.sdpa_backend]]
    return FUSED_SDPA_BACKENDS if options.use_flash_attn else None


def alibi_mask(position_ids: torch.Tensor, alibi_slopes: torch.Tensor, dtype: torch.dtype,
               packed: bool) -> torch.Tensor:
    """``[batch, heads, seq, seq]`` additive mask for torch SDPA: the ALiBi bias where a key is visible (causal,
    and within the sample for packed rows), ``-inf`` elsewhere.

    SDPA takes no slopes, so the bias is materialised (which also rules out SDPA's flash kernel); ``flash_attn``
    avoids that where it is installed. The bias is relative, so it stays small and exact in bf16 at any length.
    """
    seq = position_ids.shape[-1]
    if packed:
        visible = sample_mask(position_ids)
    else:
        visible = torch.ones(seq, seq, dtype=torch.bool, device=position_ids.device).tril()
    distance = (position_ids[:, None, None, :] - position_ids[:, None, :, None]).to(torch.float32)
    bias = alibi_slopes.to(torch.float32)[None, :, None, None] * distance
    return bias.masked_fill(~visible, float("-inf")).to(dtype)
