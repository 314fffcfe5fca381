"""Throughput of pipellm's pipeline training on a synthetic llama-shaped model: one run, figures printed and saved.

    python benchmarks/run_pipeline.py --preset 7b --seq 2048 --micro 2 --global-batch 32 --stages 2 --flash

Writes a random-init llama config of the chosen shape (no download), synthetic pretrain data long enough to fill
every row (no padding), and a training YAML with ``from_scratch: true``; runs ``deepspeed train_ds.py``; reads
``metrics.jsonl`` and reports the median over the steps after the warm-up ones. Appends one CSV row to
``--csv`` (default ``benchmarks/results/pipeline_runs.csv``).

MFU = tokens/s/GPU x (6 x (N - N_embedding) + 12 x L x d x S) / peak FLOP/s (see ``pipellm.metrics``).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipellm.quickstart import TINY_LLAMA  # noqa: E402

# name: (hidden, intermediate, layers, heads, kv_heads, vocab)
PRESETS = {
    "tiny": (64, 172, 4, 4, 2, 1017),
    "1b": (2048, 5632, 22, 32, 4, 32000),
    "7b": (4096, 11008, 32, 32, 32, 32000),
    "13b": (5120, 13824, 40, 40, 40, 32000),
}
WORDS = ("the of and to in is was for on are with as by at from this that have not but what all were when we "
         "there can an your which their said if will each about how up out them then she many some so these "
         "would other into has more her two like him see time could no make than first been its who now people "
         "my made over did down only way find use may water long little very after words called just where most "
         "know get through back much go good new write our me man too any day same right look think also around "
         "another came come work three word must because does part even place well such here take why things "
         "help put years different away again off went old number great tell men say small every found still "
         "between name should home big give air line set own under read last never us left end along while").split()


def write_model(work: Path, preset: str) -> Path:
    from transformers import AutoTokenizer, LlamaConfig

    hidden, intermediate, layers, heads, kv_heads, vocab = PRESETS[preset]
    model_dir = work / "model"
    LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                max_position_embeddings=32768, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                pad_token_id=3).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(TINY_LLAMA).save_pretrained(model_dir)
    return model_dir


def write_data(work: Path, samples: int, seq: int) -> Path:
    rng = random.Random(0)
    path = work / "data.jsonl"
    with open(path, "w") as f:
        for _ in range(samples):
            f.write(json.dumps({"type": "pretrain", "text": " ".join(rng.choices(WORDS, k=seq))}) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=PRESETS, default="1b")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro", type=int, default=1, help="micro batch size per GPU")
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--parts", default="parameters", help="'uniform', 'parameters' or comma-separated counts")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the figures")
    parser.add_argument("--flash", action="store_true", help="use_flash_attn")
    parser.add_argument("--grad-ckpt", action="store_true", help="use_grad_ckpt")
    parser.add_argument("--eager", action="store_true", help="compile_layers: false (default: compiled on GPUs)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--csv", default=str(REPO / "benchmarks" / "results" / "pipeline_runs.csv"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="pipellm-bench-"))
    model_dir = write_model(work, args.preset)
    data = write_data(work, args.global_batch * args.steps, args.seq)
    parts = args.parts if args.parts in ("uniform", "parameters") else [int(p) for p in args.parts.split(",")]
    config = {
        "model_path": str(model_dir), "save_path": str(work / "save"), "data_path": str(data),
        "max_seq_len": args.seq, "max_steps": args.steps, "from_scratch": True, "log_steps": 1,
        "save_final": False, "use_flash_attn": args.flash, "use_grad_ckpt": args.grad_ckpt,
        "compile_layers": False if args.eager else None,
        "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [args.stages, args.replicas]},
                       "parts": parts},
        "train_batch_size": args.global_batch, "train_micro_batch_size_per_gpu": args.micro,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "weight_decay": 0.0}},
        "gradient_clipping": 1.0,
    }
    if args.dtype == "bf16":
        config["bf16"] = {"enabled": True}
    config_path = work / "config.yml"
    config_path.write_text(yaml.safe_dump(config))
    world = args.stages * args.replicas
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(world),
               "--master_port", str(29500 + os.getpid() % 1000), str(REPO / "train_ds.py"), "--config",
               str(config_path)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    result = subprocess.run(command, cwd=REPO, env=env)
    if result.returncode:
        print(f"FAILED (exit {result.returncode}): {args}")
        sys.exit(result.returncode)

    records = [json.loads(line) for line in (work / "save" / "metrics.jsonl").read_text().splitlines()]
    timed = records[args.warmup:]
    row = {
        "preset": args.preset, "seq": args.seq, "micro": args.micro, "global_batch": args.global_batch,
        "stages": args.stages, "replicas": args.replicas, "parts": args.parts, "flash": args.flash,
        "grad_ckpt": args.grad_ckpt, "compile": not args.eager and _device_name() != "cpu", "dtype": args.dtype, "timed_steps": len(timed),
        "samples_per_sec": statistics.median(r["samples_per_sec"] for r in timed),
        "tokens_per_sec_per_gpu": statistics.median(r["tokens_per_sec_per_gpu"] for r in timed),
        "mfu": statistics.median(r["mfu"] for r in timed) if timed[0]["mfu"] is not None else None,
        "peak_mem_gib_per_stage": max((r["peak_mem_gib_per_stage"] for r in timed), key=max),
        "final_loss": timed[-1]["loss"], "device": _device_name(), "host": platform.node(),
    }
    print("RESULT " + json.dumps(row))
    csv_path = Path(args.csv)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    new = not csv_path.exists()
    with open(csv_path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"


if __name__ == "__main__":
    main()
