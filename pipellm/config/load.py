"""The training YAML → ``TrainConfig``: one file holds pipellm's keys and DeepSpeed's.

A top-level key that is a field of ``TrainConfig`` is ours and is built into the typed dataclasses, names and types
checked; a key DeepSpeed knows goes to ``deepspeed.initialize`` untouched; anything else is an error that names the
closest known key. The values are then checked once (``pipellm.config.checks``), before any process group exists,
so a bad file costs one line and exit code 2, not a hang.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path

import yaml

from pipellm.config.checks import check_config
from pipellm.config.deepspeed_keys import DEEPSPEED_KEYS
from pipellm.config.schema import TrainConfig
from pipellm.config.typecheck import suggest, type_name, type_ok
from pipellm.errors import PipellmError

# Spellings of the original project that keep working.
ALIASES = {"n_epoches": "n_epochs"}


def optional_section(hint):
    """The dataclass of a section key: ``hint`` itself, or ``X`` of ``X | None`` (``lora``); None for a plain key."""
    candidates = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return next((c for c in candidates if dataclasses.is_dataclass(c)), None)


def build(cls, raw, where: str, source: str):
    """Instantiate dataclass ``cls`` from mapping ``raw``, checking names and types; ``where`` is the key path."""
    if not isinstance(raw, dict):
        raise PipellmError(f"{source}: `{where}` must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        name = ALIASES.get(key, key)
        path = f"{where}.{key}" if where else key
        if name not in fields:
            raise PipellmError(f"{source}: unknown key `{path}`{suggest(key, fields)}")
        section = optional_section(hints[name])
        if section is not None and (value is not None or section is hints[name]):
            value = build(section, value, path, source)
        elif not type_ok(value, hints[name]):
            raise PipellmError(f"{source}: `{path}` must be {type_name(hints[name])}, got {value!r}")
        values[name] = value
    missing = [n for n, f in fields.items() if n not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise PipellmError(f"{source}: missing required key `{where + '.' if where else ''}{missing[0]}`")
    return cls(**values)


def parse_launcher_args(description: str, argv=None):
    """``--config PATH`` (and the ``--local_rank`` the deepspeed launcher appends) of the training scripts."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="training YAML (pipellm and DeepSpeed keys)")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    return parser.parse_args(argv)


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise PipellmError(f"config file {path} does not exist; pass --config PATH to a YAML file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise PipellmError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise PipellmError(f"{path}: the top level must be a mapping of keys to values")
    return raw


def load_config(path: str | Path) -> TrainConfig:
    """Read and check the YAML file's own content (the file system, the world size and the model are checked by
    ``validate_environment`` and ``pipellm.pipeline.partition.PipelineLayers.check_parts``)."""
    path = Path(path)
    raw = read_yaml(path)
    ours_names = {f.name for f in dataclasses.fields(TrainConfig)} | set(ALIASES)
    ours, ds_keys = {}, {}
    for key, value in raw.items():
        if key in ours_names and key != "deepspeed":
            ours[key] = value
        elif key in DEEPSPEED_KEYS:
            ds_keys[key] = value
        else:
            known = (ours_names | DEEPSPEED_KEYS) - {"deepspeed"}
            raise PipellmError(f"{path}: unknown key `{key}`{suggest(key, known)}")
    if "n_epochs" in ours and "n_epoches" in ours:
        raise PipellmError(f"{path}: give `n_epochs` or its old spelling `n_epoches`, not both")
    if "lr_schedule" in ours and "scheduler" in ds_keys:
        raise PipellmError(f"{path}: give pipellm's `lr_schedule` or DeepSpeed's `scheduler`, not both")
    cfg = build(TrainConfig, ours, "", str(path))
    cfg.deepspeed = ds_keys
    cfg.source = str(path)
    check_config(cfg)
    return cfg


def dump_resolved(cfg: TrainConfig) -> str:
    """The configuration as run, for the run directory."""
    return json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True)
