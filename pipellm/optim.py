"""The optimizer, built by pipellm from the YAML's DeepSpeed-style ``optimizer`` block.

Building it here rather than letting DeepSpeed do it keeps DeepSpeed from JIT-compiling its fused Adam, uses
torch's fused AdamW kernel on GPUs, adds Lion, and keeps biases and norm weights out of weight decay.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from pipellm.errors import PipellmError

DEFAULT_OPTIMIZER = {"type": "AdamW", "params": {"lr": 2e-5, "weight_decay": 0.0}}


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: one-dimensional parameters (biases, norm weights) get no weight decay."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            # A ZeRO-3 partitioned parameter's own tensor is an empty slice; ds_shape is the real shape.
            (decay if len(getattr(param, "ds_shape", param.shape)) >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, spec: dict | None) -> torch.optim.Optimizer:
    spec = spec or DEFAULT_OPTIMIZER
    kind = str(spec.get("type", "")).lower()
    params = dict(spec.get("params", {}))
    groups = parameter_groups(model, params.pop("weight_decay", 0.0))
    if kind in ("adamw", "adam"):
        on_gpu = any(p.is_cuda for group in groups for p in group["params"])
        params.pop("torch_adam", None)
        params.pop("adam_w_mode", None)
        return torch.optim.AdamW(groups, fused=on_gpu or None, **params)
    if kind == "lion":
        from lion_pytorch import Lion
        return Lion(groups, **params)
    raise PipellmError(f"`optimizer.type` {spec.get('type')!r} is not supported; use AdamW or Lion")


def record_grad_norm(optimizer: torch.optim.Optimizer, model: nn.Module, group, max_norm: float) -> None:
    """For plain fp32 training: compute the global gradient norm (and clip to ``max_norm`` when > 0) right
    before each optimizer step, as DeepSpeed's bf16/fp16/ZeRO optimizers do internally. The engine reads the
    norm from ``optimizer._global_grad_norm``.

    Each stage sums its own gradients' squares; a tied weight's copy on a later stage
    (``ds_pipe_replicated``) is counted once. The pipeline group then sums the stages' shares.
    """
    params = [p for p in model.parameters() if p.requires_grad and not getattr(p, "ds_pipe_replicated", False)]
    clipped = [p for p in model.parameters() if p.requires_grad]

    def pre_step(opt, args, kwargs):
        squares = torch.zeros((), dtype=torch.float32, device=params[0].device if params else "cpu")
        for p in params:
            if p.grad is not None:
                squares += p.grad.detach().float().pow(2).sum()
        dist.all_reduce(squares, group=group)
        norm = squares.sqrt()
        if max_norm > 0:
            coefficient = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for p in clipped:
                if p.grad is not None:
                    p.grad.mul_(coefficient.to(p.grad.dtype))
        opt._global_grad_norm = float(norm)

    optimizer.register_step_pre_hook(pre_step)
