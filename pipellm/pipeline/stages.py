"""Turn a model family into a DeepSpeed ``PipelineModule``: stage wrappers, partition, weight loading, loss.

The family's modules have plain signatures (``decoder(hidden, position_ids) -> hidden``). The wrappers here
are mixins that adapt them to DeepSpeed's one-argument layer convention, so a layer's ``state_dict`` keys stay
the family's own (and a pipeline layer file is the Hugging Face checkpoint minus a key prefix).

Between stages only tensors travel: ``(hidden, position_ids)`` until the final norm, then the logits. A family
with an auxiliary loss (``ModelFamily.aux_loss``) carries ``(hidden, position_ids, stats)`` from its first decoder
on, and its head returns ``(logits, auxiliary loss term)``; other families carry nothing more. With
``loss_chunk_tokens`` the head hands the loss ``(hidden, projection weight)`` in place of the logits, and the loss
projects a chunk of tokens at a time (``pipellm.pipeline.chunked_loss``).
The batch that the data iterator yields is ``((input_ids, position_ids), (targets, loss_scale))``; see
``token_mean_loss`` for why the loss scale travels with the targets.
"""
from __future__ import annotations

import functools
import operator
from pathlib import Path

import torch
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime import utils as ds_utils
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipellm.models.attention import AttentionOptions
from pipellm.pipeline.layer_files import layer_file_name
from pipellm.pipeline.chunked_loss import chunked_linear_cross_entropy
from pipellm.errors import PipellmError
from pipellm.models.base import ModelFamily

class EmbedStage:
    def forward(self, inputs):
        input_ids, position_ids = inputs
        return super().forward(input_ids), position_ids


@functools.cache
def compiled(function):
    """One ``torch.compile`` of a block's forward function, shared by every layer of that class (parameters are
    graph inputs, so all layers of one shape reuse one compiled graph)."""
    return torch.compile(function, dynamic=False)


class DecoderStage:
    def __init__(self, *args, grad_ckpt: bool = False, compile_block: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.grad_ckpt = grad_ckpt
        block = super().forward
        self.block = functools.partial(compiled(block.__func__), self) if compile_block else block

    def forward(self, inputs):
        hidden, position_ids, *aux = inputs
        if self.grad_ckpt and self.training and torch.is_grad_enabled():
            out = checkpoint(self.block, hidden, position_ids, use_reentrant=False)
        else:
            out = self.block(hidden, position_ids)
        if isinstance(out, tuple):
            # A family with an auxiliary loss: the layer's statistics join the micro batch's running sum, which
            # the first decoder starts (a stage holding only the embedding sends none).
            out, stats = out
            aux = [aux[0] + stats] if aux else [stats]
        return (out, position_ids, *aux)


class NormStage:
    def forward(self, inputs):
        hidden, _, *aux = inputs
        hidden = super().forward(hidden)
        return (hidden, *aux) if aux else hidden


def project(hidden: torch.Tensor, weight: torch.Tensor, defer: bool):
    """The logits, or ``(hidden, weight)`` when the loss projects them itself, a chunk of tokens at a time."""
    return (hidden, weight) if defer else F.linear(hidden, weight)


class HeadStage:
    """The output projection: ``hidden -> logits`` against ``head_weight(self.weight)`` (see ``project``). A
    family with an auxiliary loss receives ``(hidden, stats)`` and appends the loss term to what it returns."""

    def __init__(self, config, *, head_weight, defer_projection: bool, aux_loss=None):
        super().__init__(config)
        self.head_weight, self.defer_projection = head_weight, defer_projection
        self.aux_loss = None if aux_loss is None else functools.partial(aux_loss, config=config)

    def forward(self, inputs):
        hidden, stats = (inputs, None) if self.aux_loss is None else inputs
        out = project(hidden, self.head_weight(self.weight), self.defer_projection)
        if self.aux_loss is None:
            return out
        aux = self.aux_loss(stats)
        return (*out, aux) if self.defer_projection else (out, aux)


def tied_head_forward(embed: nn.Module, hidden: torch.Tensor, *, weight_path: str, head_weight,
                      defer_projection: bool):
    """The output projection against the embedding's weight (``ModelFamily.tied_weight``)."""
    return project(hidden, head_weight(operator.attrgetter(weight_path)(embed)), defer_projection)


@functools.cache
def stage_class(stage: type, module: type) -> type:
    """``module`` with ``stage``'s pipeline forward; named after the module so DeepSpeed's plan reads well."""
    return type(module.__name__, (stage, module), {"__module__": module.__module__})


def init_weights(module: nn.Module, std: float) -> None:
    """Hugging Face's initialisation for decoder-only models: N(0, std) weights, zero biases, unit norms."""
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Embedding)):
            nn.init.normal_(sub.weight, mean=0.0, std=std)
            if getattr(sub, "bias", None) is not None:
                nn.init.zeros_(sub.bias)


def layer_specs(family: ModelFamily, hf_config, use_grad_ckpt: bool, attention: AttentionOptions,
                compile_layers: bool = False, loss_chunk_tokens: int | None = None) -> list:
    """DeepSpeed layer specs: embed, decoders, final norm, head (tied to the embedding when the config says so)."""
    embed_cls = stage_class(EmbedStage, family.embed)
    defer = loss_chunk_tokens is not None
    if family.is_tied(hf_config):
        embed = TiedLayerSpec("embed", embed_cls, hf_config, tied_weight_attr=[family.tied_weight])
        head_forward = functools.partial(tied_head_forward, weight_path=family.tied_weight,
                                         head_weight=family.head_weight, defer_projection=defer)
        head = TiedLayerSpec("embed", embed_cls, hf_config, forward_fn=head_forward,
                             tied_weight_attr=[family.tied_weight])
    else:
        embed = LayerSpec(embed_cls, hf_config)
        head = LayerSpec(stage_class(HeadStage, family.head), hf_config, head_weight=family.head_weight,
                         defer_projection=defer, aux_loss=family.aux_loss)
    decoder_cls = stage_class(DecoderStage, family.decoder)
    decoders = [LayerSpec(decoder_cls, hf_config, attention, grad_ckpt=use_grad_ckpt, compile_block=compile_layers)
                for _ in range(family.num_decoder_layers(hf_config))]
    return [embed, *decoders, LayerSpec(stage_class(NormStage, family.norm), hf_config), head]


def parameter_costs(family: ModelFamily, hf_config) -> list[float]:
    """Parameter count of each user-counted layer (embed, decoders, head), for ``parts: parameters``."""
    with torch.device("meta"):
        embed = sum(p.numel() for p in family.embed(hf_config).parameters())  # bloom's has a norm too
        decoder = sum(p.numel() for p in family.decoder(hf_config).parameters())
    return [float(embed)] + [float(decoder)] * family.num_decoder_layers(hf_config) + [float(embed)]


def stage_boundaries(parts: list[int] | str, family: ModelFamily, hf_config, num_stages: int) -> list[int]:
    """DeepSpeed layer boundaries (len num_stages + 1) from the user's ``parts``.

    Users count the final norm and the head as one layer; DeepSpeed sees two, always on the last stage.
    """
    if parts == "uniform":
        bounds = ds_utils.partition_uniform(num_items=family.num_decoder_layers(hf_config) + 2,
                                            num_parts=num_stages)
    elif parts == "parameters":
        bounds = ds_utils.partition_balanced(weights=parameter_costs(family, hf_config), num_parts=num_stages)
    else:
        bounds = [0]
        for count in parts:
            bounds.append(bounds[-1] + count)
    # plain ints: DeepSpeed's balanced partition returns numpy integers, which the run record cannot hold
    return [int(b) for b in bounds[:-1]] + [int(bounds[-1]) + 1]


class PipelineModel(PipelineModule):
    """A ``PipelineModule`` whose stages hold exactly the layers given by ``boundaries``."""

    def __init__(self, layers: list, boundaries: list[int], **kwargs):
        self._boundaries = list(boundaries)
        super().__init__(layers=layers, **kwargs)

    def _partition_layers(self, method="uniform"):
        self.parts = self._boundaries
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    @property
    def local_layer_indices(self) -> range:
        return range(self._local_start, self._local_stop)


def build_pipeline(family: ModelFamily, hf_config, topology, parts, *, use_grad_ckpt: bool = False,
                   use_flash_attn: bool = False, compile_layers: bool = False, seed: int = 42,
                   device: str | torch.device = "cpu", packed: bool = False,
                   loss_chunk_tokens: int | None = None) -> PipelineModel:
    """Build this rank's stage, randomly initialised (``load_pipeline_weights`` then loads a checkpoint).

    ``packed``: rows may hold several samples (``packing: true``); attention keeps to each sample.
    ``loss_chunk_tokens``: the loss projects and scores this many tokens at a time (``pipellm.pipeline.chunked_loss``).
    Each layer's initialisation is seeded by its layer index, so the initial weights do not depend on the
    partition: 1 stage and 2 stages start from the same model, and both copies of a tied embedding agree.
    """
    specs = layer_specs(family, hf_config, use_grad_ckpt,
                        AttentionOptions(use_flash_attn=use_flash_attn, packed=packed), compile_layers,
                        loss_chunk_tokens)
    boundaries = stage_boundaries(parts, family, hf_config, topology.get_dim("pipe"))
    loss_fn = functools.partial(token_mean_loss, chunk_tokens=loss_chunk_tokens)
    # Allocating on the target device directly skips a host copy of the stage (and is much faster to init).
    with torch.device(device):
        model = PipelineModel(specs, boundaries, topology=topology, loss_fn=loss_fn)
        std = getattr(hf_config, "initializer_range", 0.02)
        for layer_index, layer in zip(model.local_layer_indices, model.forward_funcs):
            module = _layer_module(layer)
            torch.manual_seed(seed + (0 if isinstance(layer, functools.partial) else layer_index))
            init_weights(module, std)
    return model


def _layer_module(layer) -> nn.Module | None:
    """The module that owns a pipeline layer's weights (a tied head's is the tied embedding)."""
    if isinstance(layer, nn.Module):
        return layer
    if isinstance(layer, functools.partial):
        return layer.args[0]
    return None


def load_pipeline_weights(model: PipelineModel, family: ModelFamily, hf_config, model_dir: str | Path) -> None:
    """Load only this rank's layers from ``layer_XX-model_states.pt`` files (strict: every key must match)."""
    model_dir = Path(model_dir)
    for layer_index, layer in zip(model.local_layer_indices, model.forward_funcs):
        module = _layer_module(layer)
        if module is None:
            continue
        kind, _ = family.layer_kind(layer_index, hf_config)
        file_index = 0 if kind == "head" and family.is_tied(hf_config) else layer_index
        path = model_dir / layer_file_name(file_index)
        if not path.is_file():
            raise PipellmError(f"missing pipeline layer file {path}; is `model_path` a `convert_model.py "
                               f"hg_to_pp` output or a training checkpoint of this model?")
        state = torch.load(path, map_location=next(module.parameters()).device, weights_only=True)
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as e:
            first_line = str(e).strip().splitlines()[0:2]
            raise PipellmError(f"{path} does not match layer {layer_index} ({kind}) of this model: "
                               f"{' '.join(first_line)}") from None


def token_mean_loss(outputs, labels: tuple[torch.Tensor, torch.Tensor], chunk_tokens: int | None = None
                    ) -> torch.Tensor:
    """Cross entropy summed over a micro batch's labelled tokens, times ``loss_scale`` (plus an auxiliary term).

    The training loop sets ``loss_scale = gradient_accumulation_steps * D / (labelled tokens in the global
    batch)``. DeepSpeed divides each micro batch's loss by the accumulation steps and averages gradients and
    losses over the D replicas, so the step's loss and gradient are those of the mean over every labelled token
    of the global batch: a long sample weighs by its tokens, not by its micro batch.

    ``outputs`` is the logits, or ``(logits, aux)`` for a family with an auxiliary loss, ``aux`` being that loss
    (coefficient included) on this micro batch alone. ``aux`` is added unscaled, so the same division and averaging
    make the step's auxiliary term the mean of ``aux`` over the global batch's micro batches (all replicas).
    With one micro batch that is the term on the global batch; with several it is the reference's term only if
    the term is linear in the tokens, which mixtral's load-balancing loss is not (see ``pipellm.models.mixtral``).
    With ``chunk_tokens``, ``outputs`` is ``(hidden, weight[, aux])``, projected and scored that many tokens at a
    time (``pipellm.pipeline.chunked_loss``).
    """
    targets, loss_scale = labels
    if chunk_tokens is None:
        logits, aux = outputs if isinstance(outputs, tuple) else (outputs, None)
        losses = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1), ignore_index=-100,
                                 reduction="sum")
    else:
        hidden, weight, *extra = outputs
        aux = extra[0] if extra else None
        losses = chunked_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, targets.view(-1),
                                              chunk_tokens)
    loss = losses * loss_scale.to(losses.dtype).reshape(())
    return loss if aux is None else loss + aux


def checkpoint_named_parameters(model: PipelineModel, family: ModelFamily, hf_config) -> list[tuple[str, nn.Parameter]]:
    """This stage's parameters, each named by its Hugging Face checkpoint key (``model.layers.3.mlp.up_proj.weight``,
    ``model.norm.weight``), so name-based rules read the same on every stage and in ``train_ds_zero.py``. The
    ``PipelineModule``'s own names do not say what a layer is (the final norm's weight is ``4.weight``)."""
    named = {}
    for layer_index, layer in zip(model.local_layer_indices, model.forward_funcs):
        module = _layer_module(layer)
        if module is None:
            continue
        kind, decoder_index = family.layer_kind(layer_index, hf_config)
        if kind == "head" and family.is_tied(hf_config):
            kind = "embed"  # the tied head computes with the embedding module (the same parameters)
        for key, param in module.named_parameters():
            named.setdefault(id(param), (family.key_map.hf_key(kind, decoder_index, key), param))
    return list(named.values())
