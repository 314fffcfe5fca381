"""``parts: auto`` and ``python -m pipellm.plan``: measure the layers, model the memory, choose the partition.

1. **Profile** (``profile.profile_layers``): build the embedding, ONE decoder layer and the head (final norm + output
   projection + loss) of the configured family with pipellm's real stage wrappers (``pipellm.pipeline.stages``), on the
   local device, in the run's dtype, micro batch, sequence length, grad checkpointing, attention and compile
   settings; time a few forward+backward passes after warm-up ones, and measure the activation memory each
   keeps from its forward to its backward (its output included), and on GPUs the extra peak its backward needs.
2. **Memory model** (``memory.state_bytes``, ``memory.estimate_stage``): per stage, weights + gradients + optimizer state (by
   precision, optimizer, ZeRO-1 sharding over the data-parallel replicas, optimizer offload: the layout DeepSpeed's
   optimizer wrappers allocate) + activations x micro batches in flight on that stage (DeepSpeed's 1F1B schedule
   keeps ``min(P - stage, micro batches)`` forwards waiting for their backward; ZB-H1 up to ``P`` on every
   stage, each held until its W: ``schedules.micro_batches_held`` of ``pipeline_schedule``'s order) + the
   largest backward peak, or the optimizer step's temporaries where they are more (the step runs with no
   activations held), + a fixed allowance (``ALLOWANCE_GIB``).
3. **Partition** (``partitioner.min_max_partition``): the contiguous split of ``[embed, decoder x L, head]`` into P stages
   that minimises the slowest stage's time among the splits whose every stage fits in the device memory; exact
   dynamic programming over (stage, last layer).
4. **Print** (``report.format_plan``): per stage its layers, estimated fwd+bwd time per micro batch and memory broken
   down; the bubble fraction (P - 1) / (m + P - 1); whether it fits.

``plan_run`` does the four. Training with ``parts: auto`` calls ``agree.agreed_auto_parts``: rank 0 profiles and
chooses, every rank gets its list. ``python -m pipellm.plan --config X.yml`` (``__main__``) does the same on the
local device without starting training (no launcher, no weights: only ``model_path``'s config.json), or
evaluates the config's explicit ``parts``.
"""
from __future__ import annotations

import torch

from pipellm.config import TrainConfig
from pipellm.models.base import ModelFamily
from pipellm.pipeline.partition import Partition
from pipellm.plan.memory import state_bytes
from pipellm.plan.partitioner import Plan, make_plan
from pipellm.plan.profile import RunShape, profile_layers
from pipellm.plan.report import format_plan
from pipellm.plan.schedules import format_schedules


def plan_run(cfg: TrainConfig, hf_config, family: ModelFamily, device: torch.device, device_memory: float,
             num_stages: int, parts: list[int] | str, must_fit: bool = False, schedule: str | None = None,
             p2p_seconds: float = 0.0) -> tuple[Plan, str]:
    """Profile on ``device`` and plan the run (``parts: auto`` chooses; anything else is evaluated); the plan and
    its printout. ``schedule``: also time each layer's F, B and W passes, simulate 1F1B and ZB-H1 on the plan's
    stages (``pipellm.plan.schedules``) and print ``schedule``'s order of passes."""
    shape = RunShape.of(cfg, device.type == "cuda")
    state = state_bytes(cfg.deepspeed, cfg.data_degree)
    profile = profile_layers(family, hf_config, shape, device, split_passes=schedule is not None)
    if cfg.lora is not None:
        from pipellm.plan.lora_memory import with_lora

        profile = with_lora(profile, cfg.lora, cfg.quantize_base, family, hf_config, shape.dtype)
    counts = None if parts == "auto" else Partition.of_parts(parts, family, hf_config, num_stages).parts
    plan = make_plan(profile, state, num_stages, cfg.gradient_accumulation_steps, device_memory, counts,
                     must_fit=must_fit, schedule=cfg.pipeline_schedule)
    text = format_plan(plan, profile, state, shape, family.name, cfg, parts)
    if schedule is not None:
        costs = [profile.stage_passes(stage.start, stage.stop) for stage in plan.stages]
        text += "\n" + format_schedules(costs, plan.micro_batches, p2p_seconds, schedule, scale=1e3)
    return plan, text
