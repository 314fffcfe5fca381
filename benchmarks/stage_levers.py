"""One pipeline stage with each speed lever off and on: which of them pay (issue 15, "a faster stage").

    python benchmarks/stage_levers.py --out benchmarks/results/stage_levers_h200     # one GPU, a 300 s budget
    python benchmarks/stage_levers.py --smoke --out /tmp/levers                        # CPU: the machinery only

The stage is ``run_pipeline.py --preset 7b-16 --stages 1 --seq 2048 --micro 2 --global-batch 32`` (issue 15's stage,
16 micro batches a step): llama-7B's shape with 16 decoder layers (``--layers auto``: 12 on a GPU of less than 100
GiB, where 16 layers' AdamW state does not fit), bf16, compiled layers, one process (no launcher). Each variant
(``VARIANTS``) is the baseline with some YAML keys changed (``speed``: ``pipellm.config.schema.Speed``;
``use_flash_attn``, ``compile_layers``, ``loss_chunk_tokens``), run as its own process on the same data, model seed
and steps; its "before" is the run it differs from by that one lever (the baseline, or ``eager`` for liger without
compiled layers). Figures are medians over the steps after the warm-up ones. Variants run in the order given, the
likeliest to pay first. The first run always starts; a later one is skipped (recorded as such) once the time left of
``--budget-s`` is under the median run so far (the first run pays the cold ``torch.compile``, whose cache serves the
rest), and a run still going when the budget is spent is killed (a timeout). Then ``combined`` runs the best variant
of each group (attention, loss, decoder, host, batch, grads) that beat the baseline by more than ``--keep-above``;
``baseline-again``, the baseline a second time, shows the noise. ``micro-4`` and ``micro-8`` double and quadruple
the micro batch at the same global batch (fewer micro batches): larger matmuls, fewer launches and gradient
additions, more activation memory. ``grad-deferred`` is DeepSpeed's default way of accumulating bf16 gradients
(``bf16.immediate_grad_update: false``: into the bf16 gradients first, then into the optimizer's accumulation buffer
after each micro batch's backward), against pipellm's default
(``pipellm.training.pipeline_engine.pipeline_deepspeed_config``).

Each variant's final loss is printed next to the baseline's: a lever changes rounding at most, never the training
(the kernels' equality is tested by ``tests/test_speed*.py``), so a loss that moves
by more than rounding after a few steps flags a lever that computes something else.

Writes ``results.csv``, ``results.md`` (table, machine, versions, MFU formula, command), ``levers.png`` and each
run's log and config under ``points/NAME/``, rewritten after every run so a run cut short keeps what it measured.
Without matplotlib (the GPU image) there is no plot: ``--replot --out DIR`` draws it later from ``results.csv``.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import harness

FIELDS = ["variant", "group", "versus", "status", "tokens_per_sec_per_gpu", "mfu", "gain_vs_before",
          "peak_mem_gib_per_gpu", "step_time_s", "timed_steps", "final_loss", "loss_diff_vs_baseline", "overrides",
          "reason", "log"]


@dataclasses.dataclass(frozen=True)
class Variant:
    group: str
    """``baseline``, ``attention``, ``loss``, ``decoder``, ``host``, ``batch`` or ``grads``: ``combined`` takes one
    winner per group."""
    overrides: dict
    """YAML keys set over the baseline's."""
    versus: str = "baseline"
    """The run it differs from by this one lever."""


VARIANTS = {
    "baseline": Variant("baseline", {}),
    "loss-compiled": Variant("loss", {"speed": {"loss_kernel": "compiled"}}),
    "loss-liger": Variant("loss", {"speed": {"loss_kernel": "liger"}}),
    "liger": Variant("decoder", {"speed": {"liger_kernels": True}}),
    "sdpa-cudnn": Variant("attention", {"speed": {"sdpa_backend": "cudnn"}}),
    "sdpa-flash": Variant("attention", {"speed": {"sdpa_backend": "flash"}}),
    "host-syncs": Variant("host", {"speed": {"fewer_host_syncs": True}}),
    "no-ds-timer": Variant("host", {"timers": {"throughput": {"enabled": False}}}),
    "flash": Variant("attention", {"use_flash_attn": True}),
    "loss-chunked": Variant("loss", {"loss_chunk_tokens": 4096}),
    "eager": Variant("decoder", {"compile_layers": False}),
    "liger-eager": Variant("decoder", {"compile_layers": False, "speed": {"liger_kernels": True}}, versus="eager"),
    "sdpa-efficient": Variant("attention", {"speed": {"sdpa_backend": "efficient"}}),
    "micro-4": Variant("batch", {"train_micro_batch_size_per_gpu": 4}),
    "micro-8": Variant("batch", {"train_micro_batch_size_per_gpu": 8}),
    "grad-deferred": Variant("grads", {"bf16": {"enabled": True, "immediate_grad_update": False}}),
    "baseline-again": Variant("baseline", {}),
}
GROUPS = ["baseline", "attention", "loss", "decoder", "host", "batch", "grads", "combined"]
"""Every variant's group, in the plot's colour order."""
COMMON_KEYS = {"use_tensorboard": False}
"""Set in every run: the figures come from ``metrics.jsonl``; event files would only cost time (and the package)."""
DEFAULT_ORDER = ("baseline,grad-deferred,sdpa-cudnn,host-syncs,loss-compiled,loss-liger,liger,sdpa-flash,"
                 "no-ds-timer,loss-chunked,eager,liger-eager,sdpa-efficient,micro-4,micro-8,baseline-again")
"""The likeliest to pay first: the budget may end the list early."""
SMOKE = {"preset": "tiny", "layers": "2", "seq": 32, "micro": 2, "global_batch": 4, "steps": 3, "warmup": 1,
         "dtype": "fp32", "variants": "baseline,loss-chunked", "combine": False}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for results.csv/.md, levers.png, points/")
    parser.add_argument("--preset", choices=harness.PRESETS, default="7b-16")
    parser.add_argument("--layers", default="auto",
                        help="decoder layers; auto: the preset's, 12 on a GPU of less than 100 GiB")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the figures (the compile's)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--variants", default=DEFAULT_ORDER, help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--combine", action=argparse.BooleanOptionalAction, default=True,
                        help="finish with `combined`: each group's best lever that paid")
    parser.add_argument("--keep-above", type=float, default=0.01, help="a lever pays above this gain (0.01: 1%%)")
    parser.add_argument("--budget-s", type=float, default=300, help="stop starting runs after this many seconds")
    parser.add_argument("--point-timeout", type=float, default=240)
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU: proves the machinery only")
    parser.add_argument("--replot", action="store_true",
                        help="only redraw --out's levers.png from its results.csv (e.g. on a machine with matplotlib)")
    if parser.parse_args(argv).smoke:  # the smoke settings are defaults: flags given still win
        parser.set_defaults(**SMOKE)
    args = parser.parse_args(argv)
    args.variants = args.variants.split(",")
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    return args


def decoder_layers(args) -> int:
    if args.layers != "auto":
        return int(args.layers)
    memory_mib = harness.gpu_query("memory.total")
    return 12 if memory_mib is not None and float(memory_mib) < 100 * 1024 else harness.PRESETS[args.preset][2]


def versions() -> dict:
    """Machine and versions, liger-kernel and triton included (absent: not installed)."""
    found = {}
    for package in ("liger-kernel", "triton"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "absent"
    return {**harness.environment(), **found}


def merged(*overrides: dict) -> dict:
    """YAML overrides one over the other; the ``speed`` sections are merged key by key."""
    out: dict = {}
    for override in overrides:
        for key, value in override.items():
            out[key] = {**out.get(key, {}), **value} if isinstance(value, dict) else value
    return out


def combination(rows: list[dict], keep_above: float) -> dict | None:
    """The overrides of each group's best variant that beat the baseline by more than ``keep_above``; None when
    no lever paid. A variant measured against another run (liger without compiled layers, against ``eager``)
    is no lever on the baseline and never joins."""
    best: dict[str, dict] = {}
    for row in rows:
        gain = row.get("gain_vs_before")
        if (row["status"] != "ok" or row["group"] == "baseline" or row["versus"] != "baseline" or gain is None
                or gain <= keep_above):
            continue
        if row["group"] not in best or gain > best[row["group"]]["gain_vs_before"]:
            best[row["group"]] = row
    if not best:
        return None
    return merged(*(VARIANTS[row["variant"]].overrides for row in best.values()))


class Levers:
    def __init__(self, args):
        self.args, self.out = args, Path(args.out)
        self.rows: list[dict] = []
        self.started, self.durations = time.monotonic(), []
        self.env = versions()
        self.command = "python " + shlex.join(sys.argv)
        self.layers = decoder_layers(args)
        self.work = Path(tempfile.mkdtemp(prefix="pipellm-levers-"))

    def run(self) -> None:
        args = self.args
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "environment.json").write_text(json.dumps({**self.env, "command": self.command}, indent=2) + "\n")
        print(f"{args.preset} with {self.layers} decoder layers, seq {args.seq}, micro {args.micro}, global batch "
              f"{args.global_batch}, {args.steps} steps ({args.warmup} warm-up), {args.dtype}; {harness.MFU_FORMULA}",
              flush=True)
        self.model_dir = harness.write_model(self.work, args.preset, self.layers)
        self.data = harness.write_data(self.work / "data.jsonl", args.global_batch * args.steps, args.seq)
        for name in args.variants:
            self.measure(name, VARIANTS[name])
        if args.combine:
            overrides = combination(self.rows, args.keep_above)
            if overrides is None:
                print("combined: no lever paid more than the noise threshold; not run", flush=True)
            else:
                self.measure("combined", Variant("combined", overrides))

    def measure(self, name: str, variant: Variant) -> None:
        args = self.args
        row = {"variant": name, "group": variant.group, "versus": "" if name == "baseline" else variant.versus,
               "overrides": json.dumps(variant.overrides, sort_keys=True)}
        left = args.budget_s - (time.monotonic() - self.started)
        # The median run, not the longest: the first one pays the cold torch.compile the others mostly reuse.
        if self.durations and left < statistics.median(self.durations):
            row.update(status="skipped", reason=f"time budget: {left:.0f}s left")
        else:
            print(f"[{time.monotonic() - self.started:5.0f}s] {name}: {row['overrides']} ...", flush=True)
            begin = time.monotonic()
            timeout = min(args.point_timeout, left) if self.durations else args.point_timeout
            outcome = harness.launch(self.point(variant), self.model_dir, self.data, self.out / "points" / name,
                                     args.warmup, timeout=timeout, launcher=False)
            self.durations.append(time.monotonic() - begin)
            row.update(status=outcome.status, reason=outcome.reason, log=str(outcome.log.relative_to(self.out)))
            if outcome.figures:
                row.update({k: v for k, v in outcome.figures.items() if k in FIELDS})
            self.compare(row)
            print(f"    {describe(row)} ({self.durations[-1]:.0f}s)", flush=True)
        self.rows.append(row)
        self.write()

    def point(self, variant: Variant) -> harness.Point:
        args = self.args
        return harness.Point("pipeline", args.seq, args.global_batch, args.micro, 1, args.steps, dtype=args.dtype,
                             extra=merged(COMMON_KEYS, variant.overrides))

    def find(self, name: str) -> dict | None:
        return next((r for r in self.rows if r["variant"] == name and r["status"] == "ok"), None)

    def compare(self, row: dict) -> None:
        """Gain in tokens/s over the "before" run, final loss against the baseline's."""
        before, baseline = self.find(row["versus"]), self.find("baseline")
        if row["status"] != "ok":
            return
        if before is not None:
            row["gain_vs_before"] = row["tokens_per_sec_per_gpu"] / before["tokens_per_sec_per_gpu"] - 1
        if baseline is not None:
            row["loss_diff_vs_baseline"] = row["final_loss"] - baseline["final_loss"]

    def write(self) -> None:
        harness.write_rows(self.out / "results.csv", FIELDS, self.rows)
        (self.out / "results.md").write_text(self.markdown())
        note = plot(self.rows, self.out / "levers.png", f"{self.env['device']}, {self.args.preset} "
                    f"({self.layers} layers), seq {self.args.seq}, micro {self.args.micro}")
        if note:
            print(note, flush=True)

    def markdown(self) -> str:
        args = self.args
        lines = [f"# Stage levers: {args.preset}-shaped llama, {self.layers} decoder layers, one {self.env['device']}",
                 "", f"One stage (`dims: [1, 1]`), seq {args.seq}, micro batch {args.micro}, global batch "
                 f"{args.global_batch}, {args.dtype}, compiled layers unless the variant says otherwise; median of "
                 f"{args.steps - args.warmup} steps after {args.warmup} warm-up steps. {harness.MFU_FORMULA}.", "",
                 "Versions: " + ", ".join(f"{k} {v}" for k, v in self.env.items() if k not in ("device", "host")),
                 "", f"Command: `{self.command}`", "",
                 "| variant | YAML over the baseline | status | tokens/s/GPU | MFU | vs before | peak GiB | final loss "
                 "(vs baseline) |", "|---|---|---|---|---|---|---|---|"]
        for row in self.rows:
            lines.append(f"| {row['variant']} | `{row['overrides']}` | {row['status']} | "
                         f"{fmt(row, 'tokens_per_sec_per_gpu', '{:.0f}')} | {fmt(row, 'mfu', '{:.1%}')} | "
                         f"{fmt(row, 'gain_vs_before', '{:+.1%}')} {'vs ' + row['versus'] if row['versus'] else ''} | "
                         f"{fmt(row, 'peak_mem_gib_per_gpu', '{:.1f}')} | {fmt(row, 'final_loss', '{:.4f}')} "
                         f"({fmt(row, 'loss_diff_vs_baseline', '{:+.4f}')}) |")
        failed = [r for r in self.rows if r["status"] != "ok"]
        if failed:
            lines += ["", "## Not measured", ""] + [f"- {r['variant']}: {r['status']} -- {r['reason']}"
                                                    + (f" (`{r['log']}`)" if r.get("log") else "") for r in failed]
        return "\n".join(lines) + "\n"


def fmt(row: dict, key: str, spec: str) -> str:
    value = row.get(key)
    return "-" if value is None or value == "" else spec.format(value)


def describe(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['status']}: {row['reason']}"
    mfu = "" if row.get("mfu") is None else f", MFU {row['mfu']:.1%}"
    gain = "" if row.get("gain_vs_before") is None else f", {row['gain_vs_before']:+.1%} vs {row['versus']}"
    return (f"{row['tokens_per_sec_per_gpu']:.0f} tokens/s/GPU{mfu}{gain}, peak {row['peak_mem_gib_per_gpu']:.1f} "
            f"GiB, final loss {row['final_loss']:.4f}")


def plot(rows: list[dict], path: Path, title: str) -> str | None:
    """tokens/s/GPU per variant, the baseline's as a line; a note when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return "no plot: matplotlib is not installed (pip install 'pipellm[plot]')"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    figure, axis = plt.subplots(figsize=(max(6, 0.8 * len(ok) + 2), 4.5))
    axis.bar([r["variant"] for r in ok], [r["tokens_per_sec_per_gpu"] for r in ok],
             color=[f"C{GROUPS.index(r['group'])}"
                    for r in ok])
    baseline = next((r for r in ok if r["variant"] == "baseline"), None)
    if baseline is not None:
        axis.axhline(baseline["tokens_per_sec_per_gpu"], color="black", linewidth=0.8, linestyle="--")
    axis.set_ylabel("tokens/s/GPU (real tokens)")
    axis.set_title(title)
    axis.tick_params(axis="x", rotation=45)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return None


def replot(out: Path) -> None:
    rows = list(csv.DictReader(open(out / "results.csv")))
    for row in rows:
        row["tokens_per_sec_per_gpu"] = float(row["tokens_per_sec_per_gpu"] or 0)
    device = json.loads((out / "environment.json").read_text())["device"]
    print(plot(rows, out / "levers.png", f"stage levers on {device}") or f"wrote {out / 'levers.png'}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.replot:
        return replot(Path(args.out))
    levers = Levers(args)
    try:
        levers.run()
    finally:
        shutil.rmtree(levers.work, ignore_errors=True)  # the synthetic model and data
    ok = sum(r["status"] == "ok" for r in levers.rows)
    print(f"done: {len(levers.rows)} variants, {ok} ok, in {time.monotonic() - levers.started:.0f}s; "
          f"{levers.out / 'results.md'}", flush=True)
    print((levers.out / "results.md").read_text(), flush=True)


if __name__ == "__main__":
    main()
