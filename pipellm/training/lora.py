"""LoRA and QLoRA (``lora:``, ``quantize_base:``): peft's LoRA layers on the decoders' linear modules, the base
frozen, only the adapters (and the layers of ``modules_to_save``) trained.

**Where adapters go.** In the pipeline, ``LoraParameters.prepare_layer`` injects peft's layers
(``peft.inject_adapter_in_model`` with a ``peft.LoraConfig``) into each decoder layer of the stage, after the
base weights are loaded and before the parameters are named; each layer's adapters are initialised from
``seed`` and the layer's file index, so 1 and 2 stages start from the same adapters. In ``train_ds_zero.py`` the
same ``LoraConfig`` goes to the transformers model (``prepare_transformers_model``).

**Names.** A parameter is named by its Hugging Face checkpoint key with peft's names inside the adapted module:
``model.layers.0.self_attn.q_proj.lora_A.default.weight`` (the frozen base weight is
``...q_proj.base_layer.weight``). These are exactly the names peft gives the parameters of the transformers model
minus peft's ``base_model.model.`` prefix; a PEFT adapter file (``pp_to_hg --lora-export adapter``) holds them
with that prefix and without the adapter name ``default``, as ``PeftModel.save_pretrained`` writes them.

**Checkpoints** hold only what trains (DeepSpeed's ``exclude_frozen_parameters``): each layer file has its
adapters (an embedding layer without any: an empty file), the optimizer state is the adapters', and
``lora.json`` names the base model's path and the adapters' settings (``pipellm.convert.lora_export`` reads it).

**As a DPO reference** (``pipellm.training.reference``) the model is its base: ``reference_mode`` turns every
adapter off for the reference pass, as peft's ``PeftModel.disable_adapter`` does; a full checkpoint named in
``dpo.reference`` loads under peft's ``base_layer`` names (``full_layer_state``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
from pathlib import Path

import torch
from torch import nn

from pipellm.config.schema import Lora
from pipellm.errors import PipellmError
from pipellm.models.base import KeyMap
from pipellm.training.parameters import NamedParameters

LORA_FILE = "lora.json"
"""The file of a LoRA checkpoint directory that says how to rebuild the model: base path and adapter settings."""
ADAPTER_MARK = ".lora_"
"""What peft's adapter parameter names contain (``lora_A``, ``lora_B``)."""


def decoder_linear_names(family, hf_config) -> list[str]:
    """The names a ``target_modules`` entry may take: the decoder's linear modules, by their last name."""
    from pipellm.models.attention import AttentionOptions

    with torch.device("meta"):
        decoder = family.decoder(hf_config, AttentionOptions())
    return sorted({name.rsplit(".", 1)[-1] for name, module in decoder.named_modules() if isinstance(module, nn.Linear)})


def check_lora_model(lora: Lora | None, quantize_base: str | None, family, hf_config, source: str) -> None:
    """What needs the model and the machine: every target names a decoder linear module; QLoRA's bitsandbytes."""
    if lora is None:
        return
    known = decoder_linear_names(family, hf_config)
    unknown = [name for name in lora.target_modules if name not in known]
    if unknown:
        raise PipellmError(f"{source}: `lora.target_modules` {unknown} are not linear modules of {family.name}'s "
                           f"decoder layers; they are: {', '.join(known)}")
    if quantize_base is not None:
        check_bitsandbytes(source)


def check_bitsandbytes(source: str) -> None:
    """QLoRA needs bitsandbytes installed and a CUDA GPU for its 4-bit kernels."""
    if importlib.util.find_spec("bitsandbytes") is None:
        missing = "the bitsandbytes package"
    elif not torch.cuda.is_available():
        missing = "a CUDA GPU"
    else:
        return
    raise PipellmError(f"{source}: `quantize_base: nf4` needs bitsandbytes' 4-bit kernels, and this machine "
                       f"lacks {missing}; pip install bitsandbytes and train on GPUs, or remove `quantize_base` "
                       f"(LoRA on the unquantized base)")


def peft_config(lora: Lora):
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=list(lora.target_modules), bias="none")


def quantize_linears(module: nn.Module, compute_dtype: torch.dtype) -> None:
    """QLoRA: every ``nn.Linear`` of ``module`` becomes a bitsandbytes NF4 ``Linear4bit`` holding the same weights
    (quantized when the module moves to the GPU); peft then wraps them with its own bitsandbytes LoRA layers."""
    import bitsandbytes as bnb

    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            quantized = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=compute_dtype, quant_type="nf4", device="cpu")
            quantized.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4")
            if child.bias is not None:
                quantized.bias = nn.Parameter(child.bias.data.cpu(), requires_grad=False)
            setattr(module, name, quantized.to(child.weight.device))
        else:
            quantize_linears(child, compute_dtype)


@dataclasses.dataclass(frozen=True)
class LoraParameters:
    """The parameter set of a LoRA run (``pipellm.training.parameters.ParameterSet``)."""

    lora: Lora
    seed: int
    key_map: KeyMap
    """The family's checkpoint key map: which layer kind a parameter name belongs to (``modules_to_save``)."""
    full_kinds: frozenset[str] = frozenset()
    """Layer kinds trained fully (``modules_to_save``; with tied embeddings ``embed`` and ``head`` are one)."""
    quantize_base: str | None = None
    compute_dtype: torch.dtype = torch.float32
    """The dtype QLoRA's 4-bit layers compute in (the run's precision)."""
    base_model_path: str = ""
    """Where the frozen base comes from; recorded in every checkpoint (``lora.json``)."""
    saves_frozen: bool = False

    @classmethod
    def of(cls, cfg) -> LoraParameters:
        from pipellm.models import load_model_config

        hf_config, family = load_model_config(cfg.model_path)
        kinds = set(cfg.lora.modules_to_save)
        if family.is_tied(hf_config) and kinds & {"embed", "head"}:
            kinds |= {"embed", "head"}
        return cls(cfg.lora, cfg.seed, family.key_map, frozenset(kinds), cfg.quantize_base,
                   cfg.deepspeed_settings.dtype, cfg.model_path)

    def prepare_layer(self, module: nn.Module, kind: str, file_index: int) -> None:
        """Inject adapters into a decoder layer (after its base weights are loaded)."""
        from peft import inject_adapter_in_model

        if kind != "decoder":
            return
        if self.quantize_base is not None:
            quantize_linears(module, self.compute_dtype)
        with torch.random.fork_rng(devices=[]):  # peft initialises the adapters on the CPU
            torch.manual_seed(self.seed + file_index)
            inject_adapter_in_model(peft_config(self.lora), module)

    def prepare_transformers_model(self, model: nn.Module) -> nn.Module:
        """The same adapters on a transformers model (``train_ds_zero.py``)."""
        from peft import inject_adapter_in_model

        torch.manual_seed(self.seed)
        try:
            return inject_adapter_in_model(peft_config(self.lora), model)
        except ValueError as err:  # e.g. mixtral's experts, which transformers fuses into one tensor
            raise PipellmError(f"`lora.target_modules` {self.lora.target_modules} on transformers' "
                               f"{type(model).__name__}: {str(err).splitlines()[0]}") from None

    def trains(self, name: str) -> bool:
        """An adapter, or a parameter of a layer kind of ``modules_to_save``."""
        if ADAPTER_MARK in name:
            return True
        parsed = self.key_map.parse_hf_key(name)
        return parsed is not None and parsed[0] in self.full_kinds

    def trainable(self, named_parameters: NamedParameters) -> NamedParameters:
        chosen = []
        for name, param in named_parameters:
            train = self.trains(name)
            param.requires_grad_(train)
            if train:
                chosen.append((name, param))
        return chosen

    @contextlib.contextmanager
    def reference_mode(self, model: nn.Module):
        """While open, ``model`` computes as its base: every peft layer's adapters off (peft's ``enable_adapters``,
        as ``PeftModel.disable_adapter``); afterwards on again, with every ``requires_grad`` as it was (peft's
        toggle sets the adapters' own)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [module for module in model.modules() if isinstance(module, BaseTunerLayer)]
        trains = [(param, param.requires_grad) for param in model.parameters()]
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in layers:
                layer.enable_adapters(True)
            for param, flag in trains:
                param.requires_grad_(flag)

    def full_layer_state(self, module: nn.Module, state: dict) -> dict:
        """A full checkpoint's layer file (``state``, no adapters) under the adapted ``module``'s names: each base
        weight where peft's ``base_layer`` holds it, the adapters' current values kept (a DPO reference loads it
        and computes with the adapters off)."""
        if self.quantize_base is not None:
            raise PipellmError(f"`quantize_base: {self.quantize_base}`: QLoRA's 4-bit base cannot load other "
                               f"weights for the DPO reference pass (here: the initial `lora.modules_to_save` "
                               f"layers of a resumed run whose save_path lost its reference_logps cache); start "
                               f"the run again in a new save_path")
        own = module.state_dict()
        base_names = {key.replace(".base_layer.", "."): key for key in own if ".base_layer." in key}
        renamed = {base_names.get(key, key): value for key, value in state.items()}
        return {**{key: value for key, value in own.items() if ADAPTER_MARK in key}, **renamed}

    def write_files(self, checkpoint_dir: Path) -> None:
        """``lora.json``: the base model's path and the adapters' settings."""
        record = {"base_model_path": str(Path(self.base_model_path).resolve()), **dataclasses.asdict(self.lora),
                  "quantize_base": self.quantize_base}
        (checkpoint_dir / LORA_FILE).write_text(json.dumps(record, indent=2) + "\n")


def read_lora_file(checkpoint_dir: Path) -> tuple[Lora, str] | None:
    """``(settings, base model path)`` of a LoRA checkpoint directory; None for any other checkpoint."""
    path = Path(checkpoint_dir) / LORA_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    base = record.pop("base_model_path")
    record.pop("quantize_base", None)
    return Lora(**record), base
