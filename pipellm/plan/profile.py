"""Measure the pipeline layers as training builds them: time, activation memory and parameters of each kind."""
from __future__ import annotations

import dataclasses
import functools
import gc
import os
import statistics
import time
from typing import Callable

import torch

from pipellm.config import TrainConfig
from pipellm.config.schema import Speed
from pipellm.models.base import ModelFamily
from pipellm.pipeline.partition import PipelineLayers
from pipellm.plan.schedules import PassCosts

WARMUP_STEPS = 3
"""Untimed forward+backward passes first: allocator growth, kernel selection and ``torch.compile``."""
TIMED_STEPS = 5
"""Timed passes; the median is the layer's time."""


@dataclasses.dataclass(frozen=True)
class RunShape:
    """What a layer's time and activation memory depend on; one per run."""

    micro_batch: int
    seq_len: int
    dtype: torch.dtype
    grad_ckpt: bool
    flash_attn: bool
    packed: bool
    compile_layers: bool
    loss_chunk_tokens: int | None = None
    attention_backend: str = "auto"
    speed: Speed = dataclasses.field(default_factory=Speed)
    """The run's ``speed`` levers: the layers are measured as they will train."""

    @classmethod
    def of(cls, cfg: TrainConfig, on_gpu: bool) -> RunShape:
        return cls(cfg.micro_batch_size, cfg.max_seq_len, cfg.deepspeed_settings.dtype, cfg.use_grad_ckpt, cfg.use_flash_attn,
                   cfg.packing, cfg.layers_compiled(on_gpu), cfg.loss_chunk_tokens,
                   cfg.attention_backend, cfg.speed)


@dataclasses.dataclass(frozen=True)
class LayerCost:
    """One pipeline layer kind, measured for one micro batch."""

    seconds: float
    """Forward + backward (median of the timed passes)."""
    held_bytes: int
    """Activations kept from the forward to the backward, the layer's output included (its input not: that is
    the previous layer's output)."""
    working_bytes: int | None
    """Peak during forward + backward above ``held_bytes`` (None where not measurable: on CPU)."""
    input_bytes: int
    """The tensors the layer receives (a stage keeps its received input and the clone it runs on)."""
    params: int
    """Parameters the layer holds (the head: final norm + output projection, or the tied embedding's replica)."""
    passes: PassCosts | None = None
    """``seconds`` split into forward, input-gradient and weight-gradient passes (``split_passes``), else None."""
    trainable: int | None = None
    """Of ``params``, those that train (LoRA: ``pipellm.plan.lora_memory``); None: all."""
    frozen_bytes: float = 0.0
    """What the frozen ones of ``params`` take (weights only)."""


@dataclasses.dataclass(frozen=True)
class Profile:
    device: str
    embed: LayerCost
    decoder: LayerCost
    head: LayerCost
    layers: PipelineLayers
    """The model's pipeline layers (how many decoders)."""
    tied_params: int
    """Parameters the head shares with the embedding (0 when untied): counted once on a stage holding both."""

    def items(self) -> list[LayerCost]:
        """The user-counted pipeline layers in order: embedding, decoders, head."""
        return [self.embed] + [self.decoder] * self.layers.num_decoders + [self.head]

    def stage_passes(self, start: int, stop: int) -> PassCosts:
        """F, B and W seconds of a stage holding user-counted layers ``[start, stop)`` (``split_passes``)."""
        items = [item.passes for item in self.items()[start:stop]]
        return PassCosts(*(sum(getattr(p, f) for p in items) for f in ("forward", "input_grad", "weight_grad")))

    def with_passes_of(self, separated: Profile) -> Profile:
        """A compiled layer is one autograd node that computes all its gradients at once, so ZB-H1 trains it with
        its linear layers left out of the compiled graphs (``pipellm.pipeline.split_backward``): its F, B and W
        are measured on that build (``separated``); the rest (1F1B's build: time, memory) stays this profile's."""
        return dataclasses.replace(self, embed=dataclasses.replace(self.embed, passes=separated.embed.passes),
                                   decoder=dataclasses.replace(self.decoder, passes=separated.decoder.passes),
                                   head=dataclasses.replace(self.head, passes=separated.head.passes))


def local_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def device_memory_bytes(device: torch.device, processes_per_host: int) -> float:
    """A GPU's total memory; on CPU the host's RAM shared by its pipeline processes."""
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / processes_per_host


def profile_layers(family: ModelFamily, hf_config, shape: RunShape, device: torch.device,
                   split_passes: bool = False) -> Profile:
    """Measure the embedding, one decoder layer and the head as ``build_pipeline`` builds them, then free them
    (and forget their peak, so a training run's peak memory figure is its own).

    Each layer runs on the previous one's (detached) output, so shapes and dtypes are those that travel between
    stages; the head's measurement includes the loss, which the last stage computes. ``split_passes``: also time
    the forward alone and the input gradient alone (``torch.autograd.grad`` to the layer's inputs: the
    weight-gradient matmuls are then skipped); W is the rest of the backward. Compiled layers are measured twice:
    as 1F1B trains them, and for the passes as ZB-H1 does (``Profile.with_passes_of``).
    """
    separate = split_passes and shape.compile_layers
    profile = _build_and_measure(family, hf_config, shape, device, split_passes and not separate)
    if separate:
        profile = profile.with_passes_of(_build_and_measure(family, hf_config, shape, device, True, separate=True))
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return profile


def _build_and_measure(family: ModelFamily, hf_config, shape: RunShape, device: torch.device,
                       split_passes: bool, separate: bool = False) -> Profile:
    """``separate``: the layers as ZB-H1 trains them (``separate_weight_grads``)."""
    from pipellm.models.attention import AttentionOptions
    from pipellm.models.kernels import use_liger_kernels
    from pipellm.pipeline.loss import token_mean_loss
    from pipellm.pipeline.split_backward import separate_weight_grads
    from pipellm.pipeline.stages import init_weights, layer_specs

    layers = PipelineLayers.of(family, hf_config)
    specs = layer_specs(family, hf_config, shape.grad_ckpt,
                        AttentionOptions(shape.flash_attn, shape.packed, shape.attention_backend,
                                         shape.speed.sdpa_backend), shape.compile_layers,
                        shape.loss_chunk_tokens, shape.speed.loss_kernel)
    embed_spec, decoder_spec = specs[layers.index("embed")], specs[layers.index("decoder", 0)]
    norm_spec, head_spec = specs[layers.index("norm")], specs[layers.index("head")]
    torch.manual_seed(0)
    with torch.device(device):
        embed, decoder, norm = embed_spec.build(), decoder_spec.build(), norm_spec.build()
        head_module = embed if layers.tied else head_spec.build()
    for module in (embed, decoder, norm, head_module):
        init_weights(module, getattr(hf_config, "initializer_range", 0.02))
        module.to(shape.dtype).train()
        if shape.speed.liger_kernels:
            use_liger_kernels(module)
        if separate:
            separate_weight_grads(module)
    head = functools.partial(head_spec.forward_fn, embed) if layers.tied else head_module

    batch, seq = shape.micro_batch, shape.seq_len
    input_ids = torch.randint(0, hf_config.vocab_size, (batch, seq), device=device)
    position_ids = torch.arange(seq, device=device).expand(batch, seq).contiguous()  # one sample per row
    # A reward model's head has one output (``ModelFamily.scoring``): class 0 times the same kernels for it.
    targets = torch.randint(0, 1 if family.scores else hf_config.vocab_size, (batch, seq), device=device)
    loss_scale = torch.tensor(1.0 / (batch * seq), device=device)

    def count(*modules):
        return sum(p.numel() for m in modules for p in m.parameters())

    def head_and_loss(inputs):
        return token_mean_loss(head(norm(inputs)), (targets, loss_scale), shape.loss_chunk_tokens,
                               shape.speed.loss_kernel)

    measure = functools.partial(_measure, device=device, split_passes=split_passes)
    embed_cost, hidden = measure(embed, (input_ids, position_ids), list(embed.parameters()))
    decoder_cost, hidden = measure(decoder, hidden, list(decoder.parameters()))
    head_cost, _ = measure(head_and_loss, hidden, [*norm.parameters(), *head_module.parameters()])
    tied_params = functools.reduce(getattr, family.tied_weight.split("."), embed).numel() if layers.tied else 0
    return Profile(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        embed=dataclasses.replace(embed_cost, params=count(embed)),
        decoder=dataclasses.replace(decoder_cost, params=count(decoder)),
        head=dataclasses.replace(head_cost, params=count(norm, head_module)),
        layers=layers, tied_params=tied_params)


def _measure(layer: Callable, inputs: tuple, params: list[torch.Tensor], device: torch.device,
             split_passes: bool = False) -> tuple[LayerCost, tuple]:
    """Time and memory of ``layer`` (forward + backward) on ``inputs``; also its outputs, detached, as the next
    layer's inputs (floating tensors require grad, as a received activation does). ``params``: the layer's."""
    def forward():
        outputs = layer(inputs)
        return outputs if isinstance(outputs, tuple) else (outputs,)

    def backward(outputs):
        tensors = [t for t in outputs if t.requires_grad]
        torch.autograd.backward(tensors, [torch.ones_like(t) for t in tensors])
        for t in inputs:
            t.grad = None

    wanted = [t for t in inputs if t.requires_grad]  # none for the embedding (token ids): its backward is all W

    def input_grad(outputs):
        tensors = [t for t in outputs if t.requires_grad]
        torch.autograd.grad(tensors, wanted, [torch.ones_like(t) for t in tensors], allow_unused=True)

    for _ in range(WARMUP_STEPS):
        backward(forward())
    seconds = _median_seconds(lambda: backward(forward()), device)
    passes = None
    if split_passes:
        forward_seconds = _median_seconds(forward, device)
        input_grad_seconds = max(_median_seconds(lambda: input_grad(forward()), device) - forward_seconds, 0.0) \
            if wanted else 0.0
        passes = PassCosts(forward_seconds, input_grad_seconds,
                           max(seconds - forward_seconds - input_grad_seconds, 0.0))
    if device.type == "cuda":
        outputs, held, working = _allocated_bytes(forward, backward, device)
    else:
        outputs, held, working = _saved_bytes(forward, backward, [*inputs, *params])
    cost = LayerCost(seconds=seconds, held_bytes=held, working_bytes=working,
                     input_bytes=sum(t.nbytes for t in inputs), params=0, passes=passes)
    next_inputs = tuple(t.detach().requires_grad_(t.is_floating_point()) for t in outputs)
    return cost, next_inputs


def _median_seconds(run: Callable, device: torch.device) -> float:
    """The median of ``TIMED_STEPS`` timed calls of ``run``."""
    seconds = []
    for _ in range(TIMED_STEPS):
        _sync(device)
        start = time.perf_counter()
        run()
        _sync(device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _allocated_bytes(forward: Callable, backward: Callable, device: torch.device) -> tuple[tuple, int, int]:
    """One pass measured by the CUDA allocator: its outputs, the bytes held to the backward and the peak above."""
    # Weights and their gradients exist since the warm-up: the difference is this micro batch's alone.
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    outputs = forward()
    _sync(device)
    held = torch.cuda.memory_allocated(device) - base
    backward(outputs)
    _sync(device)
    return outputs, held, torch.cuda.max_memory_allocated(device) - base - held


def _saved_bytes(forward: Callable, backward: Callable, owned: list[torch.Tensor]) -> tuple[tuple, int, None]:
    """One pass measured without allocator statistics (CPU): its outputs and the bytes of the storages autograd
    saves for the backward plus the outputs, each storage once, the ``owned`` tensors' (inputs, parameters) not.
    With checkpointing only the outputs remain."""
    owned_storages = {t.untyped_storage().data_ptr() for t in owned}
    kept: dict[int, int] = {}

    def keep(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in owned_storages:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        outputs = forward()
    for t in outputs:
        keep(t)
    held = sum(kept.values())
    backward(outputs)
    return outputs, held, None
