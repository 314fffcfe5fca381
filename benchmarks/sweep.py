"""Who wins where: pipellm's pipeline against DeepSpeed ZeRO-3 over max_seq_len, on a synthetic llama-shaped model.

    python benchmarks/sweep.py --out benchmarks/results/sweep_h200x2 --preset 7b --gpus 2 \\
        --seqs 512,2048,8192 --methods pipeline,pipeline-ckpt,zero3-mb1,zero3-best

Methods (each point is its own ``deepspeed`` launch, so one that fails cannot take the others down):

* ``pipeline``        ``train_ds.py``, one pipeline stage per GPU (layers compiled on GPUs, the default)
* ``pipeline-flash``  the same with ``use_flash_attn``
* ``pipeline-ckpt``   the same with ``use_grad_ckpt``
* ``pipeline-long``   the longest-sequence setting: ``use_flash_attn``, ``use_grad_ckpt`` and ``loss_chunk_tokens``
  4096 (the last stage never holds a whole micro batch's logits)
* ``zero3-mbN``       ``train_ds_zero.py``, ZeRO-3 over all GPUs at micro batch N per GPU (``zero3-mb1``, ...)
* ``zero3-best``      ZeRO-3 at the largest micro batch that fits: powers of two tried from the largest allowed
  (micro x seq <= ``--zero-max-tokens``, dividing the per-GPU rows) down; each failed try is kept in the CSV.
  A ZeRO-3 run already made at the same length and micro batch (as ``zero3-mbN`` or by the search) is reused.

``METHOD@S1+S2`` runs a method at those lengths only (``pipeline-ckpt@8192``).

Honesty rules: every method of one ``max_seq_len`` trains on the same data with the same global batch (so the same
tokens per step, ``--tokens-per-step``); figures are medians over the steps after ``--warmup`` warm-up steps; the
step time is wall-clock, pipeline bubbles included. A point that runs out of memory is recorded as OOM (from its
exit status and log) and the method is not tried at longer sequences. Results are rewritten after every point
(``results.csv``, ``results.md``, ``throughput_memory.png``) so a sweep cut short keeps what it measured.

``--smoke`` runs a tiny model on 2 CPU processes to prove the machinery (its numbers mean nothing).
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import time
from pathlib import Path

import harness

FIELDS = ["method", "seq", "global_batch", "micro", "gpus", "role", "status", "samples_per_sec",
          "tokens_per_sec_per_gpu", "mfu", "peak_mem_gib_per_gpu", "step_time_s", "timed_steps", "final_loss",
          "reason", "log"]
PIPELINE_METHODS = {"pipeline": {}, "pipeline-flash": {"flash": True}, "pipeline-ckpt": {"grad_ckpt": True},
                    "pipeline-long": {"flash": True, "grad_ckpt": True, "loss_chunk_tokens": 4096}}
ZERO_MICRO = re.compile(r"zero3-mb(\d+)$")
DEFAULT_SEQS = "256,512,1024,2048,4096,8192,16384,32768"
DEFAULT_METHODS = "pipeline,pipeline-flash,pipeline-ckpt,zero3-mb1,zero3-best"
# The measurements of plain DeepSpeed on 2 H200s, llama-7b shape, seq 2048: what pipellm must match.
REFERENCE_7B_2GPU = {"pipeline": 0.42, "zero3-mb1": 0.16, "zero3-mb4": 0.40}
SMOKE = {"preset": "tiny", "gpus": 2, "seqs": "32,64", "tokens_per_step": 256, "pipe_micro_tokens": 64,
         "zero_max_tokens": 128, "steps": 3, "warmup": 1, "dtype": "fp32"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for results.csv/.md, the plot, logs")
    parser.add_argument("--preset", choices=harness.PRESETS, default="7b")
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--seqs", default=DEFAULT_SEQS, help="comma-separated max_seq_len values")
    parser.add_argument("--methods", dest="methods_spec", default=DEFAULT_METHODS,
                        help="comma-separated, METHOD or METHOD@S1+S2; see the module docstring")
    parser.add_argument("--tokens-per-step", type=int, default=65536,
                        help="global batch = this / max_seq_len rows (at least one row per GPU)")
    parser.add_argument("--pipe-micro-tokens", type=int, default=4096,
                        help="pipeline micro batch = this / max_seq_len rows (at least 1)")
    parser.add_argument("--zero-max-tokens", type=int, default=16384,
                        help="zero3-best tries micro batches up to this many tokens (micro x max_seq_len)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the figures")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--point-timeout", type=float, default=900, help="seconds before a point is killed")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds for the whole sweep: a point is skipped once the longest one so far no "
                             "longer fits in what is left, and killed when the budget runs out")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 2 processes, CPU-sized defaults: "
                        + ", ".join(f"{k}={v}" for k, v in SMOKE.items()))
    if parser.parse_known_args(argv)[0].smoke:
        parser.set_defaults(**SMOKE)  # options given on the command line still win
    args = parser.parse_args(argv)
    args.seqs = [int(s) for s in str(args.seqs).split(",")]
    args.only = {}  # method -> the lengths it is restricted to
    args.methods = []
    for spec in args.methods_spec.split(","):
        method, _, lengths = spec.partition("@")
        if method not in PIPELINE_METHODS and method != "zero3-best" and not ZERO_MICRO.match(method):
            parser.error(f"unknown method {method!r}; use {', '.join(PIPELINE_METHODS)}, zero3-mbN or zero3-best")
        args.methods.append(method)
        if lengths:
            args.only[method] = {int(s) for s in lengths.split("+")}
    if args.steps <= args.warmup:
        parser.error("--steps must be larger than --warmup")
    return args


def global_batch(args, seq: int) -> int:
    rows = max(args.tokens_per_step // seq, args.gpus)
    return rows - rows % args.gpus


def pipeline_micro(args, seq: int, batch: int) -> int:
    micro = max(1, args.pipe_micro_tokens // seq)
    while batch % micro:
        micro -= 1
    return micro


class Sweep:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.rows: list[dict] = []
        self.started = time.monotonic()
        self.durations: list[float] = []
        self.env = harness.environment()
        self.command = "python " + shlex.join(sys.argv)
        self.model_dir = None

    # -- running ---------------------------------------------------------------------------------------------

    def run(self) -> None:
        args = self.args
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "environment.json").write_text(json.dumps({**self.env, "command": self.command}, indent=2) + "\n")
        print(harness.MFU_FORMULA, flush=True)
        self.model_dir = harness.write_model(self.out / "work", args.preset)
        for seq in args.seqs:
            batch = global_batch(args, seq)
            data = harness.write_data(self.out / "work" / f"data_{seq}.jsonl", batch * args.steps, seq)
            for method in args.methods:
                if seq not in args.only.get(method, {seq}):
                    continue
                if method == "zero3-best":
                    self.search_zero_micro(seq, batch, data)
                else:
                    self.measure(method, self.point(method, seq, batch), data, "point")

    def point(self, method: str, seq: int, batch: int, micro: int | None = None) -> harness.Point:
        args = self.args
        common = dict(seq=seq, global_batch=batch, gpus=args.gpus, steps=args.steps, dtype=args.dtype)
        if method in PIPELINE_METHODS:
            return harness.Point("pipeline", micro=pipeline_micro(args, seq, batch), **common,
                                 **PIPELINE_METHODS[method])
        match = ZERO_MICRO.match(method)
        return harness.Point("zero3", micro=micro or int(match.group(1)), **common)

    def measure(self, method: str, point: harness.Point, data: Path, role: str) -> dict:
        row = {"method": method, "seq": point.seq, "global_batch": point.global_batch, "micro": point.micro,
               "gpus": point.gpus, "role": role}
        earlier_oom = self.oom_seq(method)
        left = None if self.args.time_budget is None else self.args.time_budget - (time.monotonic() - self.started)
        same = self.same_zero_run(point)
        if same is not None:  # this very run was made already, under another method name
            row.update({k: v for k, v in same.items() if k not in row})
        elif earlier_oom is not None:
            row.update(status="OOM", reason=f"not run: OOM at max_seq_len {earlier_oom}")
        elif left is not None and left < max(self.durations, default=0):
            row.update(status="skipped", reason=f"time budget: {left:.0f}s left")
        else:
            name = f"{method}_s{point.seq}" + (f"_mb{point.micro}" if method == "zero3-best" else "")
            print(f"[{time.monotonic() - self.started:6.0f}s] {name}: global batch {point.global_batch}, micro "
                  f"{point.micro} ...", flush=True)
            begin = time.monotonic()
            # Never past the budget: a point still running when it is spent is killed and recorded as a timeout.
            timeout = self.args.point_timeout if left is None else min(self.args.point_timeout, left)
            outcome = harness.launch(point, self.model_dir, data, self.out / "points" / name, self.args.warmup,
                                     timeout=timeout)
            self.durations.append(time.monotonic() - begin)
            row.update(status=outcome.status, reason=outcome.reason, log=str(outcome.log.relative_to(self.out)))
            if outcome.figures:
                row.update({k: v for k, v in outcome.figures.items() if k in FIELDS})
            print(f"    {describe(row)} ({self.durations[-1]:.0f}s)", flush=True)
        self.rows.append(row)
        self.write()
        return row

    def search_zero_micro(self, seq: int, batch: int, data: Path) -> None:
        """Largest ZeRO-3 micro batch that fits: try from the largest allowed down, first success wins."""
        rows_per_gpu = batch // self.args.gpus
        candidates = [m for m in (2 ** k for k in range(rows_per_gpu.bit_length() - 1, -1, -1))
                      if rows_per_gpu % m == 0 and (m * seq <= self.args.zero_max_tokens or m == 1)]
        if self.oom_seq("zero3-best") is not None:
            candidates = [1]  # out of memory at a shorter length already: recorded as such, nothing tried
        for micro in candidates:
            row = self.measure("zero3-best", self.point("zero3-best", seq, batch, micro), data,
                               "point" if micro == 1 else "search")
            if row["status"] != "OOM":
                row["role"] = "point"
                self.write()
                return

    def same_zero_run(self, point: harness.Point) -> dict | None:
        if point.trainer != "zero3":
            return None
        return next((r for r in self.rows if r["method"].startswith("zero3") and r["seq"] == point.seq
                     and r["micro"] == point.micro and r.get("log")), None)

    def oom_seq(self, method: str) -> int | None:
        """The shortest max_seq_len at which ``method`` ran out of memory (it cannot fit longer ones)."""
        seqs = [r["seq"] for r in self.rows if r["method"] == method and r["status"] == "OOM" and r["role"] == "point"]
        return min(seqs, default=None)

    def find(self, method: str, seq: int) -> dict | None:
        return next((r for r in self.rows if r["method"] == method and r["seq"] == seq and r["role"] == "point"),
                    None)

    # -- reporting -------------------------------------------------------------------------------------------

    def write(self) -> None:
        harness.write_rows(self.out / "results.csv", FIELDS, self.rows)
        (self.out / "results.md").write_text(self.markdown())
        plot_note = plot(self.points(), self.out / "throughput_memory.png", self.env["device"])
        if plot_note:
            print(plot_note, flush=True)

    def points(self) -> list[dict]:
        return [r for r in self.rows if r["role"] == "point"]

    def markdown(self) -> str:
        args, points = self.args, self.points()
        seqs = [s for s in args.seqs if any(r["seq"] == s for r in points)]
        methods = [m for m in args.methods if any(r["method"] == m for r in points)]
        lines = [f"# max_seq_len sweep: {args.preset}-shaped llama on {args.gpus} x {self.env['device']}", "",
                 f"Global batch {args.tokens_per_step} tokens per step (rows = tokens / max_seq_len), the same for "
                 f"every method; {args.dtype}; median of {args.steps - args.warmup} steps after {args.warmup} "
                 f"warm-up steps; step time wall-clock, pipeline bubbles included. {harness.MFU_FORMULA}.", "",
                 "Versions: " + ", ".join(f"{k} {v}" for k, v in self.env.items() if k not in ("device", "host")),
                 "", f"Command: `{self.command}`", ""]
        tables = [("samples/s", "samples_per_sec", "{:.2f}"), ("tokens/s/GPU", "tokens_per_sec_per_gpu", "{:.0f}"),
                  ("MFU", "mfu", "{:.1%}"), ("peak memory GiB/GPU", "peak_mem_gib_per_gpu", "{:.1f}")]
        for title, key, fmt in tables:
            lines += [f"## {title}", "", "| method | " + " | ".join(str(s) for s in seqs) + " |",
                      "|---|" + "---|" * len(seqs)]
            for method in methods:
                cells = [cell(self.find(method, s), key, fmt) for s in seqs]
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
            lines.append("")
        lines += ["## Reading", "", *reading(points, methods, seqs, args), ""]
        failures = list({r["log"]: r for r in self.rows if r["status"] != "ok" and r.get("log")}.values())
        if failures:
            lines += ["## Failed runs", ""] + [f"- {r['method']} seq {r['seq']} micro {r['micro']}: {r['status']} "
                                               f"-- {r['reason']} (`{r['log']}`)" for r in failures] + [""]
        return "\n".join(lines)


def cell(row: dict | None, key: str, fmt: str) -> str:
    if row is None:
        return "-"
    if row["status"] != "ok":
        return row["status"]
    value = row.get(key)
    text = "n/a" if value is None else fmt.format(value)
    return text + (f" (mb {row['micro']})" if row["method"] == "zero3-best" else "")


def describe(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['status']}: {row['reason']}"
    mfu = "n/a" if row.get("mfu") is None else f"{row['mfu']:.1%}"
    return (f"{row['samples_per_sec']:.2f} samples/s, {row['tokens_per_sec_per_gpu']:.0f} tokens/s/GPU, MFU {mfu}, "
            f"peak {row['peak_mem_gib_per_gpu']:.1f} GiB/GPU")


def reading(points: list[dict], methods: list[str], seqs: list[int], args) -> list[str]:
    """A few sentences drawn from the table: who is fastest at each length, the ratio pipeline : ZeRO-3, and
    how far each method reaches before running out of memory."""
    ok = [r for r in points if r["status"] == "ok"]
    lines = []
    for seq in seqs:
        here = sorted((r for r in ok if r["seq"] == seq), key=lambda r: -r["tokens_per_sec_per_gpu"])
        if not here:
            continue
        text = f"- max_seq_len {seq}: fastest {label(here[0])}"
        best_pipe = next((r for r in here if r["method"].startswith("pipeline")), None)
        best_zero = next((r for r in here if r["method"].startswith("zero3")), None)
        if best_pipe and best_zero:
            ratio = best_pipe["tokens_per_sec_per_gpu"] / best_zero["tokens_per_sec_per_gpu"]
            text += f"; best pipeline / best ZeRO-3 = {ratio:.2f}x ({label(best_pipe)} vs {label(best_zero)})"
        lines.append(text + ".")
    for method in methods:
        fits = [r["seq"] for r in ok if r["method"] == method]
        oom = [r["seq"] for r in points if r["method"] == method and r["status"] == "OOM"]
        if fits or oom:
            lines.append(f"- {method}: runs up to max_seq_len {max(fits) if fits else 'none'}"
                         + (f", OOM from {min(oom)}" if oom else "") + ".")
    if args.preset == "7b" and args.gpus == 2 and 2048 in seqs:
        measured = {r["method"] if r["method"] != "zero3-best" else f"zero3-mb{r['micro']}": r["mfu"]
                    for r in ok if r["seq"] == 2048 and r["mfu"] is not None}
        compared = [f"{m} {measured[m]:.0%} (reference {ref:.0%})" for m, ref in REFERENCE_7B_2GPU.items()
                    if m in measured]
        if compared:
            lines.append("- Against the issue's plain-DeepSpeed references on 2 x H200 at max_seq_len 2048 (plain "
                         "PipelineModule 42%, ZeRO-3 16% at micro 1 and 40% at micro 4): " + ", ".join(compared) + ".")
    if not any(r["mfu"] is not None for r in ok):
        lines.append("- No MFU: the device's peak FLOP/s is unknown (CPU run); these numbers only prove the sweep "
                     "works.")
    return lines or ["- Nothing measured yet."]


def label(row: dict) -> str:
    mfu = "" if row["mfu"] is None else f", {row['mfu']:.0%} MFU"
    micro = f" mb {row['micro']}" if row["method"] == "zero3-best" else ""
    return f"{row['method']}{micro} ({row['tokens_per_sec_per_gpu']:.0f} tokens/s/GPU{mfu})"


def plot(points: list[dict], path: Path, device: str) -> str | None:
    """tokens/s/GPU and peak memory against max_seq_len, one line per method; OOM points marked on the x axis.
    Returns a note when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return "no plot: matplotlib is not installed (pip install 'pipellm[plot]')"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    methods = list(dict.fromkeys(r["method"] for r in points))
    for index, method in enumerate(methods):
        color = f"C{index}"
        ok = sorted((r for r in points if r["method"] == method and r["status"] == "ok"), key=lambda r: r["seq"])
        oom = [r["seq"] for r in points if r["method"] == method and r["status"] == "OOM"]
        for axis, key in zip(axes, ("tokens_per_sec_per_gpu", "peak_mem_gib_per_gpu")):
            axis.plot([r["seq"] for r in ok], [r[key] for r in ok], "o-", color=color, label=method)
            if oom:
                axis.plot(oom, [0] * len(oom), "x", color=color, markersize=10, clip_on=False)
    for axis, title in zip(axes, ("throughput (tokens/s/GPU)", "peak memory (GiB/GPU)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("max_seq_len")
        axis.set_title(title)
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:  # nothing to name before the first point that ran
        axes[0].legend(title="x on the axis: OOM")
    figure.suptitle(f"pipeline vs ZeRO-3 on {device}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return None


def main(argv=None) -> None:
    args = parse_args(argv)
    sweep = Sweep(args)
    sweep.run()
    ok = sum(r["status"] == "ok" for r in sweep.points())
    print(f"done: {len(sweep.points())} points, {ok} ok, in {time.monotonic() - sweep.started:.0f}s; "
          f"{sweep.out / 'results.md'}", flush=True)


if __name__ == "__main__":
    main()
