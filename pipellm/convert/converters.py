"""Convert checkpoints between Hugging Face format and pipellm's one-file-per-pipeline-layer format.

A pipeline checkpoint directory holds ``layer_XX-model_states.pt`` files, named and laid out exactly as
DeepSpeed's ``PipelineModule`` saves and loads them (each is ``torch.save`` of one layer module's
``state_dict``), next to ``config.json`` and the tokenizer files. Layer numbering and the key map come from
the model family (``pipellm.models.base``); with tied embeddings the head layer has no file.

* ``hg_to_pp``: Hugging Face directory (safetensors or ``.bin``, sharded or not) -> pipeline layer files.
* ``pp_to_hg``: pipeline layer files (a converted directory or a DeepSpeed training save) -> sharded
  safetensors that ``AutoModelForCausalLM.from_pretrained`` loads (a reward model's:
  ``AutoModelForSequenceClassification``; its key map is the family's ``scoring`` one).

Both stream: they hold about one pipeline layer (plus, for ``pp_to_hg``, one output shard) in memory, never
the whole model. Tensors are copied bit for bit, never cast. Output is written into a temporary directory
beside the target and renamed into place at the end, so a failure leaves nothing half-written.

Command line: ``python convert_model.py {hg_to_pp,pp_to_hg} --input-path IN --save-path OUT``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from pipellm.convert.lora_export import LORA_EXPORTS, merged_layer_reader, write_peft_adapter
from pipellm.convert.reward import drop_output_projection, pad_id_of, write_score_head
from pipellm.convert.output_dir import Interrupted, atomic_output_dir, stopped_by_signal
from pipellm.files import load_torch_file
from pipellm.pipeline.layer_files import LAYER_FILE_RE, copy_model_files, layer_file_name, resolve_checkpoint_dir
from pipellm.pipeline.partition import PipelineLayers
from pipellm.errors import PipellmError
from pipellm.models import load_model_config
from pipellm.models.base import Export, KeyMap, ModelFamily
from pipellm.training.lora import LORA_FILE

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
def parse_size(size: str | int) -> int:
    """Bytes in a size such as ``"5GB"``, ``"200MB"``, ``"2KiB"`` or ``1000`` (units as in transformers)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", size.upper())
    if not match:
        raise PipellmError(f"cannot read size {size!r}; write it like 5GB, 200MB, 2KiB or a number of bytes")
    number, unit = float(match.group(1)), match.group(2).rstrip("B") or "B"
    scale = {"B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}.get(unit)
    if scale is None or number * scale < 1:
        raise PipellmError(f"cannot read size {size!r}; write it like 5GB, 200MB, 2KiB or a number of bytes")
    return int(number * scale)


def _owned_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous copy with its own storage, so a file never carries a bigger shared storage."""
    return torch.clone(tensor, memory_format=torch.contiguous_format)


class _HFWeights:
    """Tensor-by-tensor access to the weights of a Hugging Face checkpoint directory.

    Safetensors files are opened lazily (memory-mapped, one tensor read at a time). A ``.bin`` file is
    loaded memory-mapped and with ``weights_only=True``; only the last one used stays open, so reading in
    layer order maps about one shard at a time.
    """

    def __init__(self, model_dir: Path):
        self.dir = model_dir
        self._stack = contextlib.ExitStack()
        self._safetensors: dict[str, object] = {}
        self._bin: tuple[str, dict[str, torch.Tensor]] | None = None
        self.key_to_file = self._index()

    def _index(self) -> dict[str, str]:
        for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
            index_path = self.dir / index_name
            if index_path.is_file():
                weight_map = json.loads(index_path.read_text())["weight_map"]
                for file_name in sorted(set(weight_map.values())):
                    if not (self.dir / file_name).is_file():
                        raise PipellmError(f"{index_path} lists shard {file_name} but {self.dir / file_name} "
                                           f"is missing; copy the complete checkpoint")
                return dict(weight_map)
        if (self.dir / SAFETENSORS_SINGLE).is_file():
            return dict.fromkeys(self._safetensors_file(SAFETENSORS_SINGLE).keys(), SAFETENSORS_SINGLE)
        if (self.dir / BIN_SINGLE).is_file():
            return dict.fromkeys(load_torch_file(self.dir / BIN_SINGLE, mmap=True), BIN_SINGLE)
        raise PipellmError(f"no weights in {self.dir}: expected {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, "
                           f"{BIN_SINGLE} or {BIN_INDEX}")

    def _safetensors_file(self, file_name: str):
        if file_name not in self._safetensors:
            try:
                self._safetensors[file_name] = self._stack.enter_context(
                    safe_open(self.dir / file_name, framework="pt"))
            except SafetensorError as err:
                raise PipellmError(f"{self.dir / file_name}: cannot read it, the file is truncated or corrupted "
                                   f"({err}); copy it again from its source") from None
        return self._safetensors[file_name]

    def get(self, key: str) -> torch.Tensor:
        file_name = self.key_to_file[key]
        if file_name.endswith(".safetensors"):
            try:
                return self._safetensors_file(file_name).get_tensor(key)
            except SafetensorError as err:
                raise PipellmError(f"{self.dir / file_name}: cannot read tensor {key} ({err}); the file is "
                                   f"corrupted: copy it again from its source") from None
        if self._bin is None or self._bin[0] != file_name:
            self._bin = None  # drop the previous shard's mapping before mapping the next one
            self._bin = (file_name, load_torch_file(self.dir / file_name, mmap=True))
        if key not in self._bin[1]:
            raise PipellmError(f"{self.dir / file_name} has no tensor {key}, which the index names; the checkpoint "
                               f"is incomplete or mixed: copy it again from its source")
        return self._bin[1][key]

    def size(self) -> int:
        """Bytes of the weight files: about what a conversion writes."""
        return sum((self.dir / name).stat().st_size for name in set(self.key_to_file.values()))

    def close(self) -> None:
        self._stack.close()
        self._bin = None


def _group_by_layer(keys, family: ModelFamily, config, source: Path) -> dict[int, list[tuple[str, str]]]:
    """Pipeline layer index -> ``(checkpoint key, key inside the layer)`` of the tensors it owns.

    Rejects keys that no layer owns and layers without tensors: both mean config.json and weights disagree.
    """
    ignored = [re.compile(pattern) for pattern in family.ignored_hf_keys]
    pipeline = PipelineLayers.of(family, config)
    layers: dict[int, list[tuple[str, str]]] = defaultdict(list)
    unowned = []
    for key in keys:
        if any(pattern.search(key) for pattern in ignored):
            continue
        parsed = family.key_map.parse_hf_key(key)
        if parsed is None or (parsed[0] == "decoder" and parsed[1] >= pipeline.num_decoders):
            unowned.append(key)
        elif parsed[0] == "head" and pipeline.tied:
            continue  # some tied checkpoints still store the head: it is the embedding, which layer 0 holds
        else:
            layers[pipeline.index(parsed[0], parsed[1])].append((key, parsed[2]))
    if unowned:
        shown = ", ".join(unowned[:5]) + (f" and {len(unowned) - 5} more" if len(unowned) > 5 else "")
        raise PipellmError(f"{source}: {len(unowned)} checkpoint keys belong to no pipeline layer of a "
                           f"{pipeline.num_decoders}-layer {family.name} model ({shown}); check that config.json "
                           f"matches the weights")
    missing = [idx for idx in range(pipeline.num_files) if idx not in layers]
    if missing:
        kind, decoder_index = pipeline.kind(missing[0])
        prefix = family.key_map.hf_key(kind, decoder_index, "")
        raise PipellmError(f"{source}: no tensors for pipeline layer {missing[0]} (keys starting with "
                           f"{prefix!r}); check that config.json matches the weights")
    return layers


def hg_to_pp(input_path: str | os.PathLike, save_path: str | os.PathLike, overwrite: bool = False,
             init_reward_head: bool = False) -> Path:
    """Convert a Hugging Face checkpoint directory into pipeline layer files; returns the save path.
    ``init_reward_head``: a reward model with a new score head instead of the output projection
    (``pipellm.convert.reward``)."""
    input_path, save_path = Path(input_path), Path(save_path)
    if not input_path.is_dir():
        raise PipellmError(f"input path {input_path} does not exist or is not a directory; pass a Hugging Face "
                           f"model directory with config.json and weights")
    config, family = load_model_config(input_path)
    weights = _HFWeights(input_path)
    try:
        layers = _group_by_layer(weights.key_to_file, family, config, input_path)
        if init_reward_head:
            family, pad_id = drop_output_projection(family, config, layers, input_path), pad_id_of(input_path)
        with atomic_output_dir(save_path, input_path, overwrite, weights.size()) as tmp:
            # The bar closes (ends its line) before an error's one line; not drawn into a non-terminal log.
            with tqdm(sorted(layers), desc="hg_to_pp", unit="layer", disable=None) as progress:
                for idx in progress:
                    # Read in file order so a .bin shard is mapped once per layer, not once per tensor.
                    keys = sorted(layers[idx], key=lambda pair: (weights.key_to_file[pair[0]], pair[0]))
                    state = {layer_key: _owned_copy(weights.get(hf_key)) for hf_key, layer_key in keys}
                    torch.save(state, tmp / layer_file_name(idx))
                    del state
            copy_model_files(input_path, tmp)
            if init_reward_head:
                write_score_head(family, config, input_path, tmp, pad_id)
    finally:
        weights.close()
    return save_path


class _ShardWriter:
    """Writes tensors into safetensors shards of at most ``max_bytes`` (a bigger tensor gets its own shard).

    Shards are first written under provisional names, since their count is only known at the end.
    """

    def __init__(self, out_dir: Path, max_bytes: int):
        self.out_dir, self.max_bytes = out_dir, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []  # keys of each written shard
        self.total_size = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[key] = tensor
        self.pending_bytes += size
        self.total_size += size

    def _flush(self) -> None:
        save_file(self.pending, self.out_dir / f"shard-{len(self.shards):05d}.tmp", metadata={"format": "pt"})
        self.shards.append(sorted(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        """Write the last shard and give every shard its final name (and the index if there are several)."""
        if self.pending:
            self._flush()
        count = len(self.shards)
        if count == 1:
            (self.out_dir / "shard-00000.tmp").rename(self.out_dir / SAFETENSORS_SINGLE)
            return
        weight_map = {}
        for i, keys in enumerate(self.shards):
            name = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            (self.out_dir / f"shard-{i:05d}.tmp").rename(self.out_dir / name)
            weight_map.update(dict.fromkeys(keys, name))
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _export(family: ModelFamily, export_as: str | None, ckpt_dir: Path) -> Export | None:
    if export_as is None:
        return None
    if export_as not in family.exports:
        offered = ", ".join(sorted(family.exports)) or "none"
        raise PipellmError(f"--export-as {export_as}: {ckpt_dir / 'config.json'} is a {family.name} model, whose "
                           f"exports are: {offered}; drop --export-as to write the {family.name} layout")
    return family.exports[export_as]


def pp_to_hg(input_path: str | os.PathLike, save_path: str | os.PathLike, max_shard_size: str | int = "5GB",
             overwrite: bool = False, export_as: str | None = None, lora_export: str = "merged") -> Path:
    """Convert pipeline layer files into a Hugging Face safetensors checkpoint; returns the save path.

    ``export_as`` names one of the family's ``exports`` to write another layout (e.g. ``"llama"`` for baichuan).
    A LoRA checkpoint is merged into its base model, or with ``lora_export="adapter"`` written as a PEFT adapter
    directory (``pipellm.convert.lora_export``).
    """
    max_bytes = parse_size(max_shard_size)
    ckpt_dir = resolve_checkpoint_dir(input_path)
    if lora_export == "adapter":
        with atomic_output_dir(Path(save_path), ckpt_dir, overwrite, 0) as tmp:
            write_peft_adapter(ckpt_dir, tmp)
        return Path(save_path)
    lora = merged_layer_reader(ckpt_dir)
    read_layer, weights_dir = lora if lora else (lambda idx: load_torch_file(ckpt_dir / layer_file_name(idx),
                                                                              mmap=True), ckpt_dir)
    config, family = load_model_config(ckpt_dir)
    export = _export(family, export_as, ckpt_dir)
    key_map = export.key_map if export else family.key_map
    pipeline = PipelineLayers.of(family, config)
    n_layers = pipeline.num_files
    present = {int(m.group(1)) for p in ckpt_dir.iterdir() if (m := LAYER_FILE_RE.match(p.name))}
    missing = [layer_file_name(idx) for idx in range(n_layers) if idx not in present]
    if missing:
        raise PipellmError(f"{ckpt_dir / missing[0]} is missing ({len(missing)} layer files missing in all); "
                           f"the checkpoint is incomplete: copy all layer files or convert another checkpoint")
    extra = sorted(idx for idx in present if idx >= n_layers)
    if extra:
        raise PipellmError(f"{ckpt_dir / layer_file_name(extra[0])} is beyond the {n_layers} layers that "
                           f"config.json describes (num_hidden_layers, tie_word_embeddings); use the config "
                           f"the model was trained with")
    needed = sum((weights_dir / layer_file_name(idx)).stat().st_size for idx in range(n_layers))
    with atomic_output_dir(Path(save_path), ckpt_dir, overwrite, needed) as tmp:
        writer = _ShardWriter(tmp, max_bytes)
        float_dtypes = _write_layers(read_layer, ckpt_dir, pipeline, writer, key_map, export, config)
        config_json = json.loads((ckpt_dir / "config.json").read_text())
        if export:
            config_json = export.convert_config(config_json)
        config_changed = _record_weights_dtype(config_json, float_dtypes)
        if family.derived_hf_tensors and not export:
            for key, tensor in family.derived_hf_tensors(config, _config_dtype(config_json)).items():
                writer.add(key, tensor)
        writer.finish()
        copy_model_files(ckpt_dir, tmp)
        (tmp / LORA_FILE).unlink(missing_ok=True)  # merged: a plain checkpoint
        if export or config_changed:
            (tmp / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
    return Path(save_path)


def _write_layers(read_layer, ckpt_dir: Path, pipeline: PipelineLayers, writer: _ShardWriter, key_map: KeyMap,
                  export: Export | None, config) -> set[torch.dtype]:
    """Every layer's tensors (``read_layer(file index)``) to ``writer`` under their checkpoint keys; the floating
    dtypes they have."""
    float_dtypes = set()
    with tqdm(range(pipeline.num_files), desc="pp_to_hg", unit="layer", disable=None) as progress:
        for idx in progress:
            kind, decoder_index = pipeline.kind(idx)
            layer_path = ckpt_dir / layer_file_name(idx)
            state = read_layer(idx)
            if not isinstance(state, dict) or not state:
                raise PipellmError(f"{layer_path} holds no layer state dict; it is not a pipeline layer file")
            if export:
                state = export.convert_layer(kind, state, config)
            for key, tensor in state.items():
                writer.add(key_map.hf_key(kind, decoder_index, key), _owned_copy(tensor))
                if tensor.is_floating_point():
                    float_dtypes.add(tensor.dtype)
            del state
    return float_dtypes


def _record_weights_dtype(config_json: dict, float_dtypes: set[torch.dtype]) -> bool:
    """Make config.json's ``dtype`` name the precision the weights are stored in; True when it changed.

    A run trained in bf16 from an fp32 model saves bf16 layers under a config that still says float32, and
    ``from_pretrained(dtype="auto")`` (vLLM, TGI) would load it as that. A config without a dtype means float32.
    """
    if len(float_dtypes) != 1:
        return False
    stored = str(next(iter(float_dtypes))).removeprefix("torch.")
    keys = [key for key in ("dtype", "torch_dtype") if key in config_json] or ["dtype"]
    if all(config_json.get(key, "float32") == stored for key in keys):
        return False
    config_json.update(dict.fromkeys(keys, stored))
    return True


def _config_dtype(config_json: dict) -> torch.dtype:
    """The dtype config.json names for the model (float32 when it names none)."""
    name = config_json.get("dtype") or config_json.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="convert_model.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    to_pp = commands.add_parser("hg_to_pp", help="Hugging Face checkpoint -> pipeline layer files")
    to_hg = commands.add_parser("pp_to_hg", help="pipeline layer files -> Hugging Face safetensors")
    for sub, what in ((to_pp, "Hugging Face model directory"),
                      (to_hg, "pipeline checkpoint: converted dir, training save dir (with 'latest') or tag dir")):
        sub.add_argument("--input-path", required=True, help=what)
        sub.add_argument("--save-path", required=True, help="output directory (must not exist or be empty)")
        sub.add_argument("--overwrite", action="store_true", help="replace a non-empty save path")
    to_pp.add_argument("--init-reward-head", action="store_true",
                       help="start a reward model from a causal LM: a new score head replaces the output projection")
    to_hg.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB or 200MB")
    to_hg.add_argument("--export-as", default=None,
                       help="write another family's layout the model family offers (baichuan: llama)")
    to_hg.add_argument("--lora-export", choices=LORA_EXPORTS, default="merged",
                       help="a LoRA run: the base with the adapters merged (default), or a PEFT adapter directory")
    args = parser.parse_args(argv)
    try:
        with stopped_by_signal():
            if args.command == "hg_to_pp":
                hg_to_pp(args.input_path, args.save_path, overwrite=args.overwrite,
                         init_reward_head=args.init_reward_head)
            else:
                pp_to_hg(args.input_path, args.save_path, max_shard_size=args.max_shard_size,
                         overwrite=args.overwrite, export_as=args.export_as, lora_export=args.lora_export)
    except PipellmError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as stop:
        print(f"pipellm: stopped by {stop}; nothing was written to {args.save_path}", file=sys.stderr)
        sys.exit(128 + stop.signum)
    print(f"saved {args.save_path}")
