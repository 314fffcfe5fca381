"""``python -m pipellm.report SAVE_PATH [--out FILE.png]``: a run's training curves from ``metrics.jsonl``, one PNG.

Panels against the step: loss (and the eval loss where it was evaluated), learning rate, tokens/s/GPU, and MFU
when the run reported it (not on CPU). A step logged more than once (a run resumed from a checkpoint repeats the
steps after it) is drawn with its last record. Default output: ``SAVE_PATH/metrics.png``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipellm.errors import PipellmError
from pipellm.files import save_figure

# Panel title -> the record keys drawn in it.
PANELS = {"loss": ("loss", "eval_loss"), "learning rate": ("lr",), "tokens/s/GPU": ("tokens_per_sec_per_gpu",),
          "MFU": ("mfu",)}


def read_metrics(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` file, in file order."""
    if not path.is_file():
        raise PipellmError(f"{path} does not exist; pass a training save_path (it holds metrics.jsonl once a step "
                           f"has been logged) or the metrics.jsonl file itself")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise PipellmError(f"{path} line {number}: not valid JSON ({e.msg}); remove or fix the line") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise PipellmError(f"{path} line {number}: not a metrics record (a JSON object with an integer `step`); "
                               f"remove or fix the line")
        records.append(record)
    if not records:
        raise PipellmError(f"{path} holds no record yet; run at least `log_steps` steps first")
    return records


def curves(records: list[dict]) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """Panel title -> key -> (steps, values), the last record of each step, keys with no value left out."""
    latest = {record["step"]: record for record in records}
    steps = sorted(latest)
    panels = {}
    for title, keys in PANELS.items():
        lines = {}
        for key in keys:
            points = [(step, latest[step][key]) for step in steps if latest[step].get(key) is not None]
            if points:
                lines[key] = ([step for step, _ in points], [value for _, value in points])
        if lines:
            panels[title] = lines
    return panels


def draw(panels: dict, out: Path, title: str) -> None:
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import PercentFormatter
    except ImportError:
        raise PipellmError("the report needs matplotlib: pip install 'pipellm[plot]'") from None
    figure = Figure(figsize=(11, 3 * ((len(panels) + 1) // 2)))
    axes = figure.subplots((len(panels) + 1) // 2, 2, squeeze=False).ravel()
    for axis, (panel, lines) in zip(axes, panels.items()):
        for key, (steps, values) in lines.items():
            # Eval losses are sparse: points, not a line through them.
            axis.plot(steps, values, "o-" if key == "eval_loss" else "-", label=key, markersize=4)
        if panel == "MFU":
            axis.yaxis.set_major_formatter(PercentFormatter(1.0))
        axis.set(title=panel, xlabel="step")
        axis.grid(alpha=0.3)
        if len(lines) > 1:
            axis.legend()
    for axis in axes[len(panels):]:
        axis.set_visible(False)
    figure.suptitle(title)
    figure.tight_layout()
    save_figure(figure, out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipellm.report", description="Plot a run's training curves from its metrics.jsonl into one PNG.")
    parser.add_argument("save_path", type=Path, help="training save_path (or its metrics.jsonl)")
    parser.add_argument("--out", type=Path, help="PNG to write (default: SAVE_PATH/metrics.png)")
    args = parser.parse_args(argv)
    try:
        metrics = args.save_path if args.save_path.is_file() else args.save_path / "metrics.jsonl"
        out = args.out or metrics.with_name("metrics.png")
        records = read_metrics(metrics)
        draw(curves(records), out, str(metrics.parent))
    except PipellmError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"pipellm report: {len(records)} records of {metrics} -> {out}")


if __name__ == "__main__":
    main()
