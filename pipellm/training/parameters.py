"""Which parameters a run trains, saves and exports: the parameter set both engines hand their optimizer.

``AllParameters`` trains every parameter; ``pipellm.training.lora.LoraParameters`` (``lora:``) injects peft's
adapters into each layer (``prepare_layer``, before the parameters are named) and trains only them. A set freezes
what it does not train, and says whether checkpoints hold the frozen parameters too (``parameter_set`` picks the
run's). What a
checkpoint holds is what ``convert_model.py pp_to_hg`` exports (it reads the checkpoint's layer files).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

NamedParameters = list[tuple[str, nn.Parameter]]
"""This rank's parameters, each named by its Hugging Face checkpoint key (``model.layers.3.mlp.up_proj.weight``)."""


class ParameterSet(Protocol):
    """What is trainable, and so what the optimizer steps and the checkpoints hold."""

    saves_frozen: bool
    """Checkpoints hold the parameters this set leaves frozen (DeepSpeed's ``exclude_frozen_parameters`` off)."""

    def trainable(self, named_parameters: NamedParameters) -> NamedParameters:
        """The parameters the optimizer updates, by checkpoint name; it sets ``requires_grad`` of all of them."""

    def prepare_layer(self, module: nn.Module, kind: str, file_index: int) -> None:
        """Change a pipeline layer (``kind`` ``embed``/``decoder``/``norm``/``head``) once its weights are loaded."""

    def prepare_transformers_model(self, model: nn.Module) -> nn.Module:
        """The same for a whole transformers model (``train_ds_zero.py``)."""

    def write_files(self, checkpoint_dir: Path) -> None:
        """Files of the set's own in a checkpoint directory (rank 0)."""


@dataclasses.dataclass(frozen=True)
class AllParameters:
    """Full fine-tuning: every parameter trains, and every one is saved and exported."""

    saves_frozen: bool = True
    """No parameter is frozen; nothing is left out of a checkpoint."""

    def trainable(self, named_parameters: NamedParameters) -> NamedParameters:
        for _, param in named_parameters:
            param.requires_grad_(True)
        return list(named_parameters)

    def prepare_layer(self, module: nn.Module, kind: str, file_index: int) -> None:
        pass

    def prepare_transformers_model(self, model: nn.Module) -> nn.Module:
        return model

    def write_files(self, checkpoint_dir: Path) -> None:
        pass


def parameter_set(cfg) -> ParameterSet:
    """The run's set: ``LoraParameters`` with a ``lora:`` section, else ``AllParameters``."""
    if cfg.lora is None:
        return AllParameters()
    from pipellm.training.lora import LoraParameters

    return LoraParameters.of(cfg)


NOTHING_TO_TRAIN = "pipellm_nothing_to_train"
"""The name of a stage's placeholder parameter when nothing of it trains (``nothing_to_train``)."""


def nothing_to_train(model: nn.Module) -> NamedParameters:
    """A stage that trains nothing (a LoRA stage holding only the frozen embedding) still takes part in every
    step's collectives (gradient norm, data-parallel all-reduce, the optimizer's own), which need an optimizer,
    and torch refuses one without parameters (DeepSpeed issue 5071). It gets one placeholder parameter, a zero
    that no forward uses: its gradient is None or zero and it has no weight to decay, so it stays zero."""
    device = next(iter(model.parameters()), torch.zeros(())).device
    placeholder = nn.Parameter(torch.zeros(1, device=device))
    model.register_parameter(NOTHING_TO_TRAIN, placeholder)
    return [(NOTHING_TO_TRAIN, placeholder)]
