"""How parameters are updated: the optimizer, its weight-decay groups, the learning-rate schedule, and what happens
to a step whose gradients are not finite.

* **Optimizer.** Built by pipellm from the YAML's DeepSpeed-style ``optimizer`` block and handed to
  ``deepspeed.initialize``, so DeepSpeed never builds one of its own: no JIT-compiled op (FusedAdam, CPUAdam) at
  start-up on any machine. AdamW is torch's fused kernel, on GPUs and on the CPU alike (ZeRO-Offload steps it on
  the CPU copy of the fp32 weights); Lion comes from ``lion-pytorch``.
* **Weight decay** applies to every parameter except those whose Hugging Face checkpoint name matches one of the
  ``no_weight_decay`` regular expressions (default: biases and norm weights).
* **Schedule** (``lr_schedule``): linear warmup, then constant, linear or cosine decay to ``min_lr_ratio`` of the
  peak at the run's last step; a torch ``LambdaLR`` given to DeepSpeed, so its position is in every checkpoint.
* **Non-finite steps.** The decision to skip a step is taken from the global gradient norm, which every rank
  computes from the same all-reduced sum, so all stages and replicas skip together. In bf16, fp16 and ZeRO runs
  DeepSpeed's optimizer wrapper computes that norm, clips and skips (fp16 also lowers its loss scale); in plain
  fp32 ``FiniteStepGuard`` does the same. A skipped step leaves weights, optimizer state and the schedule as they
  were. ``NonFiniteRun`` counts them in a row for the training loop.
"""
from __future__ import annotations

import functools
import math
import re

import torch
import torch.distributed as dist
from torch import nn

from pipellm.config import DeepSpeedSettings, LRSchedule
from pipellm.errors import PipellmError

DEFAULT_OPTIMIZER = {"type": "AdamW", "params": {"lr": 2e-5, "weight_decay": 0.0}}


def parameter_groups(named_parameters, weight_decay: float, no_weight_decay: list[str]) -> list[dict]:
    """A decayed group and a group without weight decay (names matching a ``no_weight_decay`` pattern); a group
    with no parameters is left out (DeepSpeed drops empty groups, and the schedule must see the same groups)."""
    patterns = [re.compile(p) for p in no_weight_decay]
    decay, no_decay = [], []
    for name, param in named_parameters:
        if param.requires_grad:
            (no_decay if any(p.search(name) for p in patterns) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def optimizer_class(spec: dict | None) -> type[torch.optim.Optimizer]:
    if str((spec or DEFAULT_OPTIMIZER).get("type")).lower() == "lion":
        from lion_pytorch import Lion
        return Lion
    return torch.optim.AdamW


def build_optimizer(named_parameters, spec: dict | None, no_weight_decay: list[str],
                    optimizer_type: type[torch.optim.Optimizer] | None = None) -> torch.optim.Optimizer:
    """The optimizer of ``spec`` (``{"type": "AdamW" | "Adam" | "Lion", "params": {...}}``, checked by the
    config). ``optimizer_type`` replaces the class (``guarded(optimizer_class(spec))`` for plain fp32)."""
    spec = spec or DEFAULT_OPTIMIZER
    params = dict(spec.get("params", {}))
    groups = parameter_groups(named_parameters, params.pop("weight_decay", 0.0), no_weight_decay)
    cls = optimizer_type or optimizer_class(spec)
    if issubclass(cls, torch.optim.AdamW):
        # DeepSpeed's own Adam options, meaningless for torch's AdamW (which always decouples weight decay).
        params.pop("torch_adam", None)
        params.pop("adam_w_mode", None)
        # One pass over weights, gradients and moments per step, on CUDA and CPU tensors alike (ZeRO-Offload's
        # CPU partition included), with nothing to compile.
        params.setdefault("fused", True)
    return cls(groups, **params)


class FiniteStepGuard:
    """Mixin for a torch optimizer in plain fp32 pipeline training, doing what DeepSpeed's bf16/fp16/ZeRO
    wrappers do there: before each step, the global gradient norm; a non-finite norm skips the step (``overflow``
    tells the engine, which then leaves the schedule alone and counts it in ``skipped_steps``); otherwise the
    gradients are clipped to ``max_norm`` (when > 0) and the step taken. The engine reads the norm where
    ``deepspeed_compat.report_grad_norm`` puts it.

    Each stage sums its own gradients' squares, a tied weight's copy on a later stage (``ds_pipe_replicated``)
    once; the pipeline group sums the stages' shares. Data-parallel replicas hold the same all-reduced gradients,
    so every rank of the world computes the same norm and takes the same decision.
    """

    def attach(self, model: nn.Module, group, max_norm: float) -> None:
        from pipellm.pipeline.deepspeed_compat import is_pipeline_replicated

        self.guard_norm_params = [p for p in model.parameters()
                                  if p.requires_grad and not is_pipeline_replicated(p)]
        self.guard_clip_params = [p for p in model.parameters() if p.requires_grad]
        self.guard_group = group
        self.guard_max_norm = max_norm
        self.overflow = False

    def step(self, closure=None):
        from pipellm.pipeline.deepspeed_compat import report_grad_norm

        squares = torch.zeros((), dtype=torch.float32, device=self.guard_clip_params[0].device)
        for p in self.guard_norm_params:
            if p.grad is not None:
                squares += p.grad.detach().float().pow(2).sum()
        dist.all_reduce(squares, group=self.guard_group)
        norm = squares.sqrt()
        report_grad_norm(self, float(norm))
        self.overflow = not math.isfinite(float(norm))
        if self.overflow:
            return None
        if self.guard_max_norm > 0:
            coefficient = torch.clamp(self.guard_max_norm / (norm + 1e-6), max=1.0)
            for p in self.guard_clip_params:
                if p.grad is not None:
                    p.grad.mul_(coefficient.to(p.grad.dtype))
        return super().step(closure)


@functools.cache
def guarded(cls: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """``cls`` with ``FiniteStepGuard``'s step; named like ``cls`` (its state dict is ``cls``'s)."""
    return type(cls.__name__, (FiniteStepGuard, cls), {"__module__": cls.__module__})


def uses_deepspeed_step_wrapper(ds_config: dict) -> bool:
    """bf16, fp16 or ZeRO: DeepSpeed wraps the optimizer, and its wrapper computes the global gradient norm,
    clips by ``gradient_clipping`` and skips non-finite steps. Otherwise pipellm's ``FiniteStepGuard`` does."""
    settings = DeepSpeedSettings.of(ds_config)
    return settings.low_precision or settings.zero_stage > 0


def zero_settings(ds_config: dict) -> dict:
    """DeepSpeed keys that let ZeRO step pipellm's torch optimizer (stage 1 in the pipeline, 3 in the baseline).

    Lion is not on DeepSpeed's list of optimizers tested with ZeRO, hence ``zero_allow_untested_optimizer`` (ZeRO
    steps any torch optimizer on its flat fp32 partitions). With ``offload_optimizer`` DeepSpeed refuses a client
    optimizer unless ``zero_force_ds_cpu_optimizer`` is false: it wants its ``DeepSpeedCPUAdam``, a C++ op
    JIT-compiled on first use. torch's fused CPU AdamW makes the same single pass over the partition's weights,
    gradients and moments with nothing to build."""
    settings = DeepSpeedSettings.of(ds_config)
    if not settings.zero_stage:
        return {}
    offload = settings.offload_optimizer != "none"
    return {"zero_allow_untested_optimizer": True, **({"zero_force_ds_cpu_optimizer": False} if offload else {})}


def deepspeed_optimizer(model: nn.Module, named_parameters, ds_config: dict, no_weight_decay: list[str],
                        schedule: LRSchedule, total_steps: int):
    """``(optimizer, lr_scheduler, ds_config)`` for ``deepspeed.initialize`` of either engine: the YAML's
    ``optimizer`` built here (and taken out of the DeepSpeed config), guarded in plain fp32 (a pipeline stage
    only: ZeRO-3 always wraps it), the ZeRO keys added, and pipellm's schedule unless the YAML has DeepSpeed's
    ``scheduler`` (the config allows one or the other)."""
    from deepspeed.runtime.constants import GRADIENT_CLIPPING_DEFAULT

    ds_config = dict(ds_config, **zero_settings(ds_config))
    spec = ds_config.pop("optimizer", None)
    if uses_deepspeed_step_wrapper(ds_config):
        optimizer = build_optimizer(named_parameters, spec, no_weight_decay)
    else:
        optimizer = build_optimizer(named_parameters, spec, no_weight_decay, guarded(optimizer_class(spec)))
        optimizer.attach(model, model.pipe_parallel_group,
                         float(ds_config.get("gradient_clipping", GRADIENT_CLIPPING_DEFAULT)))
        ds_config["gradient_clipping"] = 0.0  # clipped by the guard; DeepSpeed would clip (again) otherwise
    lr_scheduler = None if "scheduler" in ds_config else build_lr_scheduler(optimizer, total_steps, schedule)
    return optimizer, lr_scheduler, ds_config


def lr_factor(step: int, total_steps: int, schedule: LRSchedule) -> float:
    """The learning rate of optimizer step ``step`` (0-based) as a share of the peak.

    Warmup: step s < W trains at (s + 1) / W. Then the decay steps W .. T-1 run from 1 down to ``min_lr_ratio``,
    which the run's last step (T - 1) reaches exactly: progress p = (s - W) / (T - 1 - W) (1 when W = T - 1),
    ``linear``: r + (1 - r)(1 - p), ``cosine``: r + (1 - r)(1 + cos(pi p)) / 2, ``constant``: 1.
    """
    warmup = schedule.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if schedule.decay == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / (total_steps - 1 - warmup)) if total_steps - 1 > warmup else 1.0
    shape = 1.0 - progress if schedule.decay == "linear" else (1.0 + math.cos(math.pi * progress)) / 2
    return schedule.min_lr_ratio + (1.0 - schedule.min_lr_ratio) * shape


def build_lr_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, schedule: LRSchedule):
    """``lr_schedule`` as a torch scheduler for ``deepspeed.initialize(lr_scheduler=...)``: DeepSpeed steps it
    after each applied optimizer step (not after a skipped one) and saves its position in checkpoints."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_factor, total_steps=total_steps,
                                                                          schedule=schedule))


class NonFiniteRun:
    """Steps in a row that the optimizer skipped for non-finite gradients or whose loss was not finite.

    With fp16's dynamic loss scaling an overflowing step is routine (the scaler skips it and halves the scale),
    so there only a non-finite loss counts; DeepSpeed itself stops the run if the scale falls to its minimum.
    """

    def __init__(self, limit: int, loss_scaling: bool):
        self.limit = limit
        self.loss_scaling = loss_scaling
        self.steps: list[int] = []

    def record(self, step: int, loss: float, skipped: bool) -> str | None:
        """Account for step ``step`` (1-based); returns the warning line to print, if any."""
        finite_loss = math.isfinite(loss)
        if finite_loss and (not skipped or self.loss_scaling):
            self.steps = []
            return (f"pipellm: step {step} skipped: fp16 gradient overflow; the loss scale is lowered (not counted "
                    f"toward max_nonfinite_steps)") if skipped else None
        self.steps.append(step)
        what = "gradients" if finite_loss else "loss"
        action = "skipped" if skipped else "applied (its gradients were finite)"
        return (f"pipellm: warning: step {step}: non-finite {what}, optimizer step {action}; "
                f"{len(self.steps)} of max_nonfinite_steps={self.limit} in a row")

    @property
    def exhausted(self) -> bool:
        return len(self.steps) >= self.limit

    def stop_message(self, checkpoint) -> str:
        return (f"steps {self.steps[0]}-{self.steps[-1]}: {len(self.steps)} steps in a row with a non-finite loss "
                f"or gradients (max_nonfinite_steps={self.limit}); stopped after saving {checkpoint} (the "
                f"weights before them). Lower the learning rate, check the data, or raise max_nonfinite_steps")


def check_pipeline_settings(ds_config: dict) -> None:
    """What DeepSpeed's pipeline engine accepts of ZeRO and precision, checked before any process group (DeepSpeed
    itself fails later, on every rank, with an assertion or a ValueError)."""
    from deepspeed.accelerator import get_accelerator

    settings = DeepSpeedSettings.of(ds_config)
    stage = settings.zero_stage
    if stage not in (0, 1):
        raise PipellmError(f"`zero_optimization.stage` {stage!r}: pipeline parallelism works with ZeRO stage 0 or 1 "
                           f"(DeepSpeed's pipeline engine cannot shard gradients or weights); use 1, optionally "
                           f"with `offload_optimizer: {{device: cpu}}`")
    if settings.offload_param != "none":
        raise PipellmError("`zero_optimization.offload_param` needs ZeRO-3, which pipeline parallelism cannot use; "
                           "remove it (`offload_optimizer: {device: cpu}` works with stage 1)")
    offload = settings.offload_optimizer
    if offload not in ("none", "cpu") or (offload == "cpu" and stage != 1):
        raise PipellmError(f"`zero_optimization.offload_optimizer.device` {offload!r} with stage {stage}: the "
                           f"pipeline offloads the optimizer to the CPU with ZeRO stage 1 only; set `stage: 1` and "
                           f"`device: cpu`, or remove `offload_optimizer`")
    accelerator = get_accelerator()
    for key, supported in (("fp16", accelerator.is_fp16_supported), ("bf16", accelerator.is_bf16_supported)):
        if settings.precision == key and not supported():
            raise PipellmError(f"`{key}.enabled`: DeepSpeed's {accelerator.device_name()} accelerator has no {key} "
                               f"support on this machine; train in {'bf16' if key == 'fp16' else 'fp32'} here, or "
                               f"on GPUs")
