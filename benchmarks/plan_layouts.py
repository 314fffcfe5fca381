"""Default ``parts`` against ``parts: auto`` for 2, 4 and 8 stages, planned from one device's profile.

    python benchmarks/plan_layouts.py --out benchmarks/results/plan_layouts_h200 --presets 7b,13b

What one GPU can say about a layout of several: ``pipellm.plan`` profiles the embedding, one decoder layer and the
head (forward + backward of one micro batch, at the run's shape, on this device), and for each stage count P
evaluates ``parts: uniform`` (the config's default), the family's recommended split for its common size
(``ModelFamily.default_parts``, where it matches the layer count) and the one ``parts: auto`` chooses (the
fastest within device memory). A 1F1B step of m micro batches takes ``(m + P - 1) * slowest stage``; the bubble is
``(P - 1) / (m + P - 1)``; peak memory per stage is the planner's model (README, "Choosing the partition").
Predictions, not measurements of several GPUs: stage-to-stage transfers are not in them.

Writes ``plans.csv`` and ``plans.md`` under ``--out``. ``--smoke`` runs the tiny preset on CPU.
"""
from __future__ import annotations

import argparse
import csv
import json
import tempfile
from pathlib import Path

import harness

GIB = 1024 ** 3


def training_config(model_dir: Path, work: Path, stages: int, seq: int, micro: int, global_batch: int,
                    dtype: str) -> dict:
    return {"model_path": str(model_dir), "save_path": str(work / "save"), "data_path": str(work / "unused.jsonl"),
            "from_scratch": True, "max_seq_len": seq,
            "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [stages, 1]}, "parts": "auto"},
            "train_batch_size": global_batch, "train_micro_batch_size_per_gpu": micro,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "weight_decay": 0.0}},
            **({"bf16": {"enabled": True}} if dtype == "bf16" else {})}


def plan_rows(preset: str, args, work: Path) -> list[dict]:
    import torch
    import yaml

    from pipellm.config import load_config
    from pipellm.models import load_model_config
    from pipellm.pipeline.partition import Partition, PipelineLayers
    from pipellm.plan.memory import state_bytes
    from pipellm.plan.partitioner import make_plan
    from pipellm.plan.profile import RunShape, device_memory_bytes, local_device, profile_layers

    model_dir = harness.write_model(work / preset, preset)
    hf_config, family = load_model_config(model_dir)
    layers = PipelineLayers.of(family, hf_config).num_user_layers
    device = local_device()
    rows, profile = [], None
    for stages in args.stages:
        config_path = work / preset / f"plan_p{stages}.yml"
        config_path.write_text(yaml.safe_dump(training_config(model_dir, work / preset, stages, args.seq,
                                                              args.micro, args.global_batch, args.dtype)))
        cfg = load_config(config_path)
        if profile is None:  # the layers' costs do not depend on the stage count
            profile = profile_layers(family, hf_config, RunShape.of(cfg, device.type == "cuda"), device)
        memory = args.device_memory_gib * GIB if args.device_memory_gib else device_memory_bytes(device, stages)
        state = state_bytes(cfg.deepspeed, cfg.data_degree)
        micro_batches = cfg.gradient_accumulation_steps
        recommended = family.default_parts.get(stages)
        layouts = {"uniform": Partition.of_parts("uniform", family, hf_config, stages).parts,
                   "family table": recommended if recommended and sum(recommended) == layers else None,
                   "auto": None}
        for name, parts in layouts.items():
            if name == "family table" and parts is None:
                continue
            plan = make_plan(profile, state, stages, micro_batches, memory, parts)
            slowest = max(stage.seconds for stage in plan.stages)
            rows.append({
                "preset": preset, "stages": stages, "layout": name, "parts": json.dumps(plan.parts),
                "seq": args.seq, "micro": args.micro, "micro_batches": micro_batches,
                "stage_ms": json.dumps([round(stage.seconds * 1e3, 2) for stage in plan.stages]),
                "slowest_stage_ms": round(slowest * 1e3, 3),
                "step_s": round((micro_batches + stages - 1) * slowest, 6), "bubble": round(plan.bubble, 4),
                "peak_gib": json.dumps([round(stage.total / GIB, 1) for stage in plan.stages]),
                "fits": plan.fits, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"})
        print(f"{preset} P={stages}: " + "; ".join(f"{r['layout']} {r['parts']} step {r['step_s']}s"
                                                  for r in rows if r["stages"] == stages))
    return rows


def markdown(rows: list[dict], args) -> str:
    lines = [f"# Default parts vs `parts: auto`, planned from one {rows[0]['device']}", "",
             f"seq {args.seq}, micro batch {args.micro}, global batch {args.global_batch} (one replica: "
             f"{rows[0]['micro_batches']} micro batches per step), {args.dtype}; step = (m + P - 1) x slowest "
             f"stage; predictions from the profile of one device (no stage-to-stage transfers).", "",
             "| model | P | layout | parts | slowest stage (ms / micro batch) | step (s) | bubble | peak GiB per "
             "stage | fits |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['preset']} | {row['stages']} | {row['layout']} | {row['parts']} | "
                     f"{row['slowest_stage_ms']} | {row['step_s']} | {row['bubble']:.1%} | {row['peak_gib']} | "
                     f"{'yes' if row['fits'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--presets", default="7b,13b")
    parser.add_argument("--stages", default="2,4,8")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro", type=int, default=1)
    parser.add_argument("--global-batch", type=int, default=128)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--device-memory-gib", type=float, default=None, help="default: the device's memory")
    parser.add_argument("--smoke", action="store_true", help="tiny preset on CPU, short rows")
    args = parser.parse_args(argv)
    if args.smoke:
        args.presets, args.stages, args.seq, args.global_batch, args.dtype = "tiny", "2,4", 64, 8, "fp32"
    args.stages = [int(s) for s in args.stages.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pipellm-plan-") as work:
        rows = [row for preset in args.presets.split(",") for row in plan_rows(preset, args, Path(work))]
    with open(out / "plans.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "plans.md").write_text(markdown(rows, args))
    print(markdown(rows, args))


if __name__ == "__main__":
    main()
