"""The elementwise kernels of llama-style blocks (RMSNorm, SwiGLU, rotary), and liger-kernel's Triton ones.

llama's modules (and the families built from them: mixtral, baichuan2, chatglm3) call their kernel through an
attribute (``RMSNorm.norm_kernel``, ``LlamaMLP.swiglu_kernel``, ``LlamaAttention.rotary_kernel``) whose default is
the torch function here. ``speed.liger_kernels`` (``pipellm.config.schema.Speed``) sets, on every module of a stage
that has one of these attributes, liger-kernel's function instead (``LIGER``): a table, so a family opts in by
naming its attribute the same. The model files hold the torch definitions; liger is imported only when asked for.

Both compute the same function; they differ by rounding only (liger keeps fp32 inside a fused kernel where torch
rounds each step to the activations' precision): ``tests/test_speed_gpu.py`` compares them on a GPU (not run yet).
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

from pipellm.config.speed_checks import liger_levers
from pipellm.errors import PipellmError


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise in fp32 and cast back before the scale, as transformers' llama does."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


@torch.library.custom_op("pipellm::rotary_cos_sin", mutates_args=())
def rotary_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, scaling: float,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the angles ``position_ids[..., None] * inv_freq`` (in fp32), times ``scaling``, in ``dtype``:
    ``[*position_ids.shape, len(inv_freq)]``.

    An opaque op, so that a compiled layer computes these small tables once. Left to inductor, their computation is
    fused into the rotary kernel, which then evaluates cos and sin again for every element of the queries and keys
    (every head): on an H100 that kernel ran at a fifth of the memory bandwidth, and the stage trains 2% faster
    without it (``benchmarks/results/rotary_tables_h100/``). The values are eager torch's, compiled or not."""
    angles = position_ids[..., None].float() * inv_freq
    return (angles.cos() * scaling).to(dtype), (angles.sin() * scaling).to(dtype)


@rotary_cos_sin.register_fake
def _(position_ids, inv_freq, scaling, dtype):
    shape = (*position_ids.shape, inv_freq.shape[0])
    return position_ids.new_empty(shape, dtype=dtype), position_ids.new_empty(shape, dtype=dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
           sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of ``[batch, heads, seq, head_dim]`` queries and keys; ``cos``/``sin``: ``[batch, seq,
    head_dim]``, each half the same (transformers' layout, which liger's kernel relies on)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def liger_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    from liger_kernel.transformers.functional import liger_rms_norm as kernel

    # casting_mode "llama": fp32 statistics, cast to x's dtype before the weight, as ``rms_norm``.
    return kernel(x, weight, eps, 0.0, "llama", False)


def liger_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    from liger_kernel.transformers.functional import liger_swiglu as kernel

    return kernel(gate, up)


def liger_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from liger_kernel.transformers.functional import liger_rope as kernel

    return kernel(q, k, cos, sin)


LIGER = {"norm_kernel": liger_rms_norm, "swiglu_kernel": liger_swiglu, "rotary_kernel": liger_rotary}
"""Kernel attribute of a module -> liger-kernel's function for it."""


def use_liger_kernels(model: nn.Module) -> int:
    """Point every kernel attribute of ``model``'s modules named in ``LIGER`` at liger's function; returns how
    many were set (0: the stage has no llama-style block)."""
    count = 0
    for module in model.modules():
        for attribute, kernel in LIGER.items():
            if hasattr(module, attribute):
                setattr(module, attribute, kernel)
                count += 1
    return count


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def check_liger_environment(cfg) -> None:
    """One line naming the key when a liger lever of ``speed`` cannot run here (before any process group exists);
    conflicts with other keys are ``pipellm.config.speed_checks.check_speed``'s."""
    for key in liger_levers(cfg.speed):
        if not torch.cuda.is_available():
            raise PipellmError(f"{cfg.source}: `{key}` runs Triton kernels on CUDA only; turn it off on this machine")
        if not liger_available():
            raise PipellmError(f"{cfg.source}: `{key}` needs liger-kernel: pip install 'pipellm[liger]' "
                               f"(or turn it off)")
