"""Choose the partition: the contiguous split of the user-counted layers into stages that minimises the slowest
stage's time among the splits whose every stage fits in the device memory."""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Callable

from pipellm.errors import PipellmError
from pipellm.plan.memory import ALLOWANCE_GIB, GIB, StageEstimate, StateBytes, estimate_stage
from pipellm.plan.profile import Profile


def min_max_partition(num_items: int, num_stages: int, cost: Callable[[int, int, int], float],
                      allowed: Callable[[int, int, int], bool] = lambda stage, start, stop: True
                      ) -> tuple[float, list[int]] | None:
    """The contiguous split of items ``0 .. num_items - 1`` into ``num_stages`` non-empty stages that minimises
    ``max(cost(stage, start, stop))`` among the splits where ``allowed(stage, start, stop)`` holds for every
    stage: ``(that maximum, items per stage)``, or None if no split is allowed.

    Exact: ``best[s][j]``, the smallest maximum over stages 0..s when stage s ends before item j, is
    ``min over i of max(best[s - 1][i], cost(s, i, j))``; O(num_stages x num_items^2) cost evaluations. Ties go
    to the earliest boundary.
    """
    best = [[math.inf] * (num_items + 1) for _ in range(num_stages)]
    choice = [[0] * (num_items + 1) for _ in range(num_stages)]
    for stop in range(1, num_items - num_stages + 2):
        if allowed(0, 0, stop):
            best[0][stop] = cost(0, 0, stop)
    for stage in range(1, num_stages):
        for stop in range(stage + 1, num_items - (num_stages - 1 - stage) + 1):
            for start in range(stage, stop):
                if best[stage - 1][start] == math.inf or not allowed(stage, start, stop):
                    continue
                value = max(best[stage - 1][start], cost(stage, start, stop))
                if value < best[stage][stop]:
                    best[stage][stop], choice[stage][stop] = value, start
    if best[num_stages - 1][num_items] == math.inf:
        return None
    bounds = [num_items]
    for stage in range(num_stages - 1, 0, -1):
        bounds.append(choice[stage][bounds[-1]])
    bounds.append(0)
    bounds.reverse()
    return best[num_stages - 1][num_items], [b - a for a, b in zip(bounds, bounds[1:])]


@dataclasses.dataclass(frozen=True)
class Plan:
    parts: list[int]
    chosen: bool
    """True: chosen by ``parts: auto``; False: the config's partition, evaluated."""
    stages: list[StageEstimate]
    micro_batches: int
    device_memory: float
    """Bytes available per device."""
    problem: str
    """Empty when every stage fits; else why not and what to change."""

    @property
    def fits(self) -> bool:
        return not self.problem

    @property
    def bubble(self) -> float:
        stages = len(self.parts)
        return (stages - 1) / (self.micro_batches + stages - 1)


def make_plan(profile: Profile, state: StateBytes, num_stages: int, micro_batches: int, device_memory: float,
              parts: list[int] | None = None, allowance: float = ALLOWANCE_GIB * GIB,
              must_fit: bool = False, schedule: str = "1f1b") -> Plan:
    """Evaluate ``parts`` (user counts), or choose them (None): the fastest split whose every stage fits in
    ``device_memory`` under ``schedule``. When none fits, ``must_fit`` raises ``PipellmError``; otherwise the plan
    is the fastest split regardless of memory, with the problem stated."""
    num_items = profile.layers.num_user_layers
    prefix = list(itertools.accumulate((item.seconds for item in profile.items()), initial=0.0))

    def stage_seconds(stage, start, stop):
        return prefix[stop] - prefix[start]

    def stage_memory(stage, start, stop):
        return estimate_stage(profile, state, stage, start, stop, num_stages, micro_batches, allowance,
                              schedule).total

    problem, chosen = "", parts is None
    if chosen:
        found = min_max_partition(num_items, num_stages, stage_seconds,
                                  lambda stage, start, stop: stage_memory(stage, start, stop) <= device_memory)
        if found is None:
            least, _ = min_max_partition(num_items, num_stages, stage_memory)
            problem = (f"no split of the {num_items} pipeline layers into {num_stages} stages fits in "
                       f"{device_memory / GIB:.1f} GiB per device (the least memory any split needs is "
                       f"{least / GIB:.1f} GiB on its largest stage); use more pipeline stages "
                       f"(`model_topo.process_topology.dims`), `use_grad_ckpt: true`, a smaller "
                       f"`train_micro_batch_size_per_gpu` or `max_seq_len`, or ZeRO-1 / optimizer offload")
            if must_fit:
                raise PipellmError(f"`model_topo.parts: auto`: {problem}")
            found = min_max_partition(num_items, num_stages, stage_seconds)
        parts = found[1]
    bounds = list(itertools.accumulate(parts, initial=0))
    stages = [estimate_stage(profile, state, stage, start, stop, num_stages, micro_batches, allowance, schedule)
              for stage, (start, stop) in enumerate(zip(bounds, bounds[1:]))]
    too_big = [(i, s) for i, s in enumerate(stages) if s.total > device_memory]
    if too_big and not problem:
        stage, estimate = max(too_big, key=lambda item: item[1].total)
        problem = (f"stage {stage} needs {estimate.total / GIB:.1f} GiB but the device has "
                   f"{device_memory / GIB:.1f} GiB; move layers off it (`model_topo.parts`, or `auto`), use more "
                   f"pipeline stages, `use_grad_ckpt: true` or a smaller `train_micro_batch_size_per_gpu`")
    return Plan(parts=list(parts), chosen=chosen, stages=stages, micro_batches=micro_batches,
                device_memory=device_memory, problem=problem)
