"""Where one pipeline stage's time goes: its kernels grouped by kind, and the GPU's idle time (issue 15's 62% MFU).

    python benchmarks/stage_profile.py --preset 7b-16 --seq 2048 --micro 2 --out benchmarks/results/stage_profile_h200
    python benchmarks/stage_profile.py --smoke --out /tmp/stage_profile      # CPU, tiny model: the machinery only

The stage is ``packing_speed.py``'s ``fixed`` one: the whole model (embedding, the decoders, final norm, head and
loss) as one stage of pipellm's own modules, compiled on GPUs (``--eager``: not), random weights, full rows of one
sample each (no padding). After ``--warmup`` rounds, ``--steps`` rounds of forward + backward over
``--micro-batches`` micro batches run under ``torch.profiler``. No optimizer step and no DeepSpeed engine: compare
the tokens/s here with ``stage_levers.py``'s baseline on the same card for what the engine and AdamW cost.

Every GPU kernel (on CPU, every operator's self time) is sorted by kind as ``profile_steps`` sorts a training step's
(``pipellm.observe.step_profile.KINDS``). Reported per round: each kind's time and share of the wall time, the idle
time (wall time no kernel covers: the host's launches and syncs), and

* matmul throughput = 6 x (N - N_embedding) x tokens / matmul time: what the GEMMs achieve, against the peak;
* MFU = tokens/s x (6 (N - N_embedding) + 12 L d S) / peak (``harness.MFU_FORMULA``, without the optimizer).

Writes ``results.csv`` (one line per kind), ``kernels.csv`` (the 40 longest kernels), ``results.md`` (tables,
machine, versions, command) and ``breakdown.png`` (with matplotlib) to ``--out``; ``--trace`` adds the profiled
rounds' Chrome trace.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import harness
from pipellm.observe.metrics import device_peak_flops
from pipellm.observe.step_profile import (FIELDS, KERNEL_FIELDS, kernel_times, kinds_table, longest_kernels,
                                          markdown_kernels, markdown_table)

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_stage_arguments(parser, preset="7b-16")
    parser.add_argument("--steps", type=int, default=2, help="profiled rounds")
    parser.add_argument("--warmup", type=int, default=2, help="unprofiled rounds first (compile, allocator)")
    parser.add_argument("--eager", action="store_true", help="no torch.compile of the decoder layers on GPUs")
    parser.add_argument("--flash", action="store_true", help="use_flash_attn")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--trace", action="store_true", help="also write trace.json (Chrome trace of all rounds)")
    parser.add_argument("--out", required=True, help="directory for results.csv/.md, kernels.csv, breakdown.png")
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, a few tokens: the machinery only")
    args = parser.parse_args(argv)
    if args.smoke:
        args.preset, args.layers, args.seq, args.micro, args.micro_batches = "tiny", 2, 64, 2, 2
        args.steps, args.warmup, args.dtype = 1, 1, "fp32"
    return args


def main(argv=None) -> None:
    from pipellm.data.batches import micro_batches
    from pipellm.models.attention import AttentionOptions

    args = parse_args(argv)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    hf_config = harness.llama_config(args.preset, args.layers, args.seq)
    layers = harness.stage_layers(hf_config, AttentionOptions(use_flash_attn=args.flash), device,
                                  torch.bfloat16 if args.dtype == "bf16" else torch.float32,
                                  compiled=not args.eager and device.type == "cuda")
    rows = args.micro * args.micro_batches
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(4, hf_config.vocab_size, (rows, args.seq), generator=generator)
    batches = harness.on_device(micro_batches(input_ids, input_ids.clone(), args.micro, 0, 1), device)
    for _ in range(args.warmup):
        harness.forward_backward(layers, batches)
    harness.sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            harness.forward_backward(layers, batches)
        harness.sync(device)
        wall_us = (time.perf_counter() - start) * 1e6  # all profiled rounds
    kernels, busy_us = kernel_times(prof, device.type == "cuda")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.trace:
        prof.export_chrome_trace(str(out / "trace.json"))
    table = kinds_table(kernels, busy_us, wall_us, args.steps)
    harness.write_rows(out / "results.csv", list(FIELDS), table)
    longest = longest_kernels(kernels, args.steps)
    harness.write_rows(out / "kernels.csv", list(KERNEL_FIELDS), longest)

    tokens = rows * args.seq
    n_params = sum(p.numel() for layer in layers for p in layer.parameters())
    n_embedding = hf_config.vocab_size * hf_config.hidden_size
    work = 6 * (n_params - n_embedding) + 12 * hf_config.num_hidden_layers * hf_config.hidden_size * args.seq
    device_name = harness.gpu_name() or "cpu"
    peak = device_peak_flops()
    matmul_s = next((r["ms_per_step"] for r in table if r["kind"] == "matmul"), 0) / 1e3
    figures = {"tokens_per_sec": tokens * args.steps / (wall_us / 1e6),
               "matmul_tflops": 6 * (n_params - n_embedding) * tokens / matmul_s / 1e12 if matmul_s else None}
    figures["mfu"] = figures["tokens_per_sec"] * work / peak if peak else None
    write_markdown(out / "results.md", args, argv, device_name, peak, table, longest, figures)
    plot(table, out / "breakdown.png", f"{device_name}: {args.preset}, {hf_config.num_hidden_layers} layers, "
         f"seq {args.seq}, micro {args.micro}, {'eager' if args.eager or device.type != 'cuda' else 'compiled'}")
    print((out / "results.md").read_text())


def write_markdown(path: Path, args, argv, device_name: str, peak, table: list[dict], longest: list,
                   figures: dict) -> None:
    import transformers

    matmul = f"{figures['matmul_tflops']:.1f} TFLOP/s" if figures["matmul_tflops"] else "n/a"
    mfu = f"{figures['mfu']:.1%} of {peak / 1e12:.0f} TFLOP/s" if figures["mfu"] else "n/a (no peak known)"
    lines = ["# Where one stage's time goes", "",
             f"`python benchmarks/stage_profile.py {' '.join(argv if argv is not None else sys.argv[1:])}`; "
             f"{device_name}, torch {torch.__version__}, CUDA {torch.version.cuda}, transformers "
             f"{transformers.__version__}; forward + backward of {args.micro_batches} micro batches of {args.micro} x "
             f"{args.seq} tokens per round, {args.steps} profiled rounds after {args.warmup} warm-up ones, no "
             f"optimizer step.", "",
             f"- tokens/s: {figures['tokens_per_sec']:,.0f} (under the profiler)",
             f"- MFU without the optimizer: {mfu}; tokens/s x (6 (N - N_embedding) + 12 L d S) / peak",
             f"- matmul throughput: {matmul}; 6 (N - N_embedding) x tokens / the matmul kernels' time", "",
             *markdown_table(table, "round")]
    lines += ["", "Kinds overlap when kernels run on several streams: shares may sum past 100%.", "",
              "## Longest kernels", "", *markdown_kernels(longest[:20], "round")]
    path.write_text("\n".join(lines) + "\n")


def plot(table: list[dict], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: no breakdown.png", flush=True)
        return
    figure, axis = plt.subplots(figsize=(8, 3.5))
    axis.barh([r["kind"] for r in table][::-1], [100 * r["share_of_wall"] for r in table][::-1], color="tab:blue")
    axis.set_xlabel("% of the wall time of a round (forward + backward)")
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
