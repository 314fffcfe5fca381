"""Which layers each pipeline stage holds: the user's ``parts`` turned into DeepSpeed layer boundaries."""
from __future__ import annotations

import torch
from deepspeed.runtime import utils as ds_utils

from pipellm.models.base import ModelFamily


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
