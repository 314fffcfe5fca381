"""Peak memory of the last stage's output projection + loss, forward and backward: whole micro batch vs chunks.

    python benchmarks/loss_memory.py --tokens 2048,8192,16384 --vocab 32000 --hidden 512 --chunk 1024

Each point runs in a fresh process: the head's weight and the hidden states are made, then one
``token_mean_loss`` forward + backward as the pipeline runs it (``pipellm.pipeline.loss``, with and without
``loss_chunk_tokens``). Peak memory above what was allocated before the pass: the CUDA allocator's peak on a
GPU, the process's peak resident set (Linux) on CPU. The logits' share does not depend on ``--hidden`` (a small
hidden size keeps the CPU run short); the weight gradient's does. Writes ``--csv`` and prints a table.
"""
from __future__ import annotations

import argparse
import csv
import multiprocessing
import os
import platform
import resource
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def _peak_bytes(queue, tokens: int, vocab: int, hidden_size: int, chunk: int | None, dtype: str) -> None:
    sys.path.insert(0, str(REPO))
    from pipellm.pipeline.loss import HeadOutput, token_mean_loss

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    weight = torch.randn(vocab, hidden_size, device=device, dtype=getattr(torch, dtype), requires_grad=True)
    hidden = torch.randn(1, tokens, hidden_size, device=device, dtype=weight.dtype, requires_grad=True)
    targets = torch.randint(0, vocab, (1, tokens), device=device)
    labels = (targets, torch.tensor(1.0 / tokens, device=device))
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:  # the resident set now; the pass's peak is the process's high-water mark after it
        before = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    outputs = (HeadOutput(logits=torch.nn.functional.linear(hidden, weight)) if chunk is None
               else HeadOutput(hidden=hidden, weight=weight))
    token_mean_loss(outputs, labels, chunk).backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    queue.put((peak, torch.cuda.get_device_name() if device == "cuda" else "cpu"))


def measure(tokens: int, vocab: int, hidden_size: int, chunk: int | None, dtype: str) -> tuple[int, str]:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_peak_bytes, args=(queue, tokens, vocab, hidden_size, chunk, dtype))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="2048,8192,16384", help="comma-separated tokens per micro batch")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=1024, help="loss_chunk_tokens of the chunked runs")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--csv", default=str(REPO / "benchmarks" / "results" / "loss_memory.csv"))
    args = parser.parse_args()

    rows = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        whole, device = measure(tokens, args.vocab, args.hidden, None, args.dtype)
        chunked, _ = measure(tokens, args.vocab, args.hidden, args.chunk, args.dtype)
        rows.append({"tokens": tokens, "vocab": args.vocab, "hidden": args.hidden, "dtype": args.dtype,
                     "loss_chunk_tokens": args.chunk, "whole_peak_gib": round(whole / 2**30, 3),
                     "chunked_peak_gib": round(chunked / 2**30, 3), "device": device, "host": platform.node()})
        row = rows[-1]
        print(f"{tokens:>7} tokens x {args.vocab} vocab ({args.dtype}, hidden {args.hidden}, {device}): "
              f"whole {row['whole_peak_gib']:.3f} GiB, chunks of {args.chunk} {row['chunked_peak_gib']:.3f} GiB",
              flush=True)
    path = Path(args.csv)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
