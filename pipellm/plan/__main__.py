"""``python -m pipellm.plan --config X.yml``: the plan of a run on this device, without training."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipellm.config import load_config
from pipellm.errors import PipellmError
from pipellm.models.kernels import check_liger_environment
from pipellm.models import load_model_config
from pipellm.pipeline.layer_files import resolve_checkpoint_dir
from pipellm.pipeline.partition import PipelineLayers
from pipellm.plan import plan_run
from pipellm.plan.memory import GIB
from pipellm.plan.profile import device_memory_bytes, local_device
from pipellm.plan.schedules import SCHEDULES, PassCosts, format_schedules

NAMED_PARTS = ("auto", "uniform", "parameters")


def parse_parts(text: str) -> list[int] | str:
    """``--parts``: a named split or comma-separated layer counts."""
    if text in NAMED_PARTS:
        return text
    try:
        return [int(count) for count in text.split(",")]
    except ValueError:
        raise PipellmError(f"--parts {text!r}: give auto, uniform, parameters or comma-separated layer counts "
                           f"such as 17,17") from None


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipellm.plan",
        description="Profile the model's layers on this device and print the pipeline plan: layers, time and "
                    "memory per stage, and whether it fits. Starts no training.")
    parser.add_argument("--config", help="training YAML (only model_path's config.json is read)")
    parser.add_argument("--device-memory-gib", type=float, default=None,
                        help="memory per device (default: this GPU's total; on CPU the RAM / processes)")
    parser.add_argument("--num-stages", type=int, default=None, help="pipeline stages (default: the config's)")
    parser.add_argument("--parts", default=None,
                        help="auto, uniform, parameters or counts like 17,17 (default: the config's `parts`)")
    schedule = parser.add_argument_group(
        "schedule simulator", "step time and bubble of 1F1B and ZB-H1 from per-stage pass costs "
        "(pipellm.plan.schedules); with --stage-costs no config or device is needed")
    schedule.add_argument("--schedule", choices=sorted(SCHEDULES), default=None,
                          help="print this schedule's order of passes per stage, and both schedules' figures")
    schedule.add_argument("--stage-costs", nargs="+", metavar="F,B,W", default=None,
                          help="milliseconds of one micro batch's forward, input-gradient and weight-gradient "
                               "passes: one triple per stage, or one for all --num-stages stages")
    schedule.add_argument("--micro-batches", type=int, default=None,
                          help="micro batches per step, with --stage-costs (with --config: its gradient "
                               "accumulation steps)")
    schedule.add_argument("--p2p-ms", type=float, default=0.0, help="one stage-to-stage transfer, milliseconds")
    return parser.parse_args(argv)


def parse_stage_costs(texts: list[str], num_stages: int | None) -> list[PassCosts]:
    """``--stage-costs``: one ``F,B,W`` triple per stage, or one for all ``--num-stages``."""
    try:
        costs = [PassCosts(*(float(x) for x in text.split(","))) for text in texts]
    except (TypeError, ValueError):
        raise PipellmError(f"--stage-costs {' '.join(texts)}: give F,B,W milliseconds per stage, e.g. "
                           f"--stage-costs 8.9,9.1,8.6 8.9,9.1,8.6") from None
    if any(min(c.forward, c.input_grad, c.weight_grad) < 0 for c in costs):
        raise PipellmError(f"--stage-costs {' '.join(texts)}: costs must be >= 0")
    if len(costs) == 1 and num_stages:
        return costs * num_stages
    if num_stages and len(costs) != num_stages:
        raise PipellmError(f"--stage-costs has {len(costs)} triples for --num-stages {num_stages}: give one per "
                           f"stage, or one for all")
    return costs


def schedule_text(args: argparse.Namespace) -> str:
    """Both schedules simulated on ``--stage-costs`` (the order table of ``--schedule``)."""
    costs = parse_stage_costs(args.stage_costs, args.num_stages)
    if args.micro_batches is None or args.micro_batches < 1:
        raise PipellmError("--micro-batches: give the micro batches per step (>= 1) with --stage-costs")
    return format_schedules(costs, args.micro_batches, args.p2p_ms, args.schedule)


def plan_text(args: argparse.Namespace) -> str:
    """The printed plan for the command's arguments; ``PipellmError`` for a bad one."""
    if args.p2p_ms < 0:
        raise PipellmError(f"--p2p-ms must be >= 0, got {args.p2p_ms}")
    if args.stage_costs:
        return schedule_text(args)
    if not args.config:
        raise PipellmError("give --config X.yml (plan a run) or --stage-costs F,B,W ... (simulate schedules)")
    if args.micro_batches is not None:
        raise PipellmError("--micro-batches goes with --stage-costs; with --config the micro batches are the "
                           "config's gradient accumulation steps")
    cfg = load_config(args.config)
    check_liger_environment(cfg)  # the layers are profiled with the run's levers: liger's need CUDA
    model_dir = cfg.model_path
    if not cfg.from_scratch and Path(model_dir).is_dir():
        model_dir = resolve_checkpoint_dir(model_dir)  # a training save directory: its newest checkpoint
    hf_config, family = load_model_config(model_dir)
    num_stages = args.num_stages or cfg.pipe_degree
    parts = parse_parts(args.parts) if args.parts is not None else cfg.model_topo.parts
    if num_stages < 1:
        raise PipellmError(f"--num-stages must be >= 1, got {num_stages}")
    if isinstance(parts, list) and len(parts) != num_stages:
        raise PipellmError(f"`parts` {parts} has {len(parts)} entries for {num_stages} stages; pass --parts "
                           f"with one count per stage, or --parts auto")
    if isinstance(parts, list) and min(parts) < 1:
        raise PipellmError(f"`parts` entries must be >= 1, got {parts}")
    if args.device_memory_gib is not None and args.device_memory_gib <= 0:
        raise PipellmError(f"--device-memory-gib must be > 0, got {args.device_memory_gib}")
    PipelineLayers.of(family, hf_config).check_parts(parts, num_stages)
    device = local_device()
    memory = args.device_memory_gib * GIB if args.device_memory_gib is not None else \
        device_memory_bytes(device, num_stages * cfg.data_degree)
    return plan_run(cfg, hf_config, family, device, memory, num_stages, parts, schedule=args.schedule,
                    p2p_seconds=args.p2p_ms / 1e3)[1]


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        text = plan_text(args)
    except PipellmError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(text)


if __name__ == "__main__":
    main()
