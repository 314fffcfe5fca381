"""The config's ``objective``: a name from ``OBJECTIVES`` or ``module:attribute``, built on every rank.

``module:attribute`` names a callable that takes the ``TrainConfig`` and returns an objective
(``pipellm.pipeline.loss.Objective``: ``loss`` and ``figures``), such as a class whose ``__init__`` takes the
config; ``module`` must be importable by every rank (installed, or on ``PYTHONPATH``). So an objective is added
without touching pipellm: ``objective: my_objectives:LabelSmoothedCrossEntropy``.
"""
from __future__ import annotations

import importlib
from typing import Callable

from pipellm.config import TrainConfig
from pipellm.errors import PipellmError
from pipellm.pipeline.loss import Objective, TokenMeanCrossEntropy
from pipellm.pipeline.preference import DPO
from pipellm.pipeline.reward import RewardModel

OBJECTIVES: dict[str, Callable[[TrainConfig], Objective]] = {"token_mean": TokenMeanCrossEntropy.from_config,
                                                             "dpo": DPO.from_config,
                                                             "reward": RewardModel.from_config}
"""Objectives by name."""


def objective_factory(name: str) -> Callable[[TrainConfig], Objective]:
    """What builds the objective ``name`` names (``PipellmError`` when nothing does)."""
    if name in OBJECTIVES:
        return OBJECTIVES[name]
    module_name, colon, attribute = name.partition(":")
    if not (colon and module_name and attribute):
        raise PipellmError(f"`objective` {name!r} is not one of {', '.join(OBJECTIVES)} and not `module:attribute`; "
                           f"name a built-in objective or the callable that builds yours")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise PipellmError(f"`objective` {name}: cannot import {module_name} ({e}); install it or put its "
                           f"directory on PYTHONPATH for every rank") from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise PipellmError(f"`objective` {name}: {module_name} has no callable {attribute}; name the class or "
                           f"function that takes the TrainConfig and returns the objective")
    return factory


def build_objective(cfg: TrainConfig) -> Objective:
    """The run's objective, checked to have the ``Objective`` methods."""
    objective = objective_factory(cfg.objective)(cfg)
    missing = [method for method in ("loss", "figures") if not callable(getattr(objective, method, None))]
    if missing:
        raise PipellmError(f"`objective` {cfg.objective} built a {type(objective).__name__} without "
                           f"{' and '.join(missing)}; an objective has loss(output, labels) and figures(loss, split)")
    return objective
