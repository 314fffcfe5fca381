"""Throughput of pipellm's pipeline training on a synthetic llama-shaped model: one run, figures printed and saved.

    python benchmarks/run_pipeline.py --preset 7b --seq 2048 --micro 2 --global-batch 32 --stages 2 --flash
    python benchmarks/run_pipeline.py --preset 7b --layers 16 --stages 1 --seq 2048 --micro 2   # one stage of 2
    python benchmarks/run_pipeline.py --preset 7b --layers 16 --stages 1 --packed --attention-backend flex
    python benchmarks/run_pipeline.py --preset 7b --seq 2048 --micro 2 --global-batch 32 --eager --schedule zb-h1
    python benchmarks/run_pipeline.py --preset 7b-16 --stages 1 --micro 2 --yaml-json '{"speed": {"sdpa_backend": "cudnn"}}'

Writes a random-init llama config of the chosen shape (no download), synthetic pretrain data long enough to fill
every row (no padding; ``--packed``: variable-length samples packed into rows), and a training YAML with ``from_scratch: true``; runs ``deepspeed train_ds.py``; reads
``metrics.jsonl`` and reports the median over the steps after the warm-up ones (``benchmarks/harness.py``).
Appends one CSV row to ``--csv`` (default ``benchmarks/results/pipeline_runs.csv``). ``benchmarks/sweep.py``
runs many such points, ZeRO-3 ones included.

MFU counts real (non-pad) tokens as work (``pipellm.observe.metrics``); without ``--packed`` every row is full, so
it is tokens/s/GPU x (6 x (N - N_embedding) + 12 x L x d x S) / peak FLOP/s, and ``mfu_all_positions`` equals it.
``tokens_per_sec_per_gpu`` counts real tokens: compare packed and fixed runs by it.
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
import tempfile
from pathlib import Path

import harness


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=harness.PRESETS, default="1b")
    parser.add_argument("--layers", type=int, default=None,
                        help="decoder layers, overriding the preset's (e.g. --preset 7b --layers 16 --stages 1)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro", type=int, default=1, help="micro batch size per GPU")
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--parts", default="parameters",
                        help="'uniform', 'parameters', 'auto' or comma-separated counts")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the figures")
    parser.add_argument("--flash", action="store_true", help="use_flash_attn")
    parser.add_argument("--grad-ckpt", action="store_true", help="use_grad_ckpt")
    parser.add_argument("--eager", action="store_true", help="compile_layers: false (default: compiled on GPUs)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--loss-chunk-tokens", type=int, default=None, help="loss_chunk_tokens (default: off)")
    parser.add_argument("--packed", action="store_true",
                        help="variable-length samples (seq/16 .. seq/3 words) packed into rows (packing: true)")
    parser.add_argument("--attention-backend", choices=("auto", "sdpa", "flex"), default="auto",
                        help="attention_backend: the kernel of packed rows' attention")
    parser.add_argument("--schedule", choices=("1f1b", "zb-h1"), default="1f1b", help="pipeline_schedule")
    parser.add_argument("--yaml-json", type=json.loads, default={},
                        help='more YAML keys as JSON, over the run\'s own: \'{"speed": {"sdpa_backend": "cudnn"}}\'')
    parser.add_argument("--csv", default=str(harness.REPO / "benchmarks" / "results" / "pipeline_runs.csv"))
    args = parser.parse_args()
    if args.layers is not None and args.layers < args.stages:
        parser.error(f"--layers {args.layers}: at least one decoder layer per stage (--stages {args.stages})")

    work = Path(tempfile.mkdtemp(prefix="pipellm-bench-"))
    model_dir = harness.write_model(work, args.preset, args.layers)
    write = harness.write_sft_data if args.packed else harness.write_data
    data = write(work / "data.jsonl", args.global_batch * args.steps, args.seq)
    point = harness.Point("pipeline", args.seq, args.global_batch, args.micro, args.stages * args.replicas,
                          args.steps, replicas=args.replicas, parts=args.parts, flash=args.flash,
                          grad_ckpt=args.grad_ckpt, eager=args.eager, dtype=args.dtype,
                          loss_chunk_tokens=args.loss_chunk_tokens,
                          extra={"attention_backend": args.attention_backend, "packing": args.packed,
                                 "pipeline_schedule": args.schedule, **args.yaml_json})
    outcome = harness.launch(point, model_dir, data, work / "run", args.warmup, echo=True)
    if outcome.status != "ok":
        print(f"FAILED ({outcome.status}: {outcome.reason}): {args}; log {outcome.log}")
        sys.exit(1)

    figures = outcome.figures
    gpu = harness.gpu_name()
    row = {
        "preset": args.preset, "layers": args.layers or harness.PRESETS[args.preset][2], "seq": args.seq,
        "micro": args.micro, "global_batch": args.global_batch,
        "stages": args.stages, "replicas": args.replicas, "parts": args.parts, "flash": args.flash,
        "grad_ckpt": args.grad_ckpt, "compile": not args.eager and gpu is not None,
        "dtype": args.dtype, "loss_chunk_tokens": args.loss_chunk_tokens, "packed": args.packed,
        "attention_backend": args.attention_backend, "schedule": args.schedule,
        "yaml_json": json.dumps(args.yaml_json, sort_keys=True), "timed_steps": figures["timed_steps"],
        **{key: figures[key] for key in ("samples_per_sec", "tokens_per_sec_per_gpu", "mfu", "mfu_all_positions",
                                          "peak_mem_gib_per_stage", "final_loss")},
        "device": gpu or "cpu", "host": platform.node(),
    }
    print("RESULT " + json.dumps(row))
    append_row(Path(args.csv), row)


def append_row(path: Path, row: dict) -> None:
    """One more row; a file written with other columns (an older version of this script) is rewritten with
    both sets (the old rows' new columns empty), so no value lands under another column's name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = list(csv.DictReader(open(path, newline=""))) if path.exists() else []
    fields = list(dict.fromkeys([*(rows[0] if rows else {}), *row]))
    temporary = path.with_name(path.name + ".tmp")
    harness.write_rows(temporary, fields, [*rows, row])
    temporary.replace(path)


if __name__ == "__main__":
    main()
