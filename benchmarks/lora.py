"""LoRA on one GPU: pipellm's pipeline (``lora:`` in the YAML, ``dims: [1, 1]``) against peft + transformers.

    python benchmarks/lora.py --out benchmarks/results/lora_h200 --preset 7b --seqs 2048,4096 --micro 2

Both methods train the same llama-shaped random model (all 32 decoder layers of the 7B shape by default) with the
same LoRA adapters (rank ``--r`` on every linear module of the decoders), the same sequence length, micro batch,
global batch, optimizer (AdamW on the adapters) and bf16; every position of every row is a real token.

* ``pipellm``: ``train_ds.py`` through the deepspeed launcher on one GPU (decoder layers compiled, the default on
  GPUs), figures from its ``metrics.jsonl`` (median after the warm-up steps).
* ``peft``: what the HF SFT + LoRA stack (seed 001) runs: ``LlamaForCausalLM`` (SDPA attention) with peft's
  ``get_peft_model``, a plain loop of forward/backward per micro batch under bf16 autocast (as the transformers
  Trainer with ``bf16=True``), fused AdamW on the adapters; its own process, timed with CUDA synchronisation.

MFU = tokens/s/GPU x (4 x (N_base - N_embedding) + 6 x N_adapters + 12 x L x d x S) / peak FLOP/s: a frozen
weight costs its forward and its input gradient (2 + 2 FLOPs per parameter and token), an adapter also its weight
gradient (6), attention 12 x L x d x S (causal masking not discounted); recomputation is not counted.

Writes ``results.csv``, ``results.md`` and ``lora.png`` (tokens/s and peak memory per method and length) to
``--out``. ``--smoke`` runs the machinery on a tiny model on the CPU (its numbers mean nothing).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness
from pipellm.observe.metrics import peak_flops_of

LINEAR_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FIELDS = ["method", "seq", "micro", "global_batch", "r", "status", "tokens_per_sec_per_gpu", "mfu",
          "peak_mem_gib", "step_time_s", "timed_steps", "final_loss", "reason"]
SMOKE = {"preset": "tiny", "seqs": "32", "micro": 2, "global_batch": 4, "steps": 3, "warmup": 1, "dtype": "fp32"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for results.csv/.md and the plot")
    parser.add_argument("--preset", choices=harness.PRESETS, default="7b")
    parser.add_argument("--seqs", default="2048,4096", help="comma-separated max_seq_len values")
    parser.add_argument("--micro", type=int, default=2, help="micro batch (rows)")
    parser.add_argument("--global-batch", type=int, default=16, help="rows per optimizer step")
    parser.add_argument("--r", type=int, default=16, help="LoRA rank (alpha = 2r)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--methods", default="pipellm,peft")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU (tests the machinery)")
    parser.add_argument("--peft-point", help=argparse.SUPPRESS)  # internal: one peft point, as JSON
    args = parser.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    return args


def lora_block(r: int) -> dict:
    return {"r": r, "alpha": 2 * r, "dropout": 0.0, "target_modules": LINEAR_MODULES}


def shape(preset: str) -> dict:
    hidden, intermediate, layers, heads, kv_heads, vocab = harness.PRESETS[preset]
    return dict(hidden=hidden, intermediate=intermediate, layers=layers, heads=heads, kv_heads=kv_heads, vocab=vocab)


def flops_per_token(preset: str, r: int, seq: int) -> float:
    """The module docstring's formula for the preset's llama shape (untied head, no biases)."""
    s = shape(preset)
    d, ff, layers, kv_dim = s["hidden"], s["intermediate"], s["layers"], s["hidden"] // s["heads"] * s["kv_heads"]
    linears = [(d, d), (d, kv_dim), (d, kv_dim), (d, d), (d, ff), (d, ff), (ff, d)]  # (in, out) per decoder
    base = layers * (sum(i * o for i, o in linears) + 2 * d) + d + s["vocab"] * d  # + final norm + head
    adapters = layers * sum(r * (i + o) for i, o in linears)
    return 4 * base + 6 * adapters + 12 * layers * d * seq


def run_pipellm(args, seq: int, work: Path) -> dict:
    model_dir = harness.write_model(work, args.preset)
    data = harness.write_data(work / f"data{seq}.jsonl", args.global_batch * args.steps, seq)
    point = harness.Point("pipeline", seq, args.global_batch, args.micro, 1, args.steps, dtype=args.dtype,
                          extra={"lora": lora_block(args.r)})
    outcome = harness.launch(point, model_dir, data, work / f"pipellm{seq}", args.warmup, echo=not args.smoke)
    if outcome.status != "ok":
        return {"status": outcome.status, "reason": outcome.reason}
    f = outcome.figures
    return {"status": "ok", "tokens_per_sec_per_gpu": f["tokens_per_sec_per_gpu"], "peak_mem_gib":
            f["peak_mem_gib_per_gpu"], "step_time_s": f["step_time_s"], "timed_steps": f["timed_steps"],
            "final_loss": f["final_loss"]}


def run_peft(args, seq: int) -> dict:
    """One peft point in a fresh process (its own CUDA context and allocator peak)."""
    point = json.dumps({"preset": args.preset, "seq": seq, "micro": args.micro, "global_batch": args.global_batch,
                        "r": args.r, "steps": args.steps, "warmup": args.warmup, "dtype": args.dtype})
    done = subprocess.run([sys.executable, __file__, "--out", "-", "--peft-point", point], capture_output=True,
                          text=True)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    status, reason = harness.classify_failure(done.stdout + done.stderr)
    return {"status": status, "reason": reason}


def peft_point(spec: dict) -> dict:
    """The seed-001 stack's training step on random full rows; medians after the warm-up steps."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipellm.observe.metrics import peak_memory_gib

    s, cuda = shape(spec["preset"]), torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    config = LlamaConfig(hidden_size=s["hidden"], intermediate_size=s["intermediate"], num_hidden_layers=s["layers"],
                         num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], vocab_size=s["vocab"],
                         max_position_embeddings=32768, tie_word_embeddings=False)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if spec["dtype"] == "bf16" else torch.float32
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model = get_peft_model(model, LoraConfig(r=spec["r"], lora_alpha=2 * spec["r"], lora_dropout=0.0,
                                             target_modules=LINEAR_MODULES, task_type="CAUSAL_LM"))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, weight_decay=0.0, fused=cuda)
    accumulation = spec["global_batch"] // spec["micro"]
    rows = torch.randint(0, s["vocab"], (spec["steps"], accumulation, spec["micro"], spec["seq"]), device=device)
    times, losses = [], []
    for step in range(spec["steps"]):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        total = 0.0
        for micro in range(accumulation):
            with torch.autocast(device, dtype=torch.bfloat16, enabled=spec["dtype"] == "bf16"):
                loss = model(input_ids=rows[step, micro], labels=rows[step, micro]).loss / accumulation
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(total))  # a host sync, as every logging trainer makes once per step
        times.append(time.perf_counter() - start)
    timed = times[spec["warmup"]:]
    step_time = statistics.median(timed)
    return {"status": "ok", "tokens_per_sec_per_gpu": spec["global_batch"] * spec["seq"] / step_time,
            "peak_mem_gib": round(peak_memory_gib(), 3), "step_time_s": step_time, "timed_steps": len(timed),
            "final_loss": losses[-1]}


def write(out: Path, rows: list[dict], args, env: dict) -> None:
    harness.write_rows(out / "results.csv", FIELDS, rows)
    lines = [f"# LoRA r={args.r} on one GPU: pipellm vs peft + transformers", "",
             f"{env['device']}; torch {env['torch']}, DeepSpeed {env['deepspeed']}, transformers "
             f"{env['transformers']}; preset {args.preset}, micro batch {args.micro}, global batch "
             f"{args.global_batch}, {args.dtype}; median of {args.steps - args.warmup} steps after {args.warmup}.",
             "", f"Command: `python benchmarks/{' '.join(sys.argv)}`".replace("benchmarks/benchmarks/", "benchmarks/"),
             "", "MFU = tokens/s/GPU x (4 x (N_base - N_embedding) + 6 x N_adapters + 12 x L x d x S) / peak "
             "FLOP/s of the GPU.", "",
             "| method | seq | tokens/s/GPU | MFU | peak memory (GiB) | step (s) | status |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        mfu = f"{row['mfu']:.1%}" if row.get("mfu") is not None else "-"
        tokens = f"{row['tokens_per_sec_per_gpu']:,.0f}" if row["status"] == "ok" else "-"
        memory = f"{row['peak_mem_gib']:.1f}" if row["status"] == "ok" else "-"
        step = f"{row['step_time_s']:.3f}" if row["status"] == "ok" else "-"
        status = row["status"] + (f": {row['reason']}" if row.get("reason") else "")
        lines.append(f"| {row['method']} | {row['seq']} | {tokens} | {mfu} | {memory} | {step} | {status} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "environment.json").write_text(json.dumps(env, indent=1) + "\n")
    plot(rows, out / "lora.png", env["device"])


def plot(rows: list[dict], path: Path, device: str) -> None:
    try:
        import matplotlib
    except ImportError:
        print("no plot: matplotlib is not installed (pip install 'pipellm[plot]')")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [row for row in rows if row["status"] == "ok"]
    methods = sorted({row["method"] for row in ok})
    seqs = sorted({row["seq"] for row in ok})
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / max(len(methods), 1)
    for i, method in enumerate(methods):
        by_seq = {row["seq"]: row for row in ok if row["method"] == method}
        xs = [j + i * width for j, seq in enumerate(seqs) if seq in by_seq]
        for ax, key in zip(axes, ("tokens_per_sec_per_gpu", "peak_mem_gib")):
            ax.bar(xs, [by_seq[seq][key] for seq in seqs if seq in by_seq], width, label=method)
    for ax, title in zip(axes, ("tokens/s/GPU", "peak memory (GiB)")):
        ax.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(seqs))], [str(s) for s in seqs])
        ax.set_xlabel("max_seq_len")
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"LoRA on one GPU ({device})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.peft_point:
        print("RESULT " + json.dumps(peft_point(json.loads(args.peft_point))), flush=True)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env, peak = harness.environment(), peak_flops_of(harness.gpu_name())
    work = Path(tempfile.mkdtemp(prefix="pipellm-lora-"))
    runners = {"pipellm": lambda seq: run_pipellm(args, seq, work), "peft": lambda seq: run_peft(args, seq)}
    rows = []
    for seq in [int(s) for s in args.seqs.split(",")]:
        for method in args.methods.split(","):
            row = {"method": method, "seq": seq, "micro": args.micro, "global_batch": args.global_batch,
                   "r": args.r, **runners[method](seq)}
            if row["status"] == "ok" and peak:
                row["mfu"] = row["tokens_per_sec_per_gpu"] * flops_per_token(args.preset, args.r, seq) / peak
            print("RESULT " + json.dumps(row), flush=True)
            rows.append(row)
            write(out, rows, args, env)


if __name__ == "__main__":
    main()
