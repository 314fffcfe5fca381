"""A reward model started from a causal LM: ``convert_model.py hg_to_pp --init-reward-head``.

The causal LM's layers are converted as they are, but for its output projection, which a reward model does not
have. In its place the family's ``ScoreHead`` (``pipellm.models.base``: hidden -> 1, bias-free) gets its own layer
file, initialised as transformers initialises the ``score`` of a new ``*ForSequenceClassification``: normal(0,
``initializer_range``), drawn from a torch generator seeded with ``SCORE_HEAD_SEED`` (so a conversion repeats bit for
bit), in the dtype of the model's final norm. ``config.json`` becomes a reward model's (``reward_config``):
``architectures`` the family's ``*ForSequenceClassification``, one label, untied embeddings, and ``pad_token_id`` the
id pipellm pads rows with, which transformers' classifier needs to find each row's last token.

A Hugging Face ``*ForSequenceClassification`` checkpoint with one label converts without the flag (its
``score.weight`` is the head's file).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from pipellm.errors import PipellmError
from pipellm.models.base import ModelFamily
from pipellm.pipeline.layer_files import layer_file_name
from pipellm.pipeline.partition import PipelineLayers

SCORE_HEAD_SEED = 0
"""Seed of the new score head's initialisation."""


def reward_config(raw: dict, family: ModelFamily, pad_id: int) -> dict:
    """``config.json``'s contents for the reward model of the causal LM ``raw``."""
    return {**raw, "architectures": [family.sequence_classification], "id2label": {"0": "LABEL_0"},
            "label2id": {"LABEL_0": 0}, "tie_word_embeddings": False, "pad_token_id": pad_id}


def drop_output_projection(family: ModelFamily, config, layers: dict, source: Path) -> ModelFamily:
    """Remove the causal LM's output projection from ``layers`` (layer file index -> keys); the reward family."""
    if family.scores:
        raise PipellmError(f"{source} is a reward model already (its config.json names "
                           f"{family.sequence_classification}); convert it without --init-reward-head")
    layers.pop(PipelineLayers.of(family, config).index("head"), None)  # absent when tied: no file of its own
    return family.scoring()


def pad_id_of(model_dir: Path) -> int:
    """The id pipellm pads rows with; refused when it is the EOS id (transformers' classifier would then score the
    token before a sample's final EOS, not the EOS the pipeline scores)."""
    from pipellm.data.cache import pad_token_id
    from pipellm.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    pad_id = pad_token_id(tokenizer)
    if pad_id == tokenizer.eos_token_id:
        raise PipellmError(f"{model_dir}: the tokenizer pads with its EOS token ({pad_id}), so transformers' "
                           f"classifier could not tell a sample's final EOS from padding; give the tokenizer a pad "
                           f"token (e.g. \"pad_token\": \"<unk>\" in tokenizer_config.json) and convert again")
    return pad_id


def write_score_head(family: ModelFamily, config, source: Path, out: Path, pad_id: int) -> None:
    """The new score head's layer file and the reward ``config.json`` in ``out`` (the other layers written)."""
    layers = PipelineLayers.of(family, config)
    norm = torch.load(out / layer_file_name(layers.index("norm")), weights_only=True, map_location="cpu")
    dtype = next(t.dtype for t in norm.values() if t.is_floating_point())
    generator = torch.Generator().manual_seed(SCORE_HEAD_SEED)
    std = getattr(config, "initializer_range", 0.02)
    weight = torch.empty(1, config.hidden_size).normal_(0.0, std, generator=generator)
    torch.save({"weight": weight.to(dtype)}, out / layer_file_name(layers.index("head")))
    raw = json.loads((source / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(reward_config(raw, family, pad_id), indent=2) + "\n")
