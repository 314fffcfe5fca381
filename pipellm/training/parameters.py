"""Which parameters a run trains, saves and exports: the parameter set both engines hand their optimizer.

``AllParameters`` trains every parameter; ``pipellm.training.lora.LoraParameters`` (``lora:``) injects peft's
adapters into each layer (``prepare_layer``, before the parameters are named) and trains only them. A set freezes
what it does not train, and says whether checkpoints hold the frozen parameters too (``parameter_set`` picks the
run's). What a
checkpoint holds is what ``convert_model.py pp_to_hg`` exports (it reads the checkpoint's layer files).
"""
from __future__ import annotations

import dataclasses
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

    # Optional (a set without them changes no module and writes no file; ``optional_hook`` looks them up):
    # prepare_layer(module, kind, file_index): change a pipeline layer (kind embed/decoder/norm/head) once its
    #     weights are loaded and before its parameters are named;
    # prepare_transformers_model(model) -> model: the same for a whole transformers model (train_ds_zero.py);
    # write_files(checkpoint_dir): files of the set's own in each checkpoint directory (rank 0).
    # reference_mode(model): a context in which the model computes as the DPO reference ``initial`` (LoRA: adapters
    #     off); full_layer_state(module, state) -> state: a full checkpoint's layer file under the module's names.


@dataclasses.dataclass(frozen=True)
class AllParameters:
    """Full fine-tuning: every parameter trains, and every one is saved and exported."""

    saves_frozen: bool = True
    """No parameter is frozen; nothing is left out of a checkpoint."""

    def trainable(self, named_parameters: NamedParameters) -> NamedParameters:
        for _, param in named_parameters:
            param.requires_grad_(True)
        return list(named_parameters)


def optional_hook(parameter_set: ParameterSet, name: str, default=None):
    """The set's optional method ``name`` (``ParameterSet``'s comment), or ``default``."""
    return getattr(parameter_set, name, default)


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
    added times 0 to the output of the stage's first layer: every backward gives it a zero gradient (DeepSpeed's
    bf16 optimizer needs one gradient at least) and the forward's values stay exactly what they were."""
    device = next(iter(model.parameters()), torch.zeros(())).device
    placeholder = nn.Parameter(torch.zeros(1, device=device))
    model.register_parameter(NOTHING_TO_TRAIN, placeholder)
    first = next(layer for layer in model.forward_funcs if isinstance(layer, nn.Module))
    first.register_forward_hook(lambda module, inputs, output: _plus_zero_times(output, placeholder))
    return [(NOTHING_TO_TRAIN, placeholder)]


def _plus_zero_times(output, placeholder: nn.Parameter):
    """``output`` (a tensor or a tuple starting with one) with ``0 * placeholder`` added to its first tensor."""
    if not torch.is_grad_enabled():
        return output
    if isinstance(output, tuple):
        return (_plus_zero_times(output[0], placeholder), *output[1:])
    return output + 0 * placeholder.to(output.dtype) if torch.is_tensor(output) and output.is_floating_point() \
        else output
