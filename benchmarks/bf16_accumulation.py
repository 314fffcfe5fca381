"""How much a bf16 gradient-accumulation buffer loses against an fp32 one, by the number of micro batches.

    python benchmarks/bf16_accumulation.py --out benchmarks/results/bf16_accumulation_cpu   # CPU, about a minute

DeepSpeed's bf16 optimizer (pipeline training, ZeRO-0) sums each micro batch's bf16 gradient into a bf16 buffer
(``data_types.grad_accum_dtype`` defaults to the model's dtype; fp32 needs ZeRO-1 and ``grad_accum_dtype: fp32``).
Every addition rounds the running sum to bf16's 8 significant bits, so the error grows with the number of micro
batches a step sums. This script measures it: a llama-shaped model (``harness`` presets, random weights, bf16) runs
forward and backward on each of ``--micro-batches`` micro batches of Zipf-distributed tokens; each micro batch's bf16
gradients (what autograd gives DeepSpeed) are summed in a bf16 buffer and in an fp32 buffer, one micro batch at a
time as the optimizer's ``add_`` does, and both are compared with their exact sum (fp64) after 1, 2, 4, ... micro
batches. Figures: the relative error ``||buffer - exact|| / ||exact||`` over all parameters together, the largest
per-tensor relative error, and for scale the sum's sampling noise: the standard error that the micro batches' own
spread around their mean puts on their sum, relative to its norm (what any batch of that size already carries).
Writes ``results.csv``, ``results.md`` and, with matplotlib, ``errors.png``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import harness


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for results.csv/.md, errors.png")
    parser.add_argument("--preset", choices=harness.PRESETS, default="tiny")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the preset's)")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--micro", type=int, default=2, help="rows per micro batch")
    parser.add_argument("--micro-batches", type=int, default=64, help="the most micro batches summed")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    from pipellm.data.batches import micro_batches
    from pipellm.models.attention import AttentionOptions

    args = parse_args(argv)
    torch.manual_seed(0)
    hf_config = harness.llama_config(args.preset, args.layers, args.seq)
    layers = harness.stage_layers(hf_config, AttentionOptions(), torch.device("cpu"), torch.bfloat16,
                                  compiled=False)
    params = [p for layer in layers for p in layer.parameters()]
    generator = torch.Generator().manual_seed(0)
    # Zipf-distributed tokens, as words are: the micro batches share a direction (learning the token frequencies),
    # as real text's do; uniform random tokens would give gradients that are almost only noise.
    zipf = 1.0 / torch.arange(1, hf_config.vocab_size - 3, dtype=torch.float64)
    input_ids = 4 + torch.multinomial(zipf, args.micro * args.micro_batches * args.seq, replacement=True,
                                      generator=generator).view(args.micro * args.micro_batches, args.seq)
    buffers = {"bf16": [torch.zeros_like(p) for p in params],
               "fp32": [torch.zeros_like(p, dtype=torch.float32) for p in params]}
    exact = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    squares = 0.0  # the sum of each micro batch's squared gradient norm, for the sampling noise
    rows, report_at = [], {2 ** k for k in range(args.micro_batches.bit_length())} | {args.micro_batches}
    for count, batch in enumerate(micro_batches(input_ids, input_ids.clone(), args.micro, 0, 1), start=1):
        for p in params:
            p.grad = None
        harness.forward_backward(layers, [batch])
        for i, p in enumerate(params):
            grad = p.grad.double()
            squares += float(grad.square().sum())
            exact[i] += grad
            for buffer in buffers.values():
                buffer[i].add_(p.grad.to(buffer[i].dtype))
        if count in report_at:
            exact_square = float(sum(e.square().sum() for e in exact))  # the exact sum's squared norm
            rows.append({"micro_batches": count, **errors(buffers, exact, exact_square),
                         "sampling_noise": noise(exact_square, squares, count)})
            print(rows[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    harness.write_rows(out / "results.csv", list(rows[0]), rows)
    write_markdown(out / "results.md", args, argv, hf_config, sum(p.numel() for p in params), rows)
    plot(rows, out / "errors.png")
    print((out / "results.md").read_text())


def errors(buffers: dict, exact: list, exact_square: float) -> dict:
    """Per buffer: the relative error of all parameters together, and the largest of one tensor."""
    figures = {}
    for name, buffer in buffers.items():
        diffs = [b.double() - e for b, e in zip(buffer, exact)]
        figures[f"{name}_relative_error"] = float(sum(d.square().sum() for d in diffs)) ** 0.5 / exact_square ** 0.5
        figures[f"{name}_worst_tensor"] = max(float(d.norm() / e.norm()) for d, e in zip(diffs, exact)
                                              if e.norm() > 0)
    return figures


def noise(exact_square: float, squares: float, count: int) -> float | None:
    """The standard error of a sum of ``count`` micro batches' gradients from their spread (sample variance
    around their mean, all parameters), relative to the sum's norm; None for one micro batch."""
    if count < 2:
        return None
    spread = (squares - exact_square / count) / (count - 1)
    return (count * spread) ** 0.5 / exact_square ** 0.5


def write_markdown(path: Path, args, argv, hf_config, n_params: int, rows: list[dict]) -> None:
    lines = ["# bf16 against fp32 gradient accumulation", "",
             f"`python benchmarks/bf16_accumulation.py {' '.join(argv if argv is not None else sys.argv[1:])}`; "
             f"torch {torch.__version__}, CPU; llama `{args.preset}` shape ({hf_config.num_hidden_layers} layers, "
             f"hidden {hf_config.hidden_size}, {n_params:,} parameters), bf16 weights, Zipf-distributed tokens, "
             f"micro batch {args.micro} x {args.seq}. Each micro batch's bf16 gradients summed one after another into "
             "a bf16 and an fp32 buffer, against their exact (fp64) sum.", "",
             "| micro batches | bf16 buffer: relative error | worst tensor | fp32 buffer: relative error | "
             "worst tensor | sampling noise of the sum |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['micro_batches']} | {r['bf16_relative_error']:.2e} | {r['bf16_worst_tensor']:.2e} | "
              f"{r['fp32_relative_error']:.2e} | {r['fp32_worst_tensor']:.2e} | "
              f"{'-' if r['sampling_noise'] is None else format(r['sampling_noise'], '.2e')} |" for r in rows]
    lines += ["", "Relative error: ||buffer - exact|| / ||exact|| over all parameters; worst tensor: the largest "
              "of the same ratio for one parameter tensor. bf16 keeps 8 significant bits (a rounding error of up "
              "to 2^-9 = 1.95e-03 of a value per addition). Sampling noise: sqrt(n s^2) / ||sum||, s^2 the micro "
              "batches' sample variance around their mean (summed over all parameters), n micro batches."]
    path.write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: no plot")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    counts = [r["micro_batches"] for r in rows]
    for name in ("bf16", "fp32"):
        ax.plot(counts, [r[f"{name}_relative_error"] for r in rows], marker="o", label=f"{name} buffer")
    ax.set(xscale="log", yscale="log", xlabel="micro batches summed", ylabel="relative error of the sum",
           title="Gradient accumulation: bf16 against fp32 buffer")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
