"""When a step logs, evaluates and saves: pure rules of the step number, so every rank decides alike."""
from __future__ import annotations

import dataclasses

from pipellm.config import TrainConfig


@dataclasses.dataclass(frozen=True)
class Cadence:
    """The run's rhythm; ``done`` is the number of steps trained so far (1-based)."""

    total_steps: int
    """The run's last step."""
    log_steps: int
    """Log every this many steps (and at the last one, and with every eval)."""
    eval_steps: int
    """Evaluate every this many steps (and at the last one); 0: only at the last one."""
    save_steps: int
    """Save every this many steps; 0: never on a schedule."""
    save_final: bool
    """Save at the last step."""
    has_eval: bool
    """The run has eval rows (``eval_data_path`` or ``eval_ratio``); without, it never evaluates."""

    @classmethod
    def of(cls, cfg: TrainConfig, total_steps: int, has_eval: bool) -> "Cadence":
        return cls(total_steps, cfg.log_steps, cfg.eval_steps, cfg.save_steps, cfg.save_final, has_eval)

    def eval_due(self, done: int) -> bool:
        scheduled = self.eval_steps > 0 and done % self.eval_steps == 0
        return self.has_eval and (scheduled or done == self.total_steps)

    def log_due(self, done: int) -> bool:
        return done % self.log_steps == 0 or done == self.total_steps or self.eval_due(done)

    def save_due(self, done: int, *, improved: bool, stopping: bool) -> bool:
        """Also at an eval that improved on the best (it becomes ``best``) and before a run stops early."""
        scheduled = self.save_steps > 0 and done % self.save_steps == 0
        return improved or stopping or scheduled or (self.save_final and done == self.total_steps)
