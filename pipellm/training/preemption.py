"""Preemption: SIGTERM asks the run to stop, and all ranks agree after each step whether any rank was asked, so
all of them finish the same step, save and exit 0."""
from __future__ import annotations

import signal

import torch

from pipellm.training.distributed import all_reduce


class StopOnSigterm:
    """SIGTERM (preemption) asks the run to stop; ``agreed`` tells every rank whether any rank was asked."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._request)

    def release(self) -> None:
        """The handler there was before the run: a process that goes on after it (a test training several runs
        in turn) is not left ignoring SIGTERM."""
        signal.signal(signal.SIGTERM, self._previous)

    def _request(self, signum, frame) -> None:
        self.requested = True

    def agreed(self) -> bool:
        """All ranks, once per step: True when any rank received SIGTERM (an all-reduce MAX of one number)."""
        import deepspeed.comm as dist

        flag = torch.tensor([1.0 if self.requested else 0.0])
        return bool(all_reduce(flag, dist.ReduceOp.MAX)[0])
