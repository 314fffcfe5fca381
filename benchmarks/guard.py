"""Guard the measured figures: compare a fresh sweep with a committed one, and check the performance goals.

    python benchmarks/guard.py --results /tmp/sweep/results.csv \
        --baseline benchmarks/results/sweep_h200x2/results.csv [--goals]

Run it after ``benchmarks/sweep.py`` on the same kind of machine as the baseline (it is not a CI test: CPU
numbers mean nothing). Every (method, max_seq_len) point measured in both files is compared:

* **regression** when the new MFU is more than ``--mfu-tolerance`` (absolute, default 0.02) below the baseline's,
  or the new peak memory per GPU more than ``--memory-tolerance`` (relative, default 5%) above it, or a point
  that ran in the baseline now fails or runs out of memory.

With ``--goals`` it also reports the goals of the performance work (issue #8), each PASS, FAIL or NOT MEASURED:
pipeline MFU >= 55% at 2048 and 4096; pipeline samples/s >= 1.3x the best ZeRO-3 at 512, 2048 and 4096 with no
more peak memory per GPU; a pipeline method (plain or grad-checkpointed) trains at max_seq_len >= 32768.

The stage goals of issue 15, each PASS, FAIL or NOT MEASURED, from what the one-GPU benchmarks wrote:

    python benchmarks/guard.py --stage-levers benchmarks/results/stage_levers_h200/results.csv \
        --packing benchmarks/results/packing_h100/results.csv --zb-h1-costs 58.6,75.2,39.9 61.1,77.9,40.6

* one stage >= 62% MFU (``stage_levers.py``'s ``results.csv``, one per sequence length: its baseline and its best
  variant; ``--stage-runs``: ``run_pipeline.py``'s CSV files, the best one-stage run of each sequence length);
* packed rows with FlexAttention >= 97% of fixed-length rows' real tokens/s (``packing_speed.py``);
* ZB-H1's predicted step within 3% of the busiest stage's compute at ``--micro-batches`` (default 16), from
  measured F,B,W milliseconds per stage (``pipellm.plan.schedules``), holding at most 10% more micro batches at its
  peak than 1F1B.

Exit code 1 on any regression (and, with ``--require-goals``, on any goal not PASS); 0 otherwise.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

from sweep import PIPELINE_METHODS


def read_points(path: Path) -> dict[tuple[str, int], dict]:
    """The sweep's measured points (``role == point``) by (method, max_seq_len)."""
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist; pass the results.csv a sweep wrote")
    points = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            if row.get("role") == "point":
                points[(row["method"], int(row["seq"]))] = row
    return points


def _ok(row: dict | None) -> bool:
    return row is not None and row["status"] == "ok"


def regressions(new: dict, baseline: dict, mfu_tolerance: float, memory_tolerance: float) -> list[str]:
    """One line per point that got worse than the baseline."""
    found = []
    for key, old in sorted(baseline.items()):
        method, seq = key
        if not _ok(old) or key not in new:
            continue
        row = new[key]
        if not _ok(row):
            found.append(f"{method} @ {seq}: ran in the baseline, now {row['status']} ({row.get('reason', '')})")
            continue
        if float(row["mfu"]) < float(old["mfu"]) - mfu_tolerance:
            found.append(f"{method} @ {seq}: MFU {float(row['mfu']):.1%} < baseline {float(old['mfu']):.1%} "
                         f"- {mfu_tolerance:.0%}")
        if float(row["peak_mem_gib_per_gpu"]) > float(old["peak_mem_gib_per_gpu"]) * (1 + memory_tolerance):
            found.append(f"{method} @ {seq}: peak memory {float(row['peak_mem_gib_per_gpu']):.1f} GiB > baseline "
                         f"{float(old['peak_mem_gib_per_gpu']):.1f} GiB + {memory_tolerance:.0%}")
    return found


def goals(points: dict) -> list[tuple[str, str, str]]:
    """(goal, PASS | FAIL | NOT MEASURED, the figures) for each performance goal."""
    results = []
    for seq in (2048, 4096):
        row = points.get(("pipeline", seq))
        name = f"pipeline MFU >= 55% at {seq}"
        if not _ok(row):
            results.append((name, "NOT MEASURED", ""))
        else:
            mfu = float(row["mfu"])
            results.append((name, "PASS" if mfu >= 0.55 else "FAIL", f"{mfu:.1%}"))
    for seq in (512, 2048, 4096):
        pipe, zero = points.get(("pipeline", seq)), points.get(("zero3-best", seq))
        name = f"pipeline >= 1.3x best ZeRO-3 samples/s at {seq}, memory <= ZeRO-3's"
        if not _ok(pipe) or not _ok(zero):
            results.append((name, "NOT MEASURED", ""))
            continue
        speedup = float(pipe["samples_per_sec"]) / float(zero["samples_per_sec"])
        memory = (float(pipe["peak_mem_gib_per_gpu"]), float(zero["peak_mem_gib_per_gpu"]))
        passed = speedup >= 1.3 and memory[0] <= memory[1]
        results.append((name, "PASS" if passed else "FAIL",
                        f"{speedup:.2f}x, {memory[0]:.1f} vs {memory[1]:.1f} GiB"))
    trained = [seq for (method, seq), row in points.items() if method in PIPELINE_METHODS and _ok(row)]
    name = "a pipeline method trains at max_seq_len >= 32768"
    if not trained:
        results.append((name, "NOT MEASURED", ""))
    else:
        results.append((name, "PASS" if max(trained) >= 32768 else "FAIL", f"longest {max(trained)}"))
    return results


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist; pass the results.csv the benchmark wrote")
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def stage_goals(stage_levers: list[Path], packing: Path | None, zb_h1_costs: list[str] | None,
                micro_batches: int, stage_runs: list[Path] = ()) -> list[tuple[str, str, str]]:
    """(goal, PASS | FAIL | NOT MEASURED, the figures) for each goal of issue 15 given an input."""
    results = []
    # Each file named by its folder below the files' common one (``stage_levers_h100_global32/seq2048``).
    files = [*stage_levers, *stage_runs]
    common = Path(os.path.commonpath([p.parent.resolve() for p in files])) if len(files) > 1 else None
    folders = {p: str(p.parent.resolve().relative_to(common)) if common and p.parent.resolve() != common
               else p.parent.name for p in files}
    for path in stage_runs:
        by_seq: dict[int, list[dict]] = {}
        for row in read_rows(path):
            if int(row["stages"]) == 1 and row["mfu"]:
                by_seq.setdefault(int(row["seq"]), []).append(row)
        if not by_seq:  # no one-stage run with an MFU (a CPU run has none)
            results.append((f"one stage >= 62% MFU ({folders[path]}/{path.name})", "NOT MEASURED", ""))
        for seq, rows in sorted(by_seq.items()):
            best = max(rows, key=lambda r: float(r["mfu"]))
            results.append((f"one stage >= 62% MFU ({folders[path]}/{path.name}, seq {seq})",
                            "PASS" if float(best["mfu"]) >= 0.62 else "FAIL",
                            f"best {float(best['mfu']):.1%} of {len(rows)} run(s): micro batch {best['micro']}, "
                            f"{best['layers']} layers, YAML {best['yaml_json']}, {best['device']}"))
    for path in stage_levers:
        measured = {r["variant"]: float(r["mfu"]) for r in read_rows(path) if r["status"] == "ok" and r["mfu"]}
        name = f"one stage >= 62% MFU ({folders[path]})"
        if not measured:
            results.append((name, "NOT MEASURED", ""))
            continue
        best = max(measured, key=measured.get)
        baseline = f"baseline {measured['baseline']:.1%}, " if "baseline" in measured else ""
        results.append((name, "PASS" if measured[best] >= 0.62 else "FAIL", f"{baseline}best {best} "
                                                                           f"{measured[best]:.1%}"))
    if packing is not None:
        rows = {r["variant"]: r for r in read_rows(packing)}
        flex = rows.get("packed-flex")
        name = "packed rows (FlexAttention) >= 97% of fixed-length rows' real tokens/s"
        if flex is None or flex["status"] != "ok" or not flex.get("vs_fixed"):
            results.append((name, "NOT MEASURED", ""))
        else:
            ratio = float(flex["vs_fixed"])
            results.append((name, "PASS" if ratio >= 0.97 else "FAIL", f"{ratio:.1%}, fill {float(flex['fill']):.1%}"))
    if zb_h1_costs:
        from pipellm.plan.schedules import PassCosts, simulate

        costs = [PassCosts(*(float(x) for x in triple.split(","))) for triple in zb_h1_costs]
        zb, one_f_one_b = simulate("zb-h1", costs, micro_batches), simulate("1f1b", costs, micro_batches)
        ratio = zb.step_time / max(zb.busy)
        held, held_1f1b = max(zb.peak_held()), max(one_f_one_b.peak_held())
        passed = ratio <= 1.03 and held <= 1.1 * held_1f1b
        results.append((f"ZB-H1 predicted step <= 1.03x the busiest stage's compute, {micro_batches} micro batches, "
                        f"peak held <= 1F1B's + 10%", "PASS" if passed else "FAIL",
                        f"{ratio:.3f}x, {zb.step_time:.0f} ms; micro batches held {held} vs {held_1f1b}"))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, help="results.csv of the fresh sweep")
    parser.add_argument("--baseline", type=Path, help="results.csv of the committed sweep")
    parser.add_argument("--mfu-tolerance", type=float, default=0.02, help="allowed absolute MFU drop")
    parser.add_argument("--memory-tolerance", type=float, default=0.05, help="allowed relative memory rise")
    parser.add_argument("--goals", action="store_true", help="also report the performance goals")
    parser.add_argument("--require-goals", action="store_true", help="exit 1 unless every goal passes")
    stage = parser.add_argument_group("issue 15's stage goals")
    stage.add_argument("--stage-levers", type=Path, nargs="+", default=[], help="stage_levers.py results.csv files")
    stage.add_argument("--stage-runs", type=Path, nargs="+", default=[], help="run_pipeline.py CSV files")
    stage.add_argument("--packing", type=Path, help="packing_speed.py results.csv")
    stage.add_argument("--zb-h1-costs", nargs="+", metavar="F,B,W", help="ms per micro batch of each stage's passes")
    stage.add_argument("--micro-batches", type=int, default=16, help="micro batches per step for ZB-H1's goal")
    args = parser.parse_args(argv)
    if (args.results is None) != (args.baseline is None):
        parser.error("--results and --baseline go together")
    found, failed_goals = [], False
    for name, verdict, figures in stage_goals(args.stage_levers, args.packing, args.zb_h1_costs, args.micro_batches,
                                              args.stage_runs):
        print(f"  {verdict:<12} {name}" + (f" ({figures})" if figures else ""))
        failed_goals |= verdict != "PASS"
    if args.results is None:
        return 1 if args.require_goals and failed_goals else 0

    new, baseline = read_points(args.results), read_points(args.baseline)
    compared = sorted(key for key in new.keys() & baseline.keys() if _ok(baseline[key]))
    found = regressions(new, baseline, args.mfu_tolerance, args.memory_tolerance)
    print(f"{len(compared)} points compared with {args.baseline}: {len(found)} regression(s)")
    for line in found:
        print(f"  REGRESSION {line}")
    if args.goals or args.require_goals:
        for name, verdict, figures in goals(new):
            print(f"  {verdict:<12} {name}" + (f" ({figures})" if figures else ""))
            failed_goals |= verdict != "PASS"
    return 1 if found or (args.require_goals and failed_goals) else 0


if __name__ == "__main__":
    sys.exit(main())
