"""The on-disk pipeline checkpoint format shared by the converters and training.

A pipeline checkpoint directory holds one ``layer_XX-model_states.pt`` per pipeline layer but a tied head
(``pipellm.pipeline.partition.PipelineLayers`` numbers them), named and laid out exactly as DeepSpeed's
``PipelineModule`` saves and loads them (each is ``torch.save`` of one layer module's
``state_dict``), next to ``config.json`` and the tokenizer files; a training checkpoint adds, per layer file
with trainable parameters, ``layer_XX-optim_states.pt``: their optimizer state by checkpoint name
(``pipellm.training.stage_checkpoint``). A training save directory holds one such directory per checkpoint tag
(``global_step<N>``), a ``latest`` file naming the newest and, with eval data, a ``best`` file naming the one
with the best eval loss (saving and resuming: ``pipellm.training.checkpointer``).
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from pipellm.errors import PipellmError

LAYER_FILE_RE = re.compile(r"^layer_(\d+)-model_states\.pt$")

# Files that are not copied along with config.json and the tokenizer: weights, weight indexes, DeepSpeed
# model/optimizer states and its bookkeeping. Everything else in the directory (tokenizer files in any of
# their spellings, generation_config.json, chat templates, ...) travels with the model.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".index.json")
LATEST = "latest"
"""The file of a training save directory that names its newest complete checkpoint (a ``global_step<N>`` tag)."""
_NOT_COPIED = {LATEST, "zero_to_fp32.py"}


def layer_file_name(idx: int) -> str:
    """File name DeepSpeed's ``PipelineModule`` uses for pipeline layer ``idx`` (no tensor parallelism)."""
    return f"layer_{idx:02d}-model_states.pt"


def optimizer_file_name(idx: int) -> str:
    """A training checkpoint's optimizer state of pipeline layer ``idx``'s trainable parameters, by checkpoint
    name (``pipellm.training.stage_checkpoint``)."""
    return f"layer_{idx:02d}-optim_states.pt"


def has_layer_files(directory: Path) -> bool:
    """Whether ``directory`` itself holds pipeline layer files."""
    return any(LAYER_FILE_RE.match(p.name) for p in directory.iterdir())


def follow_latest(save_dir: Path) -> Path | None:
    """The checkpoint directory that ``save_dir/latest`` names; None when ``save_dir`` has no ``latest`` file."""
    latest = save_dir / LATEST
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    path = save_dir / tag
    if not path.is_dir():
        raise PipellmError(f"{latest} names tag {tag!r} but {path} does not exist; fix {latest} or pass "
                           f"an existing tag directory")
    return path


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """The directory that holds the layer files of a pipeline checkpoint.

    ``path`` is either that directory itself (a converted model or a DeepSpeed tag directory such as
    ``run/global_step20``) or a DeepSpeed save directory whose ``latest`` file names the tag to use.
    """
    path = Path(path)
    if not path.is_dir():
        raise PipellmError(f"checkpoint path {path} does not exist or is not a directory; pass the directory "
                           f"written by hg_to_pp or by training")
    path = follow_latest(path) or path
    if not has_layer_files(path):
        raise PipellmError(f"no pipeline layer files ({layer_file_name(0)}, ...) in {path}; pass a directory "
                           f"written by hg_to_pp, a training save directory with a 'latest' file, or a tag "
                           f"directory such as global_step100")
    return path


def copy_model_files(src: Path, dst: Path) -> None:
    """Copy config.json, tokenizer and other small non-weight files from ``src`` to ``dst``."""
    for path in sorted(src.iterdir()):
        if path.is_file() and path.name not in _NOT_COPIED and not path.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(path, dst / path.name)
