"""A stage's weights by layer file and by Hugging Face checkpoint name."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

from torch import nn

from pipellm.errors import PipellmError
from pipellm.files import load_torch_file
from pipellm.models.base import ModelFamily
from pipellm.pipeline.deepspeed_compat import BoundedPipelineModule
from pipellm.pipeline.layer_files import layer_file_name
from pipellm.pipeline.partition import PipelineLayers


def layer_module(layer) -> nn.Module:
    """The module that owns a pipeline layer's weights (a tied head's is the tied embedding)."""
    return layer.args[0] if isinstance(layer, functools.partial) else layer


def stage_modules(model: BoundedPipelineModule) -> list[tuple[int, nn.Module]]:
    """This stage's layers: ``(DeepSpeed layer index, the module that owns its weights)`` each."""
    return [(index, layer_module(layer)) for index, layer in zip(model.local_layer_indices, model.forward_funcs)]


def load_pipeline_weights(model: BoundedPipelineModule, family: ModelFamily, hf_config, model_dir: str | Path,
                          strict: bool = True, rename: Callable[[nn.Module, dict], dict] | None = None) -> None:
    """Load only this rank's layers from ``layer_XX-model_states.pt`` files (strict: every key must match; else
    every key of a file must be the layer's, and the layer's other parameters keep their values: a LoRA
    checkpoint's files hold only what trained). ``rename(module, state)``: a file's state under the module's
    names (a full checkpoint into a LoRA stage)."""
    model_dir, layers = Path(model_dir), PipelineLayers.of(family, hf_config)
    for layer_index, module in stage_modules(model):
        path = model_dir / layer_file_name(layers.file_index(layer_index))
        if not path.is_file():
            raise PipellmError(f"missing pipeline layer file {path}; is `model_path` a `convert_model.py "
                               f"hg_to_pp` output or a training checkpoint of this model?")
        state = load_torch_file(path, map_location=next(module.parameters()).device)
        state = state if rename is None else rename(module, state)
        try:
            unexpected = module.load_state_dict(state, strict=strict).unexpected_keys
            if unexpected:
                raise RuntimeError(f"Unexpected key(s) in state_dict: {', '.join(unexpected)}")
        except RuntimeError as e:
            first_line = str(e).strip().splitlines()[0:2]
            kind, _ = layers.kind(layer_index)
            raise PipellmError(f"{path} does not match layer {layer_index} ({kind}) of this model: "
                               f"{' '.join(first_line)}") from None


def layer_state(module: nn.Module, saves_frozen: bool) -> dict:
    """What a layer file holds of a layer's module, as DeepSpeed's ``PipelineModule`` saves it: its state dict,
    frozen parameters left out unless ``saves_frozen``, each tensor copied to the CPU alone (a view into a flat
    buffer would save the whole buffer)."""
    frozen = set() if saves_frozen else {name for name, p in module.named_parameters() if not p.requires_grad}
    return {key: value.detach().to("cpu", copy=True) for key, value in module.state_dict().items()
            if key not in frozen}


def checkpoint_named_parameters(model: BoundedPipelineModule, family: ModelFamily, hf_config) -> list[tuple[str, nn.Parameter]]:
    """This stage's parameters, each named by its Hugging Face checkpoint key (``model.layers.3.mlp.up_proj.weight``,
    ``model.norm.weight``), so name-based rules read the same on every stage and in ``train_ds_zero.py``. The
    ``PipelineModule``'s own names do not say what a layer is (the final norm's weight is ``4.weight``)."""
    layers = PipelineLayers.of(family, hf_config)
    named = {}
    for layer_index, module in stage_modules(model):
        # Named as the layer file that holds them: a tied head's parameters are the embedding's.
        kind, decoder_index = layers.kind(layers.file_index(layer_index))
        for key, param in module.named_parameters():
            named.setdefault(id(param), (family.key_map.hf_key(kind, decoder_index, key), param))
    return list(named.values())
