"""Registry of supported model families, keyed by the Hugging Face ``model_type``."""
from __future__ import annotations

import json
import os
from pathlib import Path

from pipellm.errors import PipellmError
from pipellm.models import baichuan, bloom, chatglm, llama, mixtral
from pipellm.models.base import ModelFamily, is_reward_config

FAMILIES: dict[str, ModelFamily] = {family.name: family for family in (
    llama.FAMILY, bloom.FAMILY, baichuan.FAMILY, chatglm.FAMILY, mixtral.FAMILY)}


def get_family(model_type: str) -> ModelFamily:
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]


def load_model_config(model_dir: str | os.PathLike):
    """``(hf_config, family)`` for the ``config.json`` in ``model_dir``, without running any of the model's code.

    A ``model_type`` transformers knows is parsed by its own config class. One it does not know (checkpoints made
    for remote code, such as baichuan's) becomes a plain ``PretrainedConfig`` holding the file's keys as
    attributes (or the family's ``config_class``, pipellm's own, where the file's names differ from pipellm's):
    the family's modules read what they need from it, and ``auto_map`` is never followed. A reward model's config
    (``is_reward_config``) gives the family's ``scoring`` variant.
    """
    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        raise PipellmError(f"{config_path} not found; the model directory must contain its Hugging Face "
                           f"config.json")
    # Check the family before transformers parses the file, so that a model_type transformers does not
    # know gets the same clear message as one it knows but pipellm does not support.
    try:
        raw = json.loads(config_path.read_text())
        model_type = raw.get("model_type")
    except (json.JSONDecodeError, AttributeError) as err:
        raise PipellmError(f"{config_path} is not a JSON object ({err}); restore the original config.json")
    try:
        family = get_family(model_type)
    except ValueError as err:
        raise PipellmError(f"{config_path}: {err}") from None
    from transformers import AutoConfig, PretrainedConfig  # heavy import, only once a config is really read
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        if model_type in CONFIG_MAPPING:
            hf_config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
        else:
            hf_config = (family.config_class or PretrainedConfig).from_dict(raw)
    except (OSError, ValueError, TypeError, KeyError) as err:  # KeyError: transformers' rope settings check
        reason = str(err.args[0] if err.args else err).splitlines()[0]
        raise PipellmError(f"{config_path}: cannot read it ({reason}); restore the original config.json") from None
    family.check_config(hf_config, config_path)
    if is_reward_config(raw):
        if hf_config.num_labels != 1:
            raise PipellmError(f"{config_path}: a sequence classifier with {hf_config.num_labels} labels; a reward "
                               f"model scores with one (num_labels: 1)")
        family = family.scoring()
    return hf_config, family
