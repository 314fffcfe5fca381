"""Turn a model family into a DeepSpeed ``PipelineModule``: the stage wrappers and ``build_pipeline``.

The family's modules have plain signatures (``decoder(hidden, position_ids) -> hidden``). The wrappers here
are mixins that adapt them to DeepSpeed's one-argument layer convention, so a layer's ``state_dict`` keys stay
the family's own (and a pipeline layer file is the Hugging Face checkpoint minus a key prefix).

Between stages only tensors travel: ``(hidden, position_ids)`` until the final norm. A family with an auxiliary
loss (``ModelFamily.aux_loss``) carries ``(hidden, position_ids, stats)`` from its first decoder on; other
families carry nothing more. The head returns a ``HeadOutput`` (``pipellm.pipeline.loss``): the logits and the
auxiliary loss term, if any; with ``loss_chunk_tokens`` the hidden states and the projection weight in place of
the logits, and the loss projects a chunk of tokens at a time (``pipellm.pipeline.chunked_loss``).
The batch that the data iterator yields is ``((input_ids, position_ids), (targets, loss_scale))``; see
``token_mean_loss`` for why the loss scale travels with the targets.
"""
from __future__ import annotations

import functools
import operator

import torch
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, TiedLayerSpec
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipellm.models.attention import AttentionOptions
from pipellm.config.schema import Speed
from pipellm.models.base import ModelFamily
from pipellm.models.kernels import use_liger_kernels
from pipellm.pipeline.loss import HeadOutput, Objective, TokenMeanCrossEntropy
from pipellm.pipeline.deepspeed_compat import BoundedPipelineModule
from pipellm.pipeline.partition import Partition
from pipellm.pipeline.weights import stage_modules

class EmbedStage:
    def forward(self, inputs):
        input_ids, position_ids = inputs
        hidden = super().forward(input_ids)
        if torch.is_grad_enabled() and not hidden.requires_grad:
            # A frozen embedding (LoRA): the pipeline engine calls backward on every stage's output, which a
            # stage of only the embedding could not do on a tensor that does not require a gradient.
            hidden.requires_grad_()
        return hidden, position_ids


@functools.cache
def compiled(function, round_as_eager: bool = False):
    """One ``torch.compile`` of a block's forward function, shared by every layer of that class (parameters are
    graph inputs, so all layers of one shape reuse one compiled graph).

    ``round_as_eager``: inductor rounds every op's result to its dtype, as eager does (its
    ``emulate_precision_casts``). By default a fused kernel keeps bf16 intermediates in fp32, and which ones
    depends on the graph: with LoRA, the training graph (adapters on, their gradients wanted) rounds a decoder's
    residual sum differently from the no-grad graph with adapters off, so DPO's reference pass and step 1 differ
    by up to 0.03 in a bf16 hidden state even though the adapters add exactly zero. Rounding as eager makes the
    values independent of the graph."""
    return torch.compile(function, dynamic=False,
                         options={"emulate_precision_casts": True} if round_as_eager else None)


class DecoderStage:
    def __init__(self, *args, grad_ckpt: bool = False, compile_block: bool = False, round_as_eager: bool = False,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.grad_ckpt = grad_ckpt
        block = super().forward
        self.block = functools.partial(compiled(block.__func__, round_as_eager), self) if compile_block else block

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


def project(hidden: torch.Tensor, weight: torch.Tensor, defer: bool, aux: torch.Tensor | None = None) -> HeadOutput:
    """The logits, or ``hidden`` and ``weight`` when the loss projects them itself, a chunk of tokens at a time.

    The weight leaves as a view, never as the parameter: DeepSpeed hooks every stage output that has a
    ``grad_fn`` and runs its backward prologue (the bf16 optimizer clears the bf16 gradients there) when the first
    of them gets its gradient. A parameter has no ``grad_fn``, so its gradient was accumulated first and then
    cleared by the prologue: under bf16 the head never trained."""
    if defer:
        return HeadOutput(hidden=hidden, weight=weight.view_as(weight), aux=aux)
    return HeadOutput(logits=F.linear(hidden, weight), aux=aux)


class HeadStage:
    """The output projection: ``hidden -> HeadOutput`` against ``head_weight(self.weight)`` (see ``project``). A
    family with an auxiliary loss receives ``(hidden, stats)`` and adds the loss term to its output."""

    def __init__(self, config, *, head_weight, defer_projection: bool, aux_loss=None):
        super().__init__(config)
        self.head_weight, self.defer_projection = head_weight, defer_projection
        self.aux_loss = None if aux_loss is None else functools.partial(aux_loss, config=config)

    def forward(self, inputs) -> HeadOutput:
        hidden, stats = (inputs, None) if self.aux_loss is None else inputs
        aux = None if self.aux_loss is None else self.aux_loss(stats)
        return project(hidden, self.head_weight(self.weight), self.defer_projection, aux)


def tied_head_forward(embed: nn.Module, hidden: torch.Tensor, *, weight_path: str, head_weight,
                      defer_projection: bool) -> HeadOutput:
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
                compile_layers: bool = False, loss_chunk_tokens: int | None = None, loss_kernel: str = "torch",
                round_as_eager: bool = False) -> list:
    """DeepSpeed layer specs: embed, decoders, final norm, head (tied to the embedding when the config says so),
    in ``pipellm.pipeline.partition.PipelineLayers``' order. The head leaves the projection to the loss with
    ``loss_chunk_tokens`` or liger's fused linear + cross entropy (``loss_kernel`` ``liger``). ``round_as_eager``:
    see ``compiled``."""
    embed_cls = stage_class(EmbedStage, family.embed)
    defer = loss_chunk_tokens is not None or loss_kernel == "liger"
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
    decoders = [LayerSpec(decoder_cls, hf_config, attention, grad_ckpt=use_grad_ckpt, compile_block=compile_layers,
                          round_as_eager=round_as_eager)
                for _ in range(family.num_decoder_layers(hf_config))]
    return [embed, *decoders, LayerSpec(stage_class(NormStage, family.norm), hf_config), head]


def build_pipeline(family: ModelFamily, hf_config, topology, parts, *, use_grad_ckpt: bool = False,
                   use_flash_attn: bool = False, compile_layers: bool = False, seed: int = 42,
                   device: str | torch.device = "cpu", packed: bool = False,
                   loss_chunk_tokens: int | None = None, objective: Objective | None = None,
                   attention_backend: str = "auto", speed: Speed = Speed()) -> BoundedPipelineModule:
    """Build this rank's stage, randomly initialised (``load_pipeline_weights`` then loads a checkpoint).

    ``packed``: rows may hold several samples (``packing: true``); attention keeps to each sample.
    ``attention_backend``: the kernel of attention that needs a mask (``AttentionOptions.backend``).
    ``loss_chunk_tokens``: the loss projects and scores this many tokens at a time (``pipellm.pipeline.chunked_loss``).
    ``objective``: what the last stage's output is scored by (default: ``TokenMeanCrossEntropy``).
    ``speed``: the optional faster paths (``pipellm.config.schema.Speed``): liger's decoder kernels, the loss
    kernel (the head defers its projection to liger's fused loss), the SDPA kernel.
    Each layer's initialisation is seeded by its layer file index, so the initial weights do not depend on the
    partition: 1 stage and 2 stages start from the same model, and both copies of a tied embedding agree.
    """
    # An objective with a reference pass compares a no-grad forward with the training step's: compiled layers
    # must compute both alike (see ``compiled``).
    round_as_eager = getattr(objective, "uses_reference", False)
    specs = layer_specs(family, hf_config, use_grad_ckpt,
                        AttentionOptions(use_flash_attn, packed, attention_backend, speed.sdpa_backend),
                        compile_layers, loss_chunk_tokens, speed.loss_kernel, round_as_eager)
    partition = Partition.of_parts(parts, family, hf_config, topology.get_dim("pipe"))
    loss_fn = (objective or TokenMeanCrossEntropy(loss_chunk_tokens, speed.loss_kernel)).loss
    # Allocating on the target device directly skips a host copy of the stage (and is much faster to init).
    with torch.device(device):
        model = BoundedPipelineModule(specs, partition.boundaries, topology=topology, loss_fn=loss_fn)
        std = getattr(hf_config, "initializer_range", 0.02)
        for layer_index, module in stage_modules(model):
            torch.manual_seed(seed + partition.layers.file_index(layer_index))
            init_weights(module, std)
    if speed.liger_kernels:
        use_liger_kernels(model)
    return model
