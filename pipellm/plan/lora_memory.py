"""LoRA in the memory model: which of a layer's parameters train, and what its frozen weights take.

With ``lora:`` the frozen base keeps only its weights (in the run's dtype; with ``quantize_base: nf4`` the
decoder's linear weights take 4 bits plus one fp32 scale per 64-weight block, bitsandbytes' NF4 layout), while
the adapters (``r * (in + out)`` per adapted linear module) and the ``modules_to_save`` layers have gradients,
master weights and optimizer states as any trained parameter (``memory.state_bytes``). Activations are the
measured ones of the base layers (the adapters' own are ``r / hidden`` of them and not itemised).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from pipellm.config.schema import Lora
from pipellm.plan.profile import Profile

NF4_BYTES = 0.5 + 4 / 64
"""Bytes per weight of a bitsandbytes NF4 linear layer: 4 bits and an fp32 absmax per block of 64."""


def decoder_counts(family, hf_config, lora: Lora, dtype_bytes: float, quantized: bool) -> tuple[int, float]:
    """``(adapter parameters, bytes of the frozen weights)`` of one decoder layer."""
    from pipellm.models.attention import AttentionOptions

    with torch.device("meta"):
        decoder = family.decoder(hf_config, AttentionOptions())
    adapters, frozen_bytes = 0, 0.0
    linear_weights = {id(m.weight) for m in decoder.modules() if isinstance(m, nn.Linear)}
    for name, module in decoder.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in lora.target_modules:
            adapters += lora.r * (module.in_features + module.out_features)
    for param in decoder.parameters():
        frozen_bytes += param.numel() * (NF4_BYTES if quantized and id(param) in linear_weights else dtype_bytes)
    return adapters, frozen_bytes


def with_lora(profile: Profile, lora: Lora, quantize_base: str | None, family, hf_config,
              dtype: torch.dtype) -> Profile:
    """``profile`` with each layer's trainable parameters and frozen weight bytes under ``lora``."""
    dtype_bytes = torch.finfo(dtype).bits / 8
    adapters, decoder_frozen = decoder_counts(family, hf_config, lora, dtype_bytes, quantize_base is not None)
    full = set(lora.modules_to_save) | ({"embed", "head"} if profile.tied_params and
                                          set(lora.modules_to_save) & {"embed", "head"} else set())

    def layer(cost, kind: str):
        trains = kind in full
        return dataclasses.replace(cost, trainable=cost.params if trains else 0,
                                   frozen_bytes=0.0 if trains else cost.params * dtype_bytes)
    # The head's parameters are the final norm's and the projection's: trained together (modules_to_save head).
    return dataclasses.replace(
        profile, embed=layer(profile.embed, "embed"), head=layer(profile.head, "head"),
        decoder=dataclasses.replace(profile.decoder, trainable=adapters, frozen_bytes=decoder_frozen))
