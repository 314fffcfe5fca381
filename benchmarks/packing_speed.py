"""Packed variable-length rows against fixed-length rows on one pipeline stage: real tokens/s of each attention.

    python benchmarks/packing_speed.py --preset 7b --layers 16 --seq 2048 --micro 2 --out benchmarks/results/packing_h200
    python benchmarks/packing_speed.py --smoke --out /tmp/packing      # CPU, tiny model: the machinery only

One stage holding the whole model (embedding, ``--layers`` decoders, final norm, head and loss), built with
pipellm's own stage modules (``pipellm.pipeline.stages.layer_specs``) as training builds them, compiled on GPUs
(``--eager``: not), random weights. Each variant runs forward + backward over the same number of micro batches
(no optimizer step, which is the same for every variant):

* ``fixed``: full rows, one sample of ``--seq`` tokens each, no padding (SDPA's fused causal kernels);
* ``packed-sdpa``: SFT-like samples of random lengths (seeded; ``--min-len`` .. ``--max-len`` tokens) packed
  best-fit into rows (``packing: true``), attention kept to each sample by SDPA with the dense mask
  (``attention_backend: sdpa``);
* ``packed-flex``: the same rows with FlexAttention's document block mask (``attention_backend: flex``; GPUs
  only: FlexAttention has no backward on CPU, so ``--smoke`` records it as skipped).

Reported per variant: real (non-pad) tokens/s, the fill (real tokens / positions), the time per micro batch and
the ratio of its real tokens/s to ``fixed``'s (the goal: packed >= 97% of fixed). Writes ``results.csv``,
``results.md`` (with the machine, versions and command) to ``--out``.
"""
from __future__ import annotations

import argparse
import csv
import gc
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import harness

VARIANTS = ("fixed", "packed-sdpa", "packed-flex")
FIELDS = ["variant", "status", "reason", "real_tokens_per_sec", "fill", "ms_per_micro_batch", "vs_fixed", "preset",
          "layers", "seq", "micro", "micro_batches", "dtype", "compiled", "device"]


class RandomSamples:
    """Random token samples of given lengths, all tokens trained (a ``SampleStore`` for ``materialize``)."""

    def __init__(self, lengths: np.ndarray, vocab: int, seed: int):
        rng = np.random.default_rng(seed)
        self.samples = [rng.integers(4, vocab, size=int(n)) for n in lengths]

    def sample(self, index: int):
        ids = self.samples[index]
        return ids, np.ones_like(ids)


def micro_batch_rows(args, vocab: int, packed: bool) -> list:
    """``args.micro_batches`` micro batches of ``args.micro`` rows (``pipellm.data.batches`` layout)."""
    from pipellm.data.batches import materialize, micro_batches, pack

    rows_needed = args.micro * args.micro_batches
    rng = np.random.default_rng(0)
    if packed:  # as many samples as the rows hold, packed best-fit (as training packs them), the first rows taken
        count = rows_needed * args.seq * 2 // (args.min_len + args.max_len)
        while True:
            lengths = rng.integers(args.min_len, args.max_len + 1, size=count)
            offsets, flat = pack(np.arange(count), lengths, args.seq)
            if len(offsets) - 1 >= rows_needed:
                break
            count += max(count // 20, 1)
        rows = [flat[offsets[r]:offsets[r + 1]] for r in range(rows_needed)]
    else:
        lengths = np.full(rows_needed, args.seq)
        rows = [np.array([r]) for r in range(rows_needed)]
    store = RandomSamples(lengths, vocab, seed=1)
    input_ids, labels, positions, real = materialize(store, rows, args.seq, pad_id=0)
    batches = micro_batches(input_ids, labels, args.micro, 0, 1, positions)
    return batches, int(real.sum())


def measure(args, hf_config, variant: str, device: torch.device) -> dict:
    """Forward + backward of every micro batch, timed after ``--warmup`` rounds; the variant's figures."""
    from pipellm.models.attention import AttentionOptions

    packed = variant != "fixed"
    options = AttentionOptions(use_flash_attn=args.flash, packed=packed,
                               backend="flex" if variant == "packed-flex" else "sdpa")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    layers = harness.stage_layers(hf_config, options, device, dtype, grad_ckpt=args.grad_ckpt,
                                  compiled=not args.eager and device.type == "cuda")
    batches, real_tokens = micro_batch_rows(args, hf_config.vocab_size, packed)
    batches = harness.on_device(batches, device)
    for _ in range(args.warmup):
        harness.forward_backward(layers, batches)
    seconds = []
    for _ in range(args.steps):
        harness.sync(device)
        start = time.perf_counter()
        harness.forward_backward(layers, batches)
        harness.sync(device)
        seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    positions = args.micro * args.micro_batches * args.seq
    return {"status": "ok", "real_tokens_per_sec": real_tokens / median, "fill": real_tokens / positions,
            "ms_per_micro_batch": median / args.micro_batches * 1e3}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_stage_arguments(parser, preset="7b")
    parser.add_argument("--min-len", type=int, default=None, help="shortest packed sample (default: seq / 16)")
    parser.add_argument("--max-len", type=int, default=None, help="longest packed sample (default: seq / 2)")
    parser.add_argument("--steps", type=int, default=5, help="timed rounds (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (compile, allocator)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated of {', '.join(VARIANTS)}")
    parser.add_argument("--flash", action="store_true", help="use_flash_attn (flash-attn's varlen kernel if "
                                                             "installed serves packed rows before the backend)")
    parser.add_argument("--grad-ckpt", action="store_true", help="use_grad_ckpt")
    parser.add_argument("--eager", action="store_true", help="no torch.compile of the decoder layers on GPUs")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--out", default=str(harness.REPO / "benchmarks" / "results" / "packing"))
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, a few tokens: the machinery only")
    args = parser.parse_args(argv)
    if args.smoke:
        args.preset, args.layers, args.seq, args.micro, args.micro_batches = "tiny", 1, 64, 2, 1
        args.steps, args.warmup, args.dtype = 1, 1, "fp32"
    args.min_len = args.min_len or max(args.seq // 16, 1)
    args.max_len = args.max_len or max(args.seq // 2, args.min_len)
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown or not 1 <= args.min_len <= args.max_len <= args.seq:
        parser.error(f"--variants {sorted(unknown)} unknown" if unknown else
                     f"need 1 <= --min-len {args.min_len} <= --max-len {args.max_len} <= --seq {args.seq}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    hf_config = harness.llama_config(args.preset, args.layers, args.seq)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    common = {"preset": args.preset, "layers": hf_config.num_hidden_layers, "seq": args.seq, "micro": args.micro,
              "micro_batches": args.micro_batches, "dtype": args.dtype, "device": harness.gpu_name() or "cpu",
              "compiled": not args.eager and device.type == "cuda"}
    rows = []
    for variant in args.variants.split(","):
        if variant == "packed-flex" and device.type == "cpu":
            row = {"status": "skipped", "reason": "FlexAttention has no backward on CPU"}
        else:
            row = measure(args, hf_config, variant, device)
        rows.append({"variant": variant, **common, **row})
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"{variant}: {row}", flush=True)
    fixed = next((r for r in rows if r["variant"] == "fixed" and r["status"] == "ok"), None)
    for row in rows:
        if fixed and row["status"] == "ok":
            row["vs_fixed"] = row["real_tokens_per_sec"] / fixed["real_tokens_per_sec"]
    write_results(Path(args.out), rows, argv)


def write_results(out: Path, rows: list[dict], argv) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    import transformers

    env = {"device": rows[0]["device"], "torch": torch.__version__, "cuda": torch.version.cuda,
           "transformers": transformers.__version__}  # no DeepSpeed here: the stage runs without its engine
    lines = ["# Packed vs fixed-length rows, one stage", "",
             f"`python benchmarks/packing_speed.py {' '.join(argv if argv is not None else sys.argv[1:])}`; "
             f"{env['device']}, torch {env['torch']}, CUDA {env['cuda']}, transformers {env['transformers']}; "
             f"forward + backward of {rows[0]['micro_batches']} micro batches of {rows[0]['micro']} x "
             f"{rows[0]['seq']} tokens, median of the timed rounds; real tokens count, padding not.", "",
             "| variant | real tokens/s | fill | ms / micro batch | vs fixed |", "| --- | --- | --- | --- | --- |"]
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"| {row['variant']} | {row['status']}: {row['reason']} | | | |")
            continue
        ratio = f"{row['vs_fixed']:.1%}" if "vs_fixed" in row else "n/a"
        lines.append(f"| {row['variant']} | {row['real_tokens_per_sec']:,.0f} | {row['fill']:.1%} | "
                     f"{row['ms_per_micro_batch']:.2f} | {ratio} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
