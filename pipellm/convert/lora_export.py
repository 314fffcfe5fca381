"""Exports of a LoRA checkpoint (one with ``lora.json``, ``pipellm.training.lora``), for ``pp_to_hg``.

* **merged** (default): each layer is the base model's layer file with every adapter merged into its module's
  weight as peft's ``merge_and_unload`` does (``W + (B @ A) * alpha / r``, added in the weight's dtype; bf16 for a
  QLoRA run) and the ``modules_to_save`` layers' trained weights in place of the base's: a plain checkpoint.
* **adapter** (``--lora-export adapter``): a PEFT adapter directory, ``adapter_config.json`` and
  ``adapter_model.safetensors`` with the keys ``PeftModel.save_pretrained`` writes
  (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``), which
  ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), OUT)`` loads. The module names are the
  family's checkpoint names, so it fits a transformers model with the same module names (llama, bloom, mixtral's
  attention); export merged for the others. ``modules_to_save`` runs export merged only, but for a reward model's
  score head (``modules_to_save: [head]``, which a LoRA reward run needs): its trained ``score.weight`` goes in as
  ``base_model.model.score.weight`` with ``task_type: SEQ_CLS`` and ``modules_to_save: [score]``, as
  ``PeftModel.save_pretrained`` writes a ``*ForSequenceClassification`` adapter, which
  ``PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(BASE), OUT)`` loads.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from pipellm.errors import PipellmError
from pipellm.files import load_torch_file
from pipellm.pipeline.layer_files import layer_file_name
from pipellm.pipeline.partition import PipelineLayers
from pipellm.training.lora import ADAPTER_MARK, peft_config, read_lora_file

LORA_EXPORTS = ("merged", "adapter")
"""``pp_to_hg --lora-export`` choices."""


def merge_layer(base: dict, trained: dict, scaling: float, dtype: torch.dtype | None = None) -> dict:
    """A layer's base state dict with ``trained`` (a LoRA checkpoint's layer file) merged in."""
    merged = dict(base)
    for key, tensor in trained.items():
        if ".lora_B." in key:
            continue
        if ".lora_A." not in key:  # a modules_to_save layer's own weight
            merged[key] = tensor
            continue
        module, _, rest = key.partition(".lora_A.")
        b = trained[f"{module}.lora_B.{rest}"]
        weight = merged[f"{module}.weight"]
        delta = (b.float() @ tensor.float()) * scaling
        merged[f"{module}.weight"] = weight + delta.to(weight.dtype)
    return {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in merged.items()}


def merged_layer_reader(ckpt_dir: Path) -> tuple[Callable[[int], dict], Path] | None:
    """For a LoRA checkpoint, ``(layer file index -> merged state dict, base model directory)``; else None."""
    found = read_lora_file(ckpt_dir)
    if found is None:
        return None
    lora, base_dir = found
    base_dir = Path(base_dir)
    if not base_dir.is_dir():
        raise PipellmError(f"{ckpt_dir / 'lora.json'} names the base model {base_dir}, which does not exist; "
                           f"put the base model's pipeline layer files (hg_to_pp) there")
    quantized = json.loads((ckpt_dir / "lora.json").read_text()).get("quantize_base")
    dtype = torch.bfloat16 if quantized else None

    def read(idx: int) -> dict:
        base = load_torch_file(base_dir / layer_file_name(idx), mmap=True)
        trained = load_torch_file(ckpt_dir / layer_file_name(idx), mmap=True)
        return merge_layer(base, trained, lora.alpha / lora.r, dtype)
    return read, base_dir


def write_peft_adapter(ckpt_dir: Path, tmp: Path) -> None:
    """The PEFT adapter directory of a LoRA checkpoint into ``tmp`` (module docstring)."""
    from pipellm.models import load_model_config

    found = read_lora_file(ckpt_dir)
    if found is None:
        raise PipellmError(f"--lora-export adapter: {ckpt_dir} is not a LoRA checkpoint (no lora.json); drop "
                           f"--lora-export")
    lora, base_dir = found
    config, family = load_model_config(ckpt_dir)
    saved_kinds = {"head"} if family.scores else set()  # peft saves a classifier's score head whole
    if set(lora.modules_to_save) - saved_kinds:
        raise PipellmError(f"--lora-export adapter: the run trained {lora.modules_to_save} fully "
                           f"(modules_to_save), which the adapter export does not write; export merged instead")
    layers, tensors = PipelineLayers.of(family, config), {}
    for idx in range(layers.num_files):
        kind, decoder_index = layers.kind(idx)
        for key, tensor in load_torch_file(ckpt_dir / layer_file_name(idx)).items():
            if ADAPTER_MARK in key or kind in lora.modules_to_save:
                name = family.key_map.hf_key(kind, decoder_index, key).replace(".default.", ".")
                tensors[f"base_model.model.{name}"] = tensor.contiguous()
    settings = peft_config(lora)
    settings.base_model_name_or_path = str(base_dir)
    settings.task_type = "SEQ_CLS" if family.scores else "CAUSAL_LM"
    if lora.modules_to_save:
        settings.modules_to_save = [family.key_map.prefixes["head"].removesuffix(".")]  # "score"
    settings.save_pretrained(str(tmp))
    save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
