"""What a model family declares: its pipeline layers, its checkpoint key map and its default partition.

A family is data plus four plain ``nn.Module`` classes. It knows nothing about pipelines, stages or
DeepSpeed: ``pipellm.pipeline.stages`` turns the declaration into ``PipelineModule`` layers, and
``pipellm.convert.converters`` uses the key map to move tensors between a Hugging Face checkpoint and one file per
pipeline layer.

Pipeline layers, in order (how users, DeepSpeed and the layer files count them: ``pipellm.pipeline.partition``):

* ``embed``     token embedding; ``forward(input_ids) -> hidden``
* ``decoder``   one decoder block each; ``forward(hidden, position_ids) -> hidden``
* ``norm``      the final norm; ``forward(hidden) -> hidden``
* ``head``      the output projection, a bias-free ``weight`` (vocab x hidden); logits are
  ``hidden @ head_weight(weight).T``. With tied embeddings the head reuses the ``embed`` module's weight
  (DeepSpeed ``TiedLayerSpec``) and has no file of its own. A reward model (``ModelFamily.scoring``) has a
  ``ScoreHead`` there instead: hidden -> one score, never tied, checkpoint key ``score.weight``.
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Callable

from torch import nn

from pipellm.errors import PipellmError

LAYER_KINDS = ("embed", "decoder", "norm", "head")

SCORE_PREFIX = "score."
"""The checkpoint key prefix of a reward model's head, in every family (transformers' ``*ForSequenceClassification``
name it ``score``)."""


def stored_weight(weight):
    """The head's weight as stored: what most families compute logits against."""
    return weight


class ScoreHead(nn.Linear):
    """A reward model's head: one bias-free score per position (``hidden -> 1``), as the ``score`` layer of
    transformers' ``*ForSequenceClassification`` with ``num_labels: 1``."""

    def __init__(self, config):
        super().__init__(config.hidden_size, 1, bias=False)


def is_reward_config(raw: dict) -> bool:
    """Whether a ``config.json``'s contents describe a reward model: its ``architectures`` name a
    ``*ForSequenceClassification`` (``convert_model.py hg_to_pp --init-reward-head`` writes it)."""
    return any(str(name).endswith("ForSequenceClassification") for name in raw.get("architectures") or ())


@dataclasses.dataclass(frozen=True)
class KeyMap:
    """Where each pipeline layer's tensors live in a Hugging Face checkpoint.

    A pipeline layer file holds the layer module's ``state_dict``; the Hugging Face key of a tensor is the
    layer kind's prefix followed by the key inside the layer. ``{i}`` in the decoder prefix is the decoder
    index (0-based). ``accepted_prefixes`` lists further spellings found in the wild (for example a model
    saved without its ``transformer.`` wrapper); the first spelling in ``prefixes`` is the one written. An accepted
    spelling may be empty (bloom saved as a bare ``BloomModel`` has ``word_embeddings.weight`` at the top level):
    being the shortest, it is tried last.
    """

    prefixes: dict[str, str]
    """Layer kind -> key prefix, e.g. ``{"decoder": "model.layers.{i}.", ...}``; none may be empty."""
    accepted_prefixes: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    def spellings(self, kind: str) -> tuple[str, ...]:
        return (self.prefixes[kind],) + tuple(self.accepted_prefixes.get(kind, ()))

    def hf_key(self, kind: str, decoder_index: int | None, layer_key: str) -> str:
        return self.prefixes[kind].format(i=decoder_index) + layer_key

    def parse_hf_key(self, hf_key: str) -> tuple[str, int | None, str] | None:
        """``(kind, decoder_index, layer_key)`` for a checkpoint key, or None if no layer owns it.

        Decoder prefixes (with their index) are tried first, then the other prefixes longest first, so a short
        prefix such as bloom's ``transformer.`` (embedding) does not swallow ``transformer.ln_f.`` (final norm).
        """
        candidates = sorted(((kind, prefix) for kind in LAYER_KINDS for prefix in self.spellings(kind)),
                            key=lambda kp: ("{i}" not in kp[1], -len(kp[1])))
        for kind, prefix in candidates:
            if "{i}" in prefix:
                head, tail = prefix.split("{i}")
                match = re.match(re.escape(head) + r"(\d+)" + re.escape(tail), hf_key)
                if match:
                    return kind, int(match.group(1)), hf_key[match.end():]
            elif hf_key.startswith(prefix):
                return kind, None, hf_key[len(prefix):]
        return None


@dataclasses.dataclass(frozen=True)
class Export:
    """Another checkpoint layout that ``pp_to_hg --export-as NAME`` writes instead of the family's own (for
    example baichuan2 as a native llama that loads without remote code). Applied one layer at a time, so the
    export streams like the plain one."""

    key_map: KeyMap
    """Key prefixes of the target layout; its layer keys are the ones ``convert_layer`` returns."""
    convert_layer: Callable[[str, dict, object], dict]
    """``f(kind, layer_state_dict, hf_config) -> the layer's state dict in the target layout``."""
    convert_config: Callable[[dict], dict]
    """``f(config.json contents) -> the target's config.json contents``."""


ABSENT = object()


@dataclasses.dataclass(frozen=True)
class Supported:
    """The values of one ``config.json`` key that a family's modules implement: any other value describes a model
    they would compute differently, so the config is refused when it is read."""

    key: str
    """The key; ``a.b`` for key ``b`` of the mapping ``a`` (``rope_parameters.rope_type``). An absent key means the
    module's default and passes."""
    values: tuple
    """The supported values."""
    fix: str = ""
    """What to do instead, when more can be said than "use a supported value"."""

    def value_in(self, hf_config):
        """The key's value in ``hf_config`` (attributes, then mapping keys), or ``ABSENT``."""
        head, *rest = self.key.split(".")
        value = getattr(hf_config, head, ABSENT)
        for name in rest:
            value = value.get(name, ABSENT) if isinstance(value, dict) else ABSENT
        return value

    def check(self, hf_config, config_path, family: str) -> None:
        value = self.value_in(hf_config)
        if value is not ABSENT and value not in self.values:
            supported = " or ".join(json.dumps(v) for v in self.values)
            raise PipellmError(f"{config_path}: {self.key} {json.dumps(value)} is not supported by pipellm's {family}; "
                               f"supported: {supported}{'; ' + self.fix if self.fix else ''}")


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """A model family as pipellm sees it. One instance per family, registered in ``pipellm.models``."""

    name: str
    """Value of ``model_type`` in the Hugging Face ``config.json``."""
    embed: type[nn.Module]
    decoder: type[nn.Module]
    norm: type[nn.Module]
    head: type[nn.Module]
    key_map: KeyMap
    tied_weight: str
    """Attribute path of the embedding weight inside ``embed`` that the head reuses when tied."""
    head_weight: Callable = stored_weight
    """``f(stored weight) -> the weight the logits are computed against`` (baichuan2 normalises its rows)."""
    default_parts: dict[int, list[int]] = dataclasses.field(default_factory=dict)
    """Recommended ``parts`` for a stage count, for the family's common sizes (keyed by stage count)."""
    ignored_hf_keys: tuple[str, ...] = ()
    """Regexes of checkpoint keys that hold nothing to train (buffers derived from the config)."""
    derived_hf_tensors: Callable | None = None
    """``f(hf_config, dtype) -> {checkpoint key: tensor}``: the persistent buffers of the family's own layout that
    ``ignored_hf_keys`` skips, computed as the original code computes them for a model of ``dtype``; ``pp_to_hg``
    writes them back, so an export holds every key of the original checkpoint."""
    exports: dict[str, Export] = dataclasses.field(default_factory=dict)
    """Other layouts ``pp_to_hg`` can write, by the name given to ``--export-as``."""
    supported_config: tuple[Supported, ...] = ()
    """The config.json keys whose values the modules implement only some of, checked by ``check_config``."""
    sequence_classification: str = ""
    """The ``architectures`` name a reward model of the family has in its ``config.json``: transformers' class for
    llama, mixtral and bloom; for families transformers lacks, a name pipellm gives (see ``scoring``)."""
    scores: bool = False
    """A reward model (``scoring``): the head is a ``ScoreHead``."""
    check_key_relations: Callable | None = None
    """``f(hf_config, config_path)``: raises ``PipellmError`` where a value is supported only together with another
    (mixtral's ``sliding_window`` against ``max_position_embeddings``); the table cannot say that."""
    config_class: type | None = None
    """A ``PretrainedConfig`` subclass (pipellm's own, no model code) that reads ``config.json`` for a
    ``model_type`` transformers does not know, when the file's names differ from the ones pipellm reads
    (``num_hidden_layers``, ``vocab_size``, ...). None: a plain ``PretrainedConfig`` holds the file's keys."""
    aux_loss: Callable | None = None
    """For a family with an auxiliary loss (mixtral's router load balancing): its decoders return
    ``(hidden, stats)``, the pipeline sums ``stats`` over the decoders of a micro batch and carries the sum to
    the head, and ``f(stats, hf_config) -> scalar`` (coefficient included) is added to that micro batch's loss
    (see ``pipellm.pipeline.token_mean_loss``). None: decoders return ``hidden`` and nothing more travels.
    Such a family's ``supported_config`` refuses tied embeddings (only an untied head carries the statistics)."""

    def check_config(self, hf_config, config_path) -> None:
        """Refuse, with one line naming ``config_path``, the key, its value and the supported ones, a config.json
        the family cannot train; ``pipellm.models.load_model_config`` calls it, before any process group."""
        for rule in self.supported_config:
            rule.check(hf_config, config_path, self.name)
        if self.check_key_relations is not None:
            self.check_key_relations(hf_config, config_path)

    def is_tied(self, hf_config) -> bool:
        return not self.scores and bool(getattr(hf_config, "tie_word_embeddings", False))

    def scoring(self) -> "ModelFamily":
        """The family's reward model: the same layers with a ``ScoreHead`` (its own layer file, never tied, key
        ``score.weight``) where the output projection was; no other export layouts."""
        prefixes = {**self.key_map.prefixes, "head": SCORE_PREFIX}
        accepted = {kind: spellings for kind, spellings in self.key_map.accepted_prefixes.items() if kind != "head"}
        return dataclasses.replace(self, head=ScoreHead, head_weight=stored_weight, key_map=KeyMap(prefixes, accepted),
                                   exports={}, scores=True)

    def num_decoder_layers(self, hf_config) -> int:
        return int(hf_config.num_hidden_layers)
