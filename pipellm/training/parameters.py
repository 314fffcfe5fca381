"""Which parameters a run trains, saves and exports: the parameter set both engines hand their optimizer.

Today's one set is every parameter (``AllParameters``). Another set (LoRA adapters) implements ``ParameterSet``:
it freezes what it does not train, and says whether checkpoints hold the frozen parameters too. What a
checkpoint holds is what ``convert_model.py pp_to_hg`` exports (it reads the checkpoint's layer files).
"""
from __future__ import annotations

import dataclasses
from typing import Protocol

from torch import nn

NamedParameters = list[tuple[str, nn.Parameter]]
"""This rank's parameters, each named by its Hugging Face checkpoint key (``model.layers.3.mlp.up_proj.weight``)."""


class ParameterSet(Protocol):
    """What is trainable, and so what the optimizer steps and the checkpoints hold."""

    saves_frozen: bool
    """Checkpoints hold the parameters this set leaves frozen (DeepSpeed's ``exclude_frozen_parameters`` off)."""

    def trainable(self, named_parameters: NamedParameters) -> NamedParameters:
        """The parameters the optimizer updates, by checkpoint name; it sets ``requires_grad`` of all of them."""


@dataclasses.dataclass(frozen=True)
class AllParameters:
    """Full fine-tuning: every parameter trains, and every one is saved and exported."""

    saves_frozen: bool = True
    """No parameter is frozen; nothing is left out of a checkpoint."""

    def trainable(self, named_parameters: NamedParameters) -> NamedParameters:
        for _, param in named_parameters:
            param.requires_grad_(True)
        return list(named_parameters)
