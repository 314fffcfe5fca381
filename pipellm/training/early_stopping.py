"""Early stopping: the best eval loss so far, and whether the run has waited long enough for a better one."""
from __future__ import annotations

import dataclasses
import math

from pipellm.config import EarlyStopping


@dataclasses.dataclass
class EarlyStoppingState:
    """The best eval so far and how many evals since have not improved on it by ``min_delta``."""

    patience: int
    """Evals without improvement that stop the run; 0: never stop."""
    min_delta: float
    """How much lower than the best an eval loss must be to count as an improvement."""
    best_loss: float = math.inf
    """The best eval loss so far."""
    best_step: int | None = None
    """The step of ``best_loss`` (its checkpoint is ``best``)."""
    evals_without_improvement: int = 0
    """Evals since ``best_step``."""

    @classmethod
    def from_config(cls, config: EarlyStopping) -> "EarlyStoppingState":
        return cls(config.patience, config.min_delta)

    def update(self, eval_loss: float, step: int) -> bool:
        """Record an eval; True when it improved (it is then the best)."""
        if eval_loss < self.best_loss - self.min_delta:
            self.best_loss, self.best_step, self.evals_without_improvement = eval_loss, step, 0
            return True
        self.evals_without_improvement += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.evals_without_improvement >= self.patience

    def state_dict(self) -> dict:
        return {"best_loss": self.best_loss, "best_step": self.best_step,
                "evals_without_improvement": self.evals_without_improvement}

    def load_state_dict(self, state: dict) -> None:
        self.best_loss, self.best_step = state["best_loss"], state["best_step"]
        self.evals_without_improvement = state["evals_without_improvement"]
