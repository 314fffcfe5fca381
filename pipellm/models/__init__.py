"""Registry of supported model families, keyed by the Hugging Face ``model_type``."""
from __future__ import annotations

from pipellm.models import llama
from pipellm.models.base import ModelFamily

FAMILIES: dict[str, ModelFamily] = {family.name: family for family in (llama.FAMILY,)}


def get_family(model_type: str) -> ModelFamily:
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]
