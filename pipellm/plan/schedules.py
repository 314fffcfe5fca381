"""The pipeline schedule simulator: each stage's order of passes, and the step time and bubble it gives.

A micro batch's training on a stage is three passes: F (forward), B (the input gradient, which the previous stage
waits for) and W (the weight gradient, which nobody waits for). DeepSpeed's 1F1B runs B and W as one backward pass
(``BW``); the zero-bubble schedules (Qi et al. 2023, "Zero Bubble Pipeline Parallelism") run W separately and
later, where the stage would otherwise wait.

* ``1f1b``: stage s (of P) runs ``min(P - 1 - s, m)`` forwards, then alternates one forward and one backward
  (``BW``), then the remaining backwards. Micro batches held (forward done, backward not): at most ``P - s``.
* ``zb-h1`` (the paper's memory-efficient handcrafted schedule): the same order of F and B, but stage s defers
  its first s weight passes: ``W(j)`` follows ``B(j + s)``; the last s run at the end. B reaches the upstream
  stages sooner (a B waits on the next stage's B only, not on its W) and the deferred Ws fill the tail. Every
  stage then holds at most P micro batches not yet through W, stage 0's 1F1B peak (the paper's memory bound;
  a micro batch past B keeps only what W needs). With equal stages and no transfer time the bubble is
  ``(P - 1)(F + B - W)`` against 1F1B's ``(P - 1)(F + B + W)``: a third of it when F = B = W.

``simulate`` plays a schedule: each stage runs its passes in order, each as soon as the stage is free and its
inputs are there (F after the previous stage's F of that micro batch, B after the next stage's B, each + one
transfer ``p2p``; W after its own B). ``python -m pipellm.plan --schedule zb-h1 --stage-costs ...`` prints it.
Training with ``pipeline_schedule: zb-h1`` runs ``zb_h1``'s order itself (``pipellm.pipeline.zero_bubble``).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

Op = tuple[str, int]
"""A pass: its kind (``F``, ``B``, ``W``, or ``BW``: B and W as one pass) and its micro batch."""


@dataclasses.dataclass(frozen=True)
class PassCosts:
    """One stage's time for one micro batch, per pass (any unit; the simulator keeps it)."""

    forward: float
    input_grad: float
    weight_grad: float

    def of(self, kind: str) -> float:
        return {"F": self.forward, "B": self.input_grad, "W": self.weight_grad,
                "BW": self.input_grad + self.weight_grad}[kind]


def one_f_one_b(stage: int, stages: int, micro_batches: int) -> list[Op]:
    """1F1B: warm-up forwards, then one forward and one whole backward at a time, then the last backwards."""
    warmup = min(stages - 1 - stage, micro_batches)
    order: list[Op] = [("F", j) for j in range(warmup)]
    for j in range(micro_batches - warmup):
        order += [("F", warmup + j), ("BW", j)]
    return order + [("BW", j) for j in range(micro_batches - warmup, micro_batches)]


def zb_h1(stage: int, stages: int, micro_batches: int) -> list[Op]:
    """ZB-H1: 1F1B's order with B alone; stage s runs W(j) after B(j + s), the last s Ws at the end."""
    order: list[Op] = []
    for kind, j in one_f_one_b(stage, stages, micro_batches):
        if kind == "F":
            order.append((kind, j))
            continue
        order.append(("B", j))
        if j >= stage:
            order.append(("W", j - stage))
    return order + [("W", j) for j in range(max(micro_batches - stage, 0), micro_batches)]


SCHEDULES: dict[str, Callable[[int, int, int], list[Op]]] = {"1f1b": one_f_one_b, "zb-h1": zb_h1}


@dataclasses.dataclass(frozen=True)
class Timeline:
    """A simulated step: per stage its passes in order with their start and end times."""

    schedule: str
    orders: list[list[Op]]
    starts: list[list[float]]
    ends: list[list[float]]
    busy: list[float]
    """Each stage's time spent computing."""

    @property
    def step_time(self) -> float:
        return max(ends[-1] for ends in self.ends if ends)

    @property
    def bubble(self) -> float:
        """The share of the step the busiest stage waits (``(P - 1) / (m + P - 1)`` for 1F1B on equal stages)."""
        return 1 - max(self.busy) / self.step_time

    def peak_held(self) -> list[int]:
        """Per stage, the most micro batches held at once (``micro_batches_held``)."""
        return [micro_batches_held(order) for order in self.orders]


def micro_batches_held(order: list[Op]) -> int:
    """The most micro batches a stage running ``order`` holds at once: forward done, weight gradient not yet."""
    held = peak = 0
    for kind, _ in order:
        held += 1 if kind == "F" else -1 if kind in ("W", "BW") else 0
        peak = max(peak, held)
    return peak


def simulate(schedule: str, costs: list[PassCosts], micro_batches: int, p2p: float = 0.0) -> Timeline:
    """Play ``schedule`` on stages of ``costs`` (one per stage) for ``micro_batches``; ``p2p``: one transfer."""
    stages = len(costs)
    orders = [SCHEDULES[schedule](s, stages, micro_batches) for s in range(stages)]
    ends: dict[tuple[int, str, int], float] = {}
    starts_of: list[list[float]] = [[] for _ in range(stages)]
    ends_of: list[list[float]] = [[] for _ in range(stages)]
    free, next_op = [0.0] * stages, [0] * stages
    while any(next_op[s] < len(orders[s]) for s in range(stages)):
        progressed = False
        for s in range(stages):
            while next_op[s] < len(orders[s]):
                kind, j = orders[s][next_op[s]]
                ready = _inputs_ready(ends, s, stages, kind, j, p2p)
                if ready is None:
                    break
                start = max(free[s], ready)
                free[s] = start + costs[s].of(kind)
                ends[(s, "B" if kind == "BW" else kind, j)] = free[s]
                starts_of[s].append(start)
                ends_of[s].append(free[s])
                next_op[s] += 1
                progressed = True
        if not progressed:
            raise ValueError(f"schedule {schedule!r} deadlocks: stage passes wait on each other")
    busy = [sum(costs[s].of(kind) for kind, _ in orders[s]) for s in range(stages)]
    return Timeline(schedule, orders, starts_of, ends_of, busy)


def _inputs_ready(ends: dict, stage: int, stages: int, kind: str, micro: int, p2p: float) -> float | None:
    """When the pass's inputs are there (None: not yet known). A whole backward (BW) sends its input gradient
    when it ends, so the previous stage's B waits for the end of this stage's BW (recorded as its B)."""
    if kind == "F":
        return 0.0 if stage == 0 else _after(ends.get((stage - 1, "F", micro)), p2p)
    if kind == "W":
        return ends.get((stage, "B", micro))
    own = ends.get((stage, "F", micro))
    if own is None or stage == stages - 1:
        return own
    downstream = _after(ends.get((stage + 1, "B", micro)), p2p)
    return None if downstream is None else max(own, downstream)


def _after(end: float | None, p2p: float) -> float | None:
    return None if end is None else end + p2p


def format_schedules(costs: list[PassCosts], micro_batches: int, p2p: float, show: str | None,
                     scale: float = 1.0) -> str:
    """Every schedule simulated on ``costs`` and printed (``format_timelines``), times multiplied by ``scale``
    (1e3: seconds measured, milliseconds printed)."""
    costs = [PassCosts(c.forward * scale, c.input_grad * scale, c.weight_grad * scale) for c in costs]
    timelines = [simulate(name, costs, micro_batches, p2p * scale) for name in SCHEDULES]
    return format_timelines(timelines, costs, micro_batches, p2p * scale, show=show)


def format_timelines(timelines: list[Timeline], costs: list[PassCosts], micro_batches: int, p2p: float,
                     unit: str = "ms", show: str | None = None) -> str:
    """The table users choose by: each schedule's step time, bubble and peak micro batches held per stage; then
    the pass order of each stage for ``show`` (a schedule name)."""
    lines = [f"pipellm schedule: {len(costs)} stages, {micro_batches} micro batches, p2p {p2p:g} {unit}; per stage "
             f"F/B/W {unit}: " + ", ".join(f"{c.forward:.4g}/{c.input_grad:.4g}/{c.weight_grad:.4g}" for c in costs)]
    rows = [("schedule", f"step time ({unit})", "bubble", "x compute", "peak micro batches held per stage")]
    for t in timelines:
        rows.append((t.schedule, f"{t.step_time:.4g}", f"{t.bubble:.1%}", f"{t.step_time / max(t.busy):.3f}",
                     "/".join(str(p) for p in t.peak_held())))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.append("bubble = 1 - busiest stage's compute / step time; x compute = step time / busiest stage's compute "
                 "(1.000: no bubble); a micro batch past B (zb-h1) holds only what W needs")
    for t in timelines:
        if t.schedule == show:
            lines.append(f"{t.schedule} order (F forward, B input gradient, W weight gradient, BW both):")
            lines += [f"  stage {s}: " + " ".join(f"{kind}{j}" for kind, j in order)
                      for s, order in enumerate(t.orders)]
    return "\n".join(lines)
