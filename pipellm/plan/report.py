"""The printed plan: per stage its layers, time and memory broken down; the bubble; whether it fits."""
from __future__ import annotations

import torch

from pipellm.config import TrainConfig
from pipellm.plan.memory import GIB, StateBytes
from pipellm.plan.partitioner import Plan
from pipellm.plan.profile import TIMED_STEPS, WARMUP_STEPS, Profile, RunShape


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
        f"pipellm plan: {family_name}, embedding + {profile.layers.num_decoders} decoder layers + head = "
        f"{profile.layers.num_user_layers} pipeline layers; {num_stages} stages x {cfg.data_degree} replica(s); "
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
    if cfg.lora is not None:
        trained = sum(c.params if c.trainable is None else c.trainable for c in profile.items())
        lines.insert(-1, f"LoRA r={cfg.lora.r} on {', '.join(cfg.lora.target_modules)}: {trained:,} of "
                         f"{sum(c.params for c in profile.items()):,} parameters train (per-parameter memory above); "
                         f"the frozen base keeps its weights only ({cfg.quantize_base or dtype})")
    header = ("stage", "layers", "ms/micro batch", "weights", "grads", "optimizer",
              "activations (in flight x per micro batch + peak)", "step temporaries", "allowance", "total")
    rows = [header] + [(
        str(index), profile.layers.user_layer_names(stage.start, stage.stop), f"{stage.seconds * 1e3:.3f}",
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


def _size(num_bytes: float) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{num_bytes:.0f} B"
