"""How a model's pipeline layers are counted, and which of them each stage holds.

A model with N decoder layers has its pipeline layers counted three ways; this module is the one place that
converts between them:

* **user layers** (``model_topo.parts``, the plan): embedding, N decoders, head. The final norm and the output
  projection count as one layer, as the original design counts them (llama-7b on 8 stages is
  ``[5, 4, 4, 4, 4, 4, 4, 5]``), so ``sum(parts) == N + 2``.
* **DeepSpeed layers** (the ``PipelineModule``'s layer list and its stage boundaries ``PipelineModule.parts``):
  embedding [0], decoders [1 .. N], final norm [N + 1], head [N + 2]. The norm and the head are both on the
  last stage, so DeepSpeed's boundaries are the user's with the last one moved past the extra layer.
* **layer files** (``layer_XX-model_states.pt``): numbered like the DeepSpeed layers, one each, except that a
  tied head has none: it computes with the embedding's weight, which file 0 holds.
"""
from __future__ import annotations

import dataclasses
import itertools

import torch

from pipellm.errors import PipellmError
from pipellm.models.base import ModelFamily

LAST_KINDS = ("norm", "head")
"""The DeepSpeed layers after the decoders, in order; users count them as one layer, ``head``."""


@dataclasses.dataclass(frozen=True)
class PipelineLayers:
    """A model's pipeline layers: how many of each, and the index of each in the three counts."""

    num_decoders: int
    """N, the model's decoder layers."""
    tied: bool
    """The head computes with the embedding's weight (``tie_word_embeddings``) and has no layer file."""

    @classmethod
    def of(cls, family: ModelFamily, hf_config) -> PipelineLayers:
        return cls(family.num_decoder_layers(hf_config), family.is_tied(hf_config))

    @property
    def num_user_layers(self) -> int:
        """Embedding, decoders, head: what ``parts`` sums to."""
        return self.num_decoders + 2

    @property
    def num_deepspeed_layers(self) -> int:
        """Embedding, decoders, final norm, head."""
        return self.num_decoders + 1 + len(LAST_KINDS)

    @property
    def num_files(self) -> int:
        """Layer files of a pipeline checkpoint: one per DeepSpeed layer but a tied head."""
        return self.num_deepspeed_layers - (1 if self.tied else 0)

    def kind(self, layer: int) -> tuple[str, int | None]:
        """Kind and decoder index of DeepSpeed layer ``layer``, which is also layer file ``layer``."""
        if not 0 <= layer < self.num_deepspeed_layers:
            raise IndexError(f"layer {layer} is out of range for {self.num_decoders} decoder layers")
        if layer == 0:
            return "embed", None
        if layer <= self.num_decoders:
            return "decoder", layer - 1
        return LAST_KINDS[layer - self.num_decoders - 1], None

    def index(self, kind: str, decoder_index: int | None = None) -> int:
        """DeepSpeed layer (and layer file) index of a layer kind; decoders by their decoder index."""
        if kind == "decoder":
            return 1 + decoder_index
        if kind == "embed":
            return 0
        return self.num_decoders + 1 + LAST_KINDS.index(kind)

    def file_index(self, layer: int) -> int:
        """The layer file that holds DeepSpeed layer ``layer``'s weights: a tied head's is the embedding's."""
        return 0 if self.tied and layer == self.index("head") else layer

    def check_parts(self, parts: list[int] | str, num_stages: int, source: str | None = None) -> None:
        """``parts`` (a list, or a named method) against this model's layers, before any process group;
        ``source``: the config file they come from, named first in the message."""
        where = f"{source}: " if source else ""
        if isinstance(parts, list) and sum(parts) != self.num_user_layers:
            raise PipellmError(f"{where}`model_topo.parts` {parts} sums to {sum(parts)} but the model has "
                               f"{self.num_user_layers} pipeline layers (embedding + {self.num_decoders} decoder "
                               f"layers + head)")
        if self.num_user_layers < num_stages:
            raise PipellmError(f"{where}the model has {self.num_user_layers} pipeline layers, fewer than the "
                               f"{num_stages} stages")

    def user_layer_names(self, start: int, stop: int) -> str:
        """``0-2: embed + decoders 0-1`` for user layers ``[start, stop)``."""
        names = ["embed"] if start == 0 else []
        first, last = max(start, 1) - 1, min(stop, self.num_decoders + 1) - 2
        if first == last:
            names.append(f"decoder {first}")
        elif first < last:
            names.append(f"decoders {first}-{last}")
        if stop == self.num_user_layers:
            names.append("head")
        span = f"{start}" if stop - start == 1 else f"{start}-{stop - 1}"
        return f"{span}: {' + '.join(names)}"


def parameter_costs(family: ModelFamily, hf_config) -> list[float]:
    """Parameter count of each user layer (embed, decoders, head), for ``parts: parameters``."""
    with torch.device("meta"):
        embed = sum(p.numel() for p in family.embed(hf_config).parameters())  # bloom's has a norm too
        decoder = sum(p.numel() for p in family.decoder(hf_config).parameters())
    return [float(embed)] + [float(decoder)] * family.num_decoder_layers(hf_config) + [float(embed)]


@dataclasses.dataclass(frozen=True)
class Partition:
    """The layers each pipeline stage holds, as user layer counts and as DeepSpeed boundaries."""

    layers: PipelineLayers
    counts: tuple[int, ...]
    """User layers per stage, first stage first (what ``parts`` lists); they sum to ``layers.num_user_layers``."""

    @classmethod
    def of_parts(cls, parts: list[int] | str, family: ModelFamily, hf_config, num_stages: int) -> Partition:
        """The split that ``parts`` names: a list of counts, ``uniform`` (DeepSpeed's uniform split of the user
        layers) or ``parameters`` (DeepSpeed's split balancing their parameter counts). ``auto`` is chosen
        beforehand (``pipellm.plan.agree``)."""
        from deepspeed.runtime import utils as ds_utils  # here: the converters and config checks run without it

        layers = PipelineLayers.of(family, hf_config)
        layers.check_parts(parts, num_stages)
        if isinstance(parts, list):
            return cls(layers, tuple(parts))
        if parts == "uniform":
            bounds = ds_utils.partition_uniform(num_items=layers.num_user_layers, num_parts=num_stages)
        elif parts == "parameters":
            bounds = ds_utils.partition_balanced(weights=parameter_costs(family, hf_config), num_parts=num_stages)
        else:
            raise ValueError(f"parts {parts!r} names no split; `auto` is resolved before the pipeline is built")
        # plain ints: DeepSpeed's balanced partition returns numpy integers, which the run record cannot hold
        return cls(layers, tuple(int(b - a) for a, b in zip(bounds, bounds[1:])))

    @classmethod
    def of_boundaries(cls, layers: PipelineLayers, boundaries: list[int]) -> Partition:
        """The split DeepSpeed boundaries describe (``PipelineModule.parts``, a checkpoint's ``stage_boundaries``)."""
        counts = [int(b - a) for a, b in zip(boundaries, boundaries[1:])]
        counts[-1] -= len(LAST_KINDS) - 1  # the last stage's final norm and head are one user layer
        return cls(layers, tuple(counts))

    @property
    def parts(self) -> list[int]:
        """The counts as ``model_topo.parts`` spells them."""
        return list(self.counts)

    @property
    def user_boundaries(self) -> list[int]:
        """Stage s holds user layers ``[user_boundaries[s], user_boundaries[s + 1])``."""
        return list(itertools.accumulate(self.counts, initial=0))

    @property
    def boundaries(self) -> list[int]:
        """DeepSpeed's stage boundaries (``num_stages + 1`` of them): stage s holds DeepSpeed layers
        ``[boundaries[s], boundaries[s + 1])``."""
        user = self.user_boundaries
        return user[:-1] + [user[-1] + len(LAST_KINDS) - 1]
