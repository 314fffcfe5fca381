"""The memory model: what a pipeline stage keeps on its device, per parameter and per micro batch in flight."""
from __future__ import annotations

import dataclasses

from pipellm.config import DeepSpeedSettings
from pipellm.errors import PipellmError
from pipellm.plan.profile import Profile
from pipellm.plan.schedules import SCHEDULES, micro_batches_held

ALLOWANCE_GIB = 5.0
"""Memory the model does not itemise: the CUDA context, cuBLAS/NCCL buffers, allocator fragmentation, the received
activation buffers and gradients in transit. Measured on one H200 when a 6.7B-parameter stage ran out of memory
(``benchmarks/results/plan_layouts_h200/``): 3.5 GiB outside PyTorch's allocator and 1.5 GiB reserved by it but
unallocated; with the 2 GiB this was before, the planner had called that stage a fit."""
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class StateBytes:
    """Bytes per parameter a stage keeps on its device for the whole run."""

    weights: float
    grads: float
    optimizer: float
    """fp32 master weights and optimizer states, after sharding over the replicas (0 when offloaded)."""
    step: float
    """Temporary at the optimizer step, when no activations are held: the fp32 copy of low-precision
    gradients the fp32 optimizer steps on."""
    layout: str
    """How that comes about, for the printed plan."""


OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "lion": 1}
"""fp32 states per parameter: AdamW's two moments, Lion's one momentum."""


def state_bytes(ds_config: dict, data_degree: int) -> StateBytes:
    """Per-parameter memory as DeepSpeed's optimizer wrappers allocate it for a pipeline run.

    * fp32, no ZeRO: the torch optimizer on the module's fp32 weights and gradients.
    * bf16 without ZeRO, or ZeRO-1 with fp32 gradient accumulation (``BF16_Optimizer``): bf16 weights, a
      gradient accumulation buffer (bf16 unless ``data_types.grad_accum_dtype: fp32``), fp32 master weights and
      states sharded over the D replicas; the bf16 gradients too with ``bf16.immediate_grad_update: false``.
    * fp16 without ZeRO (``FP16_Optimizer``): fp16 weights and gradients, fp32 master weights and states, whole.
    * ZeRO-1 otherwise (``DeepSpeedZeroOptimizer``): low-precision (or fp32) weights and gradients, an fp32
      gradient partition, fp32 master weights and states sharded over D; ``offload_optimizer`` moves the last
      three to the CPU.
    """
    spec = ds_config.get("optimizer") or {"type": "AdamW"}
    name = str(spec.get("type", "")).lower()
    if name not in OPTIMIZER_STATES:
        raise PipellmError(f"`optimizer.type` {spec.get('type')!r}: the memory model knows AdamW and Lion; use one "
                           f"of them")
    states = OPTIMIZER_STATES[name]
    optimizer_label = f"{states} {'AdamW' if states == 2 else 'Lion'} state{'s' if states > 1 else ''}"
    settings = DeepSpeedSettings.of(ds_config)
    zero_stage, offload = settings.zero_stage, settings.offload_optimizer != "none"
    low = settings.precision if settings.low_precision else None
    fp32_accumulation = settings.fp32_grad_accumulation
    weight = 2 if low else 4
    sharded = (4 + 4 * states) / data_degree
    shard_label = f"fp32 master + {optimizer_label}, sharded over {data_degree} replica(s)"
    if zero_stage == 0 and low is None:
        return StateBytes(4, 4, 4 * states, 0, f"fp32 weights and grads, {optimizer_label} (torch optimizer)")
    if low == "bf16" and (zero_stage == 0 or (fp32_accumulation and not offload)):
        # bf16.immediate_grad_update: each bf16 gradient is freed once added to the accumulation buffer
        held, grads = (0, "bf16 weights") if settings.immediate_grad_update else (2, "bf16 weights and grads")
        if fp32_accumulation:
            return StateBytes(2, held + 4, sharded, 0, f"{grads} + fp32 accumulation, {shard_label} "
                                                       f"(BF16_Optimizer)")
        return StateBytes(2, held + 2, sharded, 4 / data_degree,
                          f"{grads} + bf16 accumulation, {shard_label}; fp32 copy of the gradient shard at the step "
                          f"(BF16_Optimizer)")
    if zero_stage == 0:
        return StateBytes(2, 2, 4 + 4 * states, 4, f"fp16 weights and grads, fp32 master + {optimizer_label}; "
                                                   f"fp32 gradient copy at the step (FP16_Optimizer)")
    if offload:
        return StateBytes(weight, weight, 0, 0, f"{low or 'fp32'} weights and grads, master weights, states and "
                                                f"fp32 gradient partition offloaded (ZeRO-1)")
    return StateBytes(weight, weight + 4 / data_degree, sharded, 0,
                      f"{low or 'fp32'} weights and grads + fp32 gradient partition, {shard_label} (ZeRO-1)")


@dataclasses.dataclass(frozen=True)
class StageEstimate:
    start: int
    """First user-counted layer (0 = embedding)."""
    stop: int
    """One past the last."""
    seconds: float
    """Forward + backward of one micro batch."""
    weights: float
    grads: float
    optimizer: float
    in_flight: int
    """Micro batches whose activations the stage holds at once."""
    activations_per_micro_batch: float
    working: float
    """The largest backward peak above the held activations (0 where not measured)."""
    step: float
    """Temporaries of the optimizer step, which runs when no activations are held."""
    allowance: float

    @property
    def activations(self) -> float:
        return self.in_flight * self.activations_per_micro_batch + self.working

    @property
    def total(self) -> float:
        """The peak: during the pipeline's forwards and backwards, or at the optimizer step, whichever is more."""
        return self.weights + self.grads + self.optimizer + max(self.activations, self.step) + self.allowance


def estimate_stage(profile: Profile, state: StateBytes, stage: int, start: int, stop: int, num_stages: int,
                   micro_batches: int, allowance: float, schedule: str = "1f1b") -> StageEstimate:
    """Time and memory of stage ``stage`` holding user-counted layers ``[start, stop)`` under ``schedule`` (a
    ``pipeline_schedule``: the micro batches it holds at once, as ``pipellm.plan.schedules`` orders them)."""
    items = profile.items()[start:stop]
    params = sum(item.params if item.trainable is None else item.trainable for item in items)  # those that train
    frozen_bytes = sum(item.frozen_bytes for item in items)
    if start == 0 and stop == profile.layers.num_user_layers and profile.tied_params:
        # One module serves as embedding and head.
        if profile.embed.trainable == 0:  # frozen (LoRA)
            frozen_bytes -= profile.tied_params * profile.embed.frozen_bytes / profile.embed.params
        else:
            params -= profile.tied_params
    # DeepSpeed keeps each in-flight micro batch's received input and the clone its forward runs on.
    per_micro_batch = 2 * items[0].input_bytes + sum(item.held_bytes for item in items)
    return StageEstimate(
        start=start, stop=stop, seconds=sum(item.seconds for item in items),
        weights=frozen_bytes + params * state.weights, grads=params * state.grads, optimizer=params * state.optimizer,
        in_flight=micro_batches_held(SCHEDULES[schedule](stage, num_stages, micro_batches)),
        activations_per_micro_batch=per_micro_batch,
        working=max(item.working_bytes or 0 for item in items), step=params * state.step, allowance=allowance)
