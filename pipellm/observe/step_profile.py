"""Where a training step's time goes (``profile_steps``): ``torch.profiler`` over chosen steps, kernels by kind.

With ``profile_steps: [first, last]`` every rank records steps ``first`` to ``last`` (1-based, inclusive) and, after
step ``last`` (or when the run ends earlier), writes to ``save_path/profile/``:

* ``rank<r>.trace.json``: the Chrome trace of those steps (open it in https://ui.perfetto.dev or chrome://tracing);
* ``rank<r>.kinds.md`` and ``.csv``: the device time of every kernel (on CPU: every operator's self time) summed
  by kind (``KINDS``: matmul, attention, compiled elementwise, loss, copies, collectives, other) per step, each
  kind's share of the steps' wall time, and the idle time no kernel covers (the host's launches, syncs, waits for
  other stages), then the 20 longest kernels;
* ``rank<r>.kernels.csv``: the 40 longest kernels (summed over their calls), with kind, time and calls per step.

Profiling costs time in the steps it records, so the metrics of those steps are slower than the run's; it is off
by default. ``benchmarks/stage_profile.py`` uses the same sorting on a stage without DeepSpeed's engine.
"""
from __future__ import annotations

import contextlib
import csv
import os
import re
import time
from pathlib import Path

import torch

from pipellm.files import atomic_path, write_text_atomically

KINDS = (
    ("attention", re.compile(r"flash|fmha|attention|sdpa", re.IGNORECASE)),
    ("matmul", re.compile(r"gemm|nvjet|cutlass|xmma|wgmma|cublas|aten::(mm|bmm|addmm|matmul)$", re.IGNORECASE)),
    ("collectives and p2p", re.compile(r"nccl|gloo|c10d::|record_param_comms", re.IGNORECASE)),
    ("loss (softmax, cross entropy)", re.compile(r"softmax|nll_loss|cross_entropy|logsumexp", re.IGNORECASE)),
    ("fused elementwise (compiled)", re.compile(r"^triton_")),
    ("copy, cast, fill", re.compile(r"copy|memcpy|memset|fill|aten::(to|cat|zero_)$", re.IGNORECASE)),
    ("other elementwise and reductions", re.compile(r".")),
)
"""(kind, pattern) in order: a kernel is the first kind whose pattern its name matches (attention before matmul,
whose patterns some attention kernels' names also match)."""
IDLE = "idle (no kernel running)"
FIELDS = ("kind", "ms_per_step", "share_of_wall", "kernels_per_step")
KERNEL_FIELDS = ("kernel", "kind", "ms_per_step", "calls_per_step")


def kind_of(name: str) -> str:
    return next(kind for kind, pattern in KINDS if pattern.search(name))


def kernel_times(prof, on_gpu: bool) -> tuple[list[tuple[str, float]], float]:
    """``(name, microseconds)`` of every GPU kernel (without GPUs: every operator's self time) in ``prof``'s
    events, and the time the device was busy: the union of the kernels' intervals (kernels on several streams
    overlap; on CPU, the sum)."""
    if not on_gpu:
        times = [(e.name, e.self_cpu_time_total) for e in prof.events() if e.self_cpu_time_total > 0]
        return times, sum(us for _, us in times)
    # A ``record_function`` range (``Optimizer.step#AdamW.step``) is also put on the GPU's timeline, spanning the
    # kernels it launched: counted, it would count them twice and their gaps as busy.
    kernels = sorted(((e.name, e.time_range.start, e.time_range.end) for e in prof.events()
                      if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation),
                     key=lambda k: k[1])
    busy, reach = 0.0, float("-inf")
    for _, start, end in kernels:
        if end > reach:
            busy += end - max(start, reach)
            reach = end
    return [(name, end - start) for name, start, end in kernels], busy


def kinds_table(kernels: list[tuple[str, float]], busy_us: float, wall_us: float, steps: int) -> list[dict]:
    """Per kind (in ``KINDS`` order, kinds without kernels left out) and for the idle time: milliseconds per step,
    share of the wall time, kernels per step. Kinds on several streams overlap: shares may sum past 1."""
    per_kind = {kind: [0.0, 0] for kind, _ in KINDS}
    for name, us in kernels:
        per_kind[kind_of(name)][0] += us
        per_kind[kind_of(name)][1] += 1
    idle_us = max(wall_us - busy_us, 0.0)
    rows = [(kind, us, count) for kind, (us, count) in per_kind.items() if count] + [(IDLE, idle_us, 0)]
    return [{"kind": kind, "ms_per_step": us / steps / 1e3, "share_of_wall": us / wall_us,
             "kernels_per_step": round(count / steps)} for kind, us, count in rows]


def longest_kernels(kernels: list[tuple[str, float]], steps: int, count: int = 40) -> list[dict]:
    """The ``count`` kernels (by name, all their calls summed) with the most time per step, longest first."""
    per_name: dict[str, list] = {}
    for name, us in kernels:
        entry = per_name.setdefault(name, [0.0, 0])
        entry[0] += us
        entry[1] += 1
    longest = sorted(per_name.items(), key=lambda item: -item[1][0])[:count]
    return [{"kernel": name, "kind": kind_of(name), "ms_per_step": us / steps / 1e3, "calls_per_step": calls / steps}
            for name, (us, calls) in longest]


def markdown_table(rows: list[dict], unit: str) -> list[str]:
    lines = [f"| kind | ms / {unit} | share of wall time | kernels / {unit} |", "| --- | --- | --- | --- |"]
    return lines + [f"| {r['kind']} | {r['ms_per_step']:.1f} | {r['share_of_wall']:.1%} | {r['kernels_per_step']} |"
                    for r in rows]


def markdown_kernels(rows: list[dict], unit: str) -> list[str]:
    lines = [f"| kernel | kind | ms / {unit} | calls / {unit} |", "| --- | --- | --- | --- |"]
    return lines + [f"| `{r['kernel'][:90]}` | {r['kind']} | {r['ms_per_step']:.1f} | {round(r['calls_per_step'])} |"
                    for r in rows]


def write_csv(path: Path, fields: tuple[str, ...], rows: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(rows)


class StepProfiler:
    """Records the steps of ``window`` (``(first, last)``, 1-based; None: off) and writes what it saw after the
    last of them; the training loop wraps every step in ``step(done)`` and calls ``close()`` when the run ends."""

    def __init__(self, save_path: str | Path, window: tuple[int, int] | None):
        self.directory = Path(save_path) / "profile"
        self.window = window
        self.rank = int(os.environ.get("RANK", "0"))
        self.profiler, self.wall_s, self.recorded = None, 0.0, 0

    @contextlib.contextmanager
    def step(self, done: int):
        """Step ``done`` (1-based) runs inside; recorded when it falls in the window."""
        if self.window is None or not self.window[0] <= done <= self.window[1]:
            yield
            return
        if self.profiler is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.start()
        started = time.perf_counter()
        yield
        self.wall_s += time.perf_counter() - started  # the step ends with its loss on the host: no kernel in flight
        self.recorded += 1
        if done == self.window[1]:
            self.close()

    def close(self) -> None:
        """Stop recording and write the files (once; nothing when no step was recorded)."""
        if self.profiler is None:
            return
        profiler, self.profiler, self.window = self.profiler, None, None
        profiler.stop()
        with atomic_path(self.directory / f"rank{self.rank}.trace.json") as tmp:
            profiler.export_chrome_trace(str(tmp))
        kernels, busy_us = kernel_times(profiler, torch.cuda.is_available())
        rows = kinds_table(kernels, busy_us, self.wall_s * 1e6, self.recorded)
        longest = longest_kernels(kernels, self.recorded)
        write_csv(self.directory / f"rank{self.rank}.kinds.csv", FIELDS, rows)
        write_csv(self.directory / f"rank{self.rank}.kernels.csv", KERNEL_FIELDS, longest)
        write_text_atomically(self.directory / f"rank{self.rank}.kinds.md", "\n".join([
            f"# Rank {self.rank}: {self.recorded} step(s) profiled, {self.wall_s / self.recorded * 1e3:.1f} ms each",
            "", *markdown_table(rows, "step"), "",
            "Kinds on several streams overlap: shares may sum past 100%. The trace: "
            f"rank{self.rank}.trace.json (https://ui.perfetto.dev).", "", "## Longest kernels", "",
            *markdown_kernels(longest[:20], "step")]) + "\n")
