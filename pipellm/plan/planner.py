"""``parts: auto`` and ``python -m pipellm.plan``: measure the layers, model the memory, choose the partition.

1. **Profile** (``profile_layers``): build the embedding, ONE decoder layer and the head (final norm + output
   projection + loss) of the configured family with pipellm's real stage wrappers (``pipellm.pipeline.stages``), on the
   local device, in the run's dtype, micro batch, sequence length, grad checkpointing, attention and compile
   settings; time a few forward+backward passes after warm-up ones, and measure the activation memory each
   keeps from its forward to its backward (its output included), and on GPUs the extra peak its backward needs.
2. **Memory model** (``state_bytes``, ``estimate_stage``): per stage, weights + gradients + optimizer state (by
   precision, optimizer, ZeRO-1 sharding over the data-parallel replicas, optimizer offload: the layout DeepSpeed's
   optimizer wrappers allocate) + activations x micro batches in flight on that stage (DeepSpeed's 1F1B schedule
   keeps ``min(P - stage, micro batches)`` forwards waiting for their backward) + the largest backward peak,
   or the optimizer step's temporaries where they are more (the step runs with no activations held), + a fixed
   allowance (``ALLOWANCE_GIB``).
3. **Partition** (``min_max_partition``): the contiguous split of ``[embed, decoder x L, head]`` into P stages
   that minimises the slowest stage's time among the splits whose every stage fits in the device memory; exact
   dynamic programming over (stage, last layer).
4. **Print** (``format_plan``): per stage its layers, estimated fwd+bwd time per micro batch and memory broken
   down; the bubble fraction (P - 1) / (m + P - 1); whether it fits.

Training with ``parts: auto`` calls ``agreed_auto_parts``: rank 0 profiles and chooses, every rank gets its
list. ``python -m pipellm.plan --config X.yml`` does the same on the local device without starting training
(no launcher, no weights: only ``model_path``'s config.json), or evaluates the config's explicit ``parts``.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from pipellm.config import DeepSpeedSettings, TrainConfig, load_config
from pipellm.errors import PipellmError
from pipellm.models import load_model_config
from pipellm.models.base import ModelFamily

WARMUP_STEPS = 3
"""Untimed forward+backward passes first: allocator growth, kernel selection and ``torch.compile``."""
TIMED_STEPS = 5
"""Timed passes; the median is the layer's time."""
ALLOWANCE_GIB = 2.0
"""Memory the model does not itemise: the CUDA context, NCCL buffers, allocator fragmentation, the received
activation buffers and gradients in transit."""
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class RunShape:
    """What a layer's time and activation memory depend on; one per run."""

    micro_batch: int
    seq_len: int
    dtype: torch.dtype
    grad_ckpt: bool
    flash_attn: bool
    packed: bool
    compile_layers: bool
    loss_chunk_tokens: int | None = None

    @classmethod
    def of(cls, cfg: TrainConfig, on_gpu: bool) -> RunShape:
        return cls(cfg.micro_batch_size, cfg.max_seq_len, cfg.deepspeed_settings.dtype, cfg.use_grad_ckpt, cfg.use_flash_attn,
                   cfg.packing, on_gpu if cfg.compile_layers is None else cfg.compile_layers, cfg.loss_chunk_tokens)


@dataclasses.dataclass(frozen=True)
class LayerCost:
    """One pipeline layer kind, measured for one micro batch."""

    seconds: float
    """Forward + backward (median of the timed passes)."""
    held_bytes: int
    """Activations kept from the forward to the backward, the layer's output included (its input not: that is
    the previous layer's output)."""
    working_bytes: int | None
    """Peak during forward + backward above ``held_bytes`` (None where not measurable: on CPU)."""
    input_bytes: int
    """The tensors the layer receives (a stage keeps its received input and the clone it runs on)."""
    params: int
    """Parameters the layer holds (the head: final norm + output projection, or the tied embedding's replica)."""


@dataclasses.dataclass(frozen=True)
class Profile:
    device: str
    embed: LayerCost
    decoder: LayerCost
    head: LayerCost
    num_decoders: int
    tied_params: int
    """Parameters the head shares with the embedding (0 when untied): counted once on a stage holding both."""

    def items(self) -> list[LayerCost]:
        """The user-counted pipeline layers in order: embedding, decoders, head."""
        return [self.embed] + [self.decoder] * self.num_decoders + [self.head]


def local_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def profile_layers(family: ModelFamily, hf_config, shape: RunShape, device: torch.device) -> Profile:
    """Measure the embedding, one decoder layer and the head as ``build_pipeline`` builds them, then free them
    (and forget their peak, so a training run's peak memory figure is its own).

    Each layer runs on the previous one's (detached) output, so shapes and dtypes are those that travel between
    stages; the head's measurement includes the loss, which the last stage computes.
    """
    profile = _build_and_measure(family, hf_config, shape, device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return profile


def _build_and_measure(family: ModelFamily, hf_config, shape: RunShape, device: torch.device) -> Profile:
    from deepspeed.pipe import TiedLayerSpec

    from pipellm.models.attention import AttentionOptions
    from pipellm.pipeline.loss import token_mean_loss
    from pipellm.pipeline.stages import init_weights, layer_specs

    specs = layer_specs(family, hf_config, shape.grad_ckpt,
                        AttentionOptions(use_flash_attn=shape.flash_attn, packed=shape.packed), shape.compile_layers,
                        shape.loss_chunk_tokens)
    embed_spec, decoder_spec, norm_spec, head_spec = specs[0], specs[1], specs[-2], specs[-1]
    tied = isinstance(head_spec, TiedLayerSpec)
    torch.manual_seed(0)
    with torch.device(device):
        embed, decoder, norm = embed_spec.build(), decoder_spec.build(), norm_spec.build()
        head_module = embed if tied else head_spec.build()
    for module in (embed, decoder, norm, head_module):
        init_weights(module, getattr(hf_config, "initializer_range", 0.02))
        module.to(shape.dtype).train()
    head = functools.partial(head_spec.forward_fn, embed) if tied else head_module

    batch, seq = shape.micro_batch, shape.seq_len
    input_ids = torch.randint(0, hf_config.vocab_size, (batch, seq), device=device)
    position_ids = torch.arange(seq, device=device).expand(batch, seq).contiguous()  # one sample per row
    targets = torch.randint(0, hf_config.vocab_size, (batch, seq), device=device)
    loss_scale = torch.tensor(1.0 / (batch * seq), device=device)

    def count(*modules):
        return sum(p.numel() for m in modules for p in m.parameters())

    def head_and_loss(inputs):
        return token_mean_loss(head(norm(inputs)), (targets, loss_scale), shape.loss_chunk_tokens)

    embed_cost, hidden = _measure(embed, (input_ids, position_ids), list(embed.parameters()), device)
    decoder_cost, hidden = _measure(decoder, hidden, list(decoder.parameters()), device)
    head_cost, _ = _measure(head_and_loss, hidden, [*norm.parameters(), *head_module.parameters()], device)
    tied_params = functools.reduce(getattr, family.tied_weight.split("."), embed).numel() if tied else 0
    return Profile(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        embed=dataclasses.replace(embed_cost, params=count(embed)),
        decoder=dataclasses.replace(decoder_cost, params=count(decoder)),
        head=dataclasses.replace(head_cost, params=count(norm, head_module)),
        num_decoders=family.num_decoder_layers(hf_config), tied_params=tied_params)


def _measure(layer: Callable, inputs: tuple, params: list[torch.Tensor], device: torch.device
             ) -> tuple[LayerCost, tuple]:
    """Time and memory of ``layer`` (forward + backward) on ``inputs``; also its outputs, detached, as the next
    layer's inputs (floating tensors require grad, as a received activation does). ``params``: the layer's."""
    def forward():
        return _as_tuple(layer(inputs))

    def backward(outputs):
        tensors = [t for t in outputs if t.requires_grad]
        torch.autograd.backward(tensors, [torch.ones_like(t) for t in tensors])
        for t in inputs:
            t.grad = None

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(WARMUP_STEPS):
        backward(forward())
    seconds = []
    for _ in range(TIMED_STEPS):
        sync()
        start = time.perf_counter()
        backward(forward())
        sync()
        seconds.append(time.perf_counter() - start)

    if device.type == "cuda":
        # Weights and their gradients exist since the warm-up: the difference is this micro batch's alone.
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        outputs = forward()
        sync()
        held = torch.cuda.memory_allocated(device) - base
        backward(outputs)
        sync()
        working = torch.cuda.max_memory_allocated(device) - base - held
    else:
        # No allocator statistics on CPU: count the storages autograd saves for the backward (parameters and
        # inputs excluded, each storage once) plus the outputs. With checkpointing only the outputs remain.
        owned = {t.untyped_storage().data_ptr() for t in inputs}
        owned |= {p.untyped_storage().data_ptr() for p in params}
        kept: dict[int, int] = {}

        def keep(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in owned:
                kept[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            outputs = forward()
        for t in outputs:
            keep(t)
        held, working = sum(kept.values()), None
        backward(outputs)
    cost = LayerCost(seconds=statistics.median(seconds), held_bytes=held, working_bytes=working,
                     input_bytes=sum(t.nbytes for t in inputs), params=0)
    next_inputs = tuple(t.detach().requires_grad_(t.is_floating_point()) for t in outputs)
    return cost, next_inputs


def _as_tuple(outputs) -> tuple:
    return outputs if isinstance(outputs, tuple) else (outputs,)


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
    * bf16 without ZeRO, or ZeRO-1 with fp32 gradient accumulation (``BF16_Optimizer``): bf16 weights and
      gradients, a gradient accumulation buffer (bf16 unless ``data_types.grad_accum_dtype: fp32``), fp32 master
      weights and states sharded over the D replicas.
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
        if fp32_accumulation:
            return StateBytes(2, 2 + 4, sharded, 0, f"bf16 weights and grads + fp32 accumulation, {shard_label} "
                                                    f"(BF16_Optimizer)")
        return StateBytes(2, 2 + 2, sharded, 4 / data_degree,
                          f"bf16 weights and grads + bf16 accumulation, {shard_label}; fp32 copy of the gradient "
                          f"shard at the step (BF16_Optimizer)")
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
                   micro_batches: int, allowance: float) -> StageEstimate:
    """Time and memory of stage ``stage`` holding user-counted layers ``[start, stop)``."""
    items = profile.items()[start:stop]
    params = sum(item.params for item in items)
    if start == 0 and stop == profile.num_decoders + 2:
        params -= profile.tied_params  # one module serves as embedding and head
    # DeepSpeed keeps each in-flight micro batch's received input and the clone its forward runs on.
    per_micro_batch = 2 * items[0].input_bytes + sum(item.held_bytes for item in items)
    return StageEstimate(
        start=start, stop=stop, seconds=sum(item.seconds for item in items),
        weights=params * state.weights, grads=params * state.grads, optimizer=params * state.optimizer,
        in_flight=min(num_stages - stage, micro_batches), activations_per_micro_batch=per_micro_batch,
        working=max(item.working_bytes or 0 for item in items), step=params * state.step, allowance=allowance)


def min_max_partition(num_items: int, num_stages: int, cost: Callable[[int, int, int], float],
                      allowed: Callable[[int, int, int], bool] = lambda stage, start, stop: True
                      ) -> tuple[float, list[int]] | None:
    """The contiguous split of items ``0 .. num_items - 1`` into ``num_stages`` non-empty stages that minimises
    ``max(cost(stage, start, stop))`` among the splits where ``allowed(stage, start, stop)`` holds for every
    stage: ``(that maximum, items per stage)``, or None if no split is allowed.

    Exact: ``best[s][j]``, the smallest maximum over stages 0..s when stage s ends before item j, is
    ``min over i of max(best[s - 1][i], cost(s, i, j))``; O(num_stages x num_items^2) cost evaluations. Ties go
    to the earliest boundary.
    """
    best = [[math.inf] * (num_items + 1) for _ in range(num_stages)]
    choice = [[0] * (num_items + 1) for _ in range(num_stages)]
    for stop in range(1, num_items - num_stages + 2):
        if allowed(0, 0, stop):
            best[0][stop] = cost(0, 0, stop)
    for stage in range(1, num_stages):
        for stop in range(stage + 1, num_items - (num_stages - 1 - stage) + 1):
            for start in range(stage, stop):
                if best[stage - 1][start] == math.inf or not allowed(stage, start, stop):
                    continue
                value = max(best[stage - 1][start], cost(stage, start, stop))
                if value < best[stage][stop]:
                    best[stage][stop], choice[stage][stop] = value, start
    if best[num_stages - 1][num_items] == math.inf:
        return None
    bounds = [num_items]
    for stage in range(num_stages - 1, 0, -1):
        bounds.append(choice[stage][bounds[-1]])
    bounds.append(0)
    bounds.reverse()
    return best[num_stages - 1][num_items], [b - a for a, b in zip(bounds, bounds[1:])]


@dataclasses.dataclass(frozen=True)
class Plan:
    parts: list[int]
    chosen: bool
    """True: chosen by ``parts: auto``; False: the config's partition, evaluated."""
    stages: list[StageEstimate]
    micro_batches: int
    device_memory: float
    """Bytes available per device."""
    problem: str
    """Empty when every stage fits; else why not and what to change."""

    @property
    def fits(self) -> bool:
        return not self.problem

    @property
    def bubble(self) -> float:
        stages = len(self.parts)
        return (stages - 1) / (self.micro_batches + stages - 1)


def make_plan(profile: Profile, state: StateBytes, num_stages: int, micro_batches: int, device_memory: float,
              parts: list[int] | None = None, allowance: float = ALLOWANCE_GIB * GIB,
              must_fit: bool = False) -> Plan:
    """Evaluate ``parts`` (user counts), or choose them (None): the fastest split whose every stage fits in
    ``device_memory``. When none fits, ``must_fit`` raises ``PipellmError``; otherwise the plan is the fastest
    split regardless of memory, with the problem stated."""
    num_items = profile.num_decoders + 2
    prefix = [0.0]
    for item in profile.items():
        prefix.append(prefix[-1] + item.seconds)

    def stage_seconds(stage, start, stop):
        return prefix[stop] - prefix[start]

    def stage_memory(stage, start, stop):
        return estimate_stage(profile, state, stage, start, stop, num_stages, micro_batches, allowance).total

    problem, chosen = "", parts is None
    if chosen:
        found = min_max_partition(num_items, num_stages, stage_seconds,
                                  lambda stage, start, stop: stage_memory(stage, start, stop) <= device_memory)
        if found is None:
            least, _ = min_max_partition(num_items, num_stages, stage_memory)
            problem = (f"no split of the {num_items} pipeline layers into {num_stages} stages fits in "
                       f"{device_memory / GIB:.1f} GiB per device (the least memory any split needs is "
                       f"{least / GIB:.1f} GiB on its largest stage); use more pipeline stages "
                       f"(`model_topo.process_topology.dims`), `use_grad_ckpt: true`, a smaller "
                       f"`train_micro_batch_size_per_gpu` or `max_seq_len`, or ZeRO-1 / optimizer offload")
            if must_fit:
                raise PipellmError(f"`model_topo.parts: auto`: {problem}")
            found = min_max_partition(num_items, num_stages, stage_seconds)
        parts = found[1]
    bounds = [0]
    for count in parts:
        bounds.append(bounds[-1] + count)
    stages = [estimate_stage(profile, state, stage, start, stop, num_stages, micro_batches, allowance)
              for stage, (start, stop) in enumerate(zip(bounds, bounds[1:]))]
    too_big = [(i, s) for i, s in enumerate(stages) if s.total > device_memory]
    if too_big and not problem:
        stage, estimate = max(too_big, key=lambda item: item[1].total)
        problem = (f"stage {stage} needs {estimate.total / GIB:.1f} GiB but the device has "
                   f"{device_memory / GIB:.1f} GiB; move layers off it (`model_topo.parts`, or `auto`), use more "
                   f"pipeline stages, `use_grad_ckpt: true` or a smaller `train_micro_batch_size_per_gpu`")
    return Plan(parts=list(parts), chosen=chosen, stages=stages, micro_batches=micro_batches,
                device_memory=device_memory, problem=problem)


def user_counts(parts: list[int] | str, family: ModelFamily, hf_config, num_stages: int) -> list[int]:
    """``parts`` (a list, ``uniform`` or ``parameters``) as user-counted layers per stage, as training splits."""
    from pipellm.pipeline.partition import stage_boundaries

    return counts_of_boundaries(stage_boundaries(parts, family, hf_config, num_stages))


def counts_of_boundaries(bounds: list[int]) -> list[int]:
    """User-counted layers per stage from DeepSpeed's stage boundaries (``PipelineModule.parts``)."""
    counts = [int(b - a) for a, b in zip(bounds, bounds[1:])]  # partition_balanced's are numpy integers
    counts[-1] -= 1  # DeepSpeed's final norm and output projection are the user's one head layer
    return counts


def device_memory_bytes(device: torch.device, processes_per_host: int) -> float:
    """A GPU's total memory; on CPU the host's RAM shared by its pipeline processes."""
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / processes_per_host


def plan_run(cfg: TrainConfig, hf_config, family: ModelFamily, device: torch.device, device_memory: float,
             num_stages: int, parts: list[int] | str, must_fit: bool = False) -> tuple[Plan, str]:
    """Profile on ``device`` and plan the run (``parts: auto`` chooses; anything else is evaluated); the plan and
    its printout."""
    shape = RunShape.of(cfg, device.type == "cuda")
    state = state_bytes(cfg.deepspeed, cfg.data_degree)
    profile = profile_layers(family, hf_config, shape, device)
    plan = make_plan(profile, state, num_stages, cfg.gradient_accumulation_steps, device_memory,
                     None if parts == "auto" else user_counts(parts, family, hf_config, num_stages),
                     must_fit=must_fit)
    return plan, format_plan(plan, profile, state, shape, family.name, cfg, parts)


def format_plan(plan: Plan, profile: Profile, state: StateBytes, shape: RunShape, family_name: str,
                cfg: TrainConfig, parts: list[int] | str) -> str:
    num_stages, micro_batches = len(plan.parts), plan.micro_batches
    kinds = {"embed": profile.embed, "decoder": profile.decoder, "head": profile.head}
    on = {True: "on", False: "off"}
    dtype = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[shape.dtype]
    working = ", ".join(f"{k} {_size(c.working_bytes)}" for k, c in kinds.items()) \
        if profile.decoder.working_bytes is not None else "not measured on cpu"
    how = f"evaluated: `parts: {parts}`" if not plan.chosen else "auto: the fastest split whose every stage fits" \
        if plan.fits else "auto: nothing fits, so the fastest split regardless of memory"
    lines = [
        f"pipellm plan: {family_name}, embedding + {profile.num_decoders} decoder layers + head = "
        f"{profile.num_decoders + 2} pipeline layers; {num_stages} stages x {cfg.data_degree} replica(s); "
        f"{micro_batches} micro batches of {shape.micro_batch} x {shape.seq_len} tokens per step",
        f"settings: {dtype}, grad ckpt {on[shape.grad_ckpt]}, flash attention {on[shape.flash_attn]}, "
        f"packing {on[shape.packed]}, compiled layers {on[shape.compile_layers]}, loss chunks "
        f"{shape.loss_chunk_tokens or 'off'}",
        f"measured on {profile.device}, fwd+bwd of one micro batch (median of {TIMED_STEPS} after {WARMUP_STEPS} "
        f"warm-up): " + ", ".join(f"{k} {c.seconds * 1e3:.3f} ms" for k, c in kinds.items()),
        "activations held per micro batch: " + ", ".join(f"{k} {_size(c.held_bytes)}" for k, c in kinds.items())
        + f"; backward peak above them: {working}",
        f"memory per parameter: weights {state.weights:g} B, grads {state.grads:g} B, optimizer "
        f"{state.optimizer:g} B, step temporaries {state.step:g} B ({state.layout})",
        f"parts: {plan.parts} ({how})",
    ]
    header = ("stage", "layers", "ms/micro batch", "weights", "grads", "optimizer",
              "activations (in flight x per micro batch + peak)", "step temporaries", "allowance", "total")
    rows = [header] + [(
        str(index), _layer_names(stage.start, stage.stop, profile.num_decoders), f"{stage.seconds * 1e3:.3f}",
        _size(stage.weights), _size(stage.grads), _size(stage.optimizer),
        f"{stage.in_flight} x {_size(stage.activations_per_micro_batch)} + {_size(stage.working)} = "
        f"{_size(stage.activations)}", _size(stage.step), _size(stage.allowance), _size(stage.total))
        for index, stage in enumerate(plan.stages)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.append("total = weights + grads + optimizer + max(activations, step temporaries) + allowance")
    slowest = max(stage.seconds for stage in plan.stages)
    ticks = micro_batches + num_stages - 1
    lines.append(f"bubble (P - 1) / (m + P - 1) = {num_stages - 1} / {ticks} = {plan.bubble:.1%}; est. step time "
                 f"(m + P - 1) x slowest stage = {ticks} x {slowest * 1e3:.3f} ms = {ticks * slowest:.3f} s "
                 f"(transfers and the optimizer step not included)")
    largest = max(stage.total for stage in plan.stages)
    verdict = f"fits (largest stage {_size(largest)})" if plan.fits else f"does not fit: {plan.problem}"
    lines.append(f"device memory {_size(plan.device_memory)} per device: {verdict}")
    return "\n".join(lines)


def _layer_names(start: int, stop: int, num_decoders: int) -> str:
    """``0-2: embed + decoders 0-1`` for user-counted layers ``[start, stop)``."""
    names = ["embed"] if start == 0 else []
    first, last = max(start, 1) - 1, min(stop, num_decoders + 1) - 2
    if first == last:
        names.append(f"decoder {first}")
    elif first < last:
        names.append(f"decoders {first}-{last}")
    if stop == num_decoders + 2:
        names.append("head")
    span = f"{start}" if stop - start == 1 else f"{start}-{stop - 1}"
    return f"{span}: {' + '.join(names)}"


def _size(num_bytes: float) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{num_bytes:.0f} B"


def agreed_auto_parts(cfg: TrainConfig, hf_config, family: ModelFamily, resume=None) -> list[int]:
    """``parts: auto`` in training, after the process group exists: rank 0 profiles on its device, prints the
    plan and sends its parts to every rank (each rank measuring for itself could pick a different split from
    timing noise, and stages that disagree on their layers train a wrong model). When nothing fits, every rank
    raises the same ``PipellmError``.

    A run resuming its optimizer state (``resume``, a ``pipellm.resume.ResumePoint``) on the same process grid
    keeps the checkpoint's split instead: that state is saved per stage, and a new measurement may differ.
    """
    import deepspeed.comm as dist

    topology = cfg.model_topo.process_topology
    if resume is not None and not resume.weights_only:
        layout = resume.state["layout"]
        if layout["axes"] == topology.axes and layout["dims"] == topology.dims:
            parts = counts_of_boundaries(layout["stage_boundaries"])
            if dist.get_rank() == 0:
                print(f"pipellm: parts: auto keeps the split of the checkpoint it resumes: {parts}", file=sys.stderr)
            return parts
    message: list = [None]
    if dist.get_rank() == 0:
        device = local_device()
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
        try:
            plan, text = plan_run(cfg, hf_config, family, device, device_memory_bytes(device, processes),
                                  cfg.pipe_degree, "auto", must_fit=True)
            print(text, file=sys.stderr, flush=True)
            message = [plan.parts]
        except PipellmError as err:
            message = [str(err)]
    dist.broadcast_object_list(message, src=0)
    if isinstance(message[0], str):
        raise PipellmError(message[0])
    return message[0]


def _parse_parts(text: str) -> list[int] | str:
    if text in ("auto", "uniform", "parameters"):
        return text
    try:
        return [int(count) for count in text.split(",")]
    except ValueError:
        raise PipellmError(f"--parts {text!r}: give auto, uniform, parameters or comma-separated layer counts "
                           f"such as 17,17") from None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipellm.plan",
        description="Profile the model's layers on this device and print the pipeline plan: layers, time and "
                    "memory per stage, and whether it fits. Starts no training.")
    parser.add_argument("--config", required=True, help="training YAML (only model_path's config.json is read)")
    parser.add_argument("--device-memory-gib", type=float, default=None,
                        help="memory per device (default: this GPU's total; on CPU the RAM / processes)")
    parser.add_argument("--num-stages", type=int, default=None, help="pipeline stages (default: the config's)")
    parser.add_argument("--parts", default=None,
                        help="auto, uniform, parameters or counts like 17,17 (default: the config's `parts`)")
    args = parser.parse_args(argv)
    try:
        from pipellm.pipeline.layer_files import resolve_checkpoint_dir
        from pipellm.config import validate_partition

        cfg = load_config(args.config)
        model_dir = cfg.model_path
        if not cfg.from_scratch and Path(model_dir).is_dir():
            model_dir = resolve_checkpoint_dir(model_dir)  # a training save directory: its newest checkpoint
        hf_config, family = load_model_config(model_dir)
        num_stages = args.num_stages or cfg.pipe_degree
        parts = _parse_parts(args.parts) if args.parts is not None else cfg.model_topo.parts
        if num_stages < 1:
            raise PipellmError(f"--num-stages must be >= 1, got {num_stages}")
        if isinstance(parts, list) and len(parts) != num_stages:
            raise PipellmError(f"`parts` {parts} has {len(parts)} entries for {num_stages} stages; pass --parts "
                               f"with one count per stage, or --parts auto")
        if isinstance(parts, list) and min(parts) < 1:
            raise PipellmError(f"`parts` entries must be >= 1, got {parts}")
        if args.device_memory_gib is not None and args.device_memory_gib <= 0:
            raise PipellmError(f"--device-memory-gib must be > 0, got {args.device_memory_gib}")
        cfg.model_topo.process_topology.dims[cfg.model_topo.process_topology.axes.index("pipe")] = num_stages
        cfg.model_topo.parts = parts
        validate_partition(cfg, family.num_decoder_layers(hf_config) + 2)
        device = local_device()
        memory = args.device_memory_gib * GIB if args.device_memory_gib is not None else \
            device_memory_bytes(device, num_stages * cfg.data_degree)
        _, text = plan_run(cfg, hf_config, family, device, memory, num_stages, parts)
    except PipellmError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(text)


