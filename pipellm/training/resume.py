"""Checkpoints a training run can be resumed from exactly: atomic saves, ``resume``, SIGTERM, early stopping.

**A save** at step N writes ``save_path/global_stepN.tmp/`` (DeepSpeed's per-layer ``layer_XX-model_states.pt``
and per-stage ``mp_rank_XX_model_states.pt`` with the optimizer and LR scheduler states, pipellm's
``pipellm_state.pt`` and one ``rng_state_rankR.pt`` per rank), then, once every rank is done, renames it to
``global_stepN/`` (each node's local rank 0 renames its own copy, so nodes without a shared file system work too)
and only then moves ``latest`` (and ``best``) atomically. A run killed mid-save leaves a ``.tmp`` directory that
resuming ignores and the next save removes; ``latest`` still names the previous complete checkpoint.

**Resuming** (``resume: auto`` or a path) restores the weights, the optimizer and LR scheduler states, the step
(the data order is a pure function of seed and step, ``pipellm.batches.Schedule``, so the step is the data
position, mid-epoch included), every rank's RNG states and the early-stopping state, and cuts ``metrics.jsonl``
back to the checkpoint's step: the run continues exactly as an uninterrupted one (bit-identical on CPU fp32).
The optimizer state is saved per stage, so it cannot follow a changed ``parts``/``dims``; then only
``resume_weights_only: true`` resumes (weights in the new layout, fresh optimizer state).

**SIGTERM** (preemption) sets a flag; the ranks agree on it after every step (an all-reduce MAX of one number),
so all of them finish the same step, save and exit 0.
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
import re
import shutil
import signal
import socket
import sys
from pathlib import Path

import numpy as np
import torch

from pipellm.pipeline.layer_files import copy_model_files
from pipellm.config import EarlyStopping, TrainConfig
from pipellm.pipeline.deepspeed_compat import load_bf16_optimizer_state, read_checkpoints_weights_only
from pipellm.training.distributed import all_reduce
from pipellm.errors import PipellmError
from pipellm.files import atomic_path, write_text_atomically

TAG_RE = re.compile(r"^global_step(\d+)$")
TMP_SUFFIX = ".tmp"
STATE_FILE = "pipellm_state.pt"
LATEST, BEST = "latest", "best"


def tag_of(step: int) -> str:
    return f"global_step{step}"


def rng_file(rank: int) -> str:
    return f"rng_state_rank{rank}.pt"


def capture_rng() -> dict:
    """This process's RNG states (python, numpy's global one, torch, CUDA), loadable with weights_only=True."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng(states: dict) -> None:
    random.setstate(states["python"])
    name, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])


@dataclasses.dataclass
class EarlyStoppingState:
    """The best eval so far and how many evals since have not improved on it by ``min_delta``."""

    patience: int
    min_delta: float
    best_loss: float = math.inf
    best_step: int | None = None
    evals_without_improvement: int = 0

    @classmethod
    def from_config(cls, config: EarlyStopping) -> "EarlyStoppingState":
        return cls(config.patience, config.min_delta)

    def update(self, eval_loss: float, step: int) -> bool:
        """Record an eval; True when it improved (it is then the best)."""
        if eval_loss < self.best_loss - self.min_delta:
            self.best_loss, self.best_step, self.evals_without_improvement = eval_loss, step, 0
            return True
        self.evals_without_improvement += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.evals_without_improvement >= self.patience

    def state_dict(self) -> dict:
        return {"best_loss": self.best_loss, "best_step": self.best_step,
                "evals_without_improvement": self.evals_without_improvement}

    def load_state_dict(self, state: dict) -> None:
        self.best_loss, self.best_step = state["best_loss"], state["best_step"]
        self.evals_without_improvement = state["evals_without_improvement"]


def layout_of(model) -> dict:
    """What a stage's optimizer state depends on: which layers each stage holds, and the process grid."""
    return {"stage_boundaries": list(model.parts), **model.grid_layout}


def _remove_tree(path: Path) -> None:
    """Remove a directory; another node's rank may be removing the same one (shared file system)."""
    def ignore_missing(function, name, exc_info):
        if not issubclass(exc_info[0], FileNotFoundError):
            raise exc_info[1]
    shutil.rmtree(path, onerror=ignore_missing)


def _read_pointer(path: Path) -> str | None:
    return path.read_text().strip() if path.is_file() else None


class ResumePoint:
    """The checkpoint a run resumes from (found before any process group exists)."""

    def __init__(self, path: Path, weights_only: bool):
        self.path, self.weights_only = path, weights_only
        self.state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
        self.step: int = self.state["step"]

    @classmethod
    def find(cls, cfg: TrainConfig) -> "ResumePoint | None":
        """``resume: auto``: what ``save_path/latest`` names (none: None, start fresh). A path: that save
        directory's ``latest``, or that checkpoint directory."""
        if cfg.resume is None:
            return None
        if cfg.resume == "auto":
            save_path = Path(cfg.save_path)
            tag = _read_pointer(save_path / LATEST)
            if tag is None:
                if int(os.environ.get("RANK", "0")) == 0:
                    print(f"pipellm: resume: auto found no checkpoint ({save_path / LATEST} does not exist); "
                          f"starting at step 0", file=sys.stderr)
                return None
            path = save_path / tag
        else:
            path = Path(cfg.resume)
            if not path.is_dir():
                raise PipellmError(f"`resume` {path} does not exist or is not a directory; give `auto`, a save "
                                   f"directory or a global_stepN directory")
            tag = _read_pointer(path / LATEST)
            if tag is not None:
                path = path / tag
        if not (path / STATE_FILE).is_file():
            raise PipellmError(f"`resume` {cfg.resume}: {path} is not a resumable checkpoint (no {STATE_FILE}); "
                               f"give a save directory with a `latest` file or a global_stepN directory written "
                               f"by pipellm training, or start from its weights with `model_path: {path}`")
        return cls(path, cfg.resume_weights_only)

    def check_layout(self, current: dict) -> None:
        """The optimizer state is per stage: refuse it (with the way out) when the layout (``layout_of``) changed."""
        saved = self.state["layout"]
        if saved != current and not self.weights_only:
            raise PipellmError(
                f"`resume` {self.path} was saved with stage boundaries {saved['stage_boundaries']} on {saved['axes']} "
                f"{saved['dims']}, this run has {current['stage_boundaries']} on {current['axes']} {current['dims']}: "
                f"the optimizer state (saved per stage) cannot follow; set `resume_weights_only: true` to load the "
                f"weights in the new layout and continue with a fresh optimizer state, or restore `model_topo`")

    def describe(self) -> str:
        what = ("weights only, fresh optimizer state" if self.weights_only
                else "weights, optimizer, LR scheduler, RNG states")
        return f"pipellm: resumed from {self.path} at step {self.step} ({what})"

    @property
    def weights_dir(self) -> Path | None:
        """Where to load the weights from before ``deepspeed.initialize``; None when ``restore`` loads them
        together with the optimizer state."""
        return self.path if self.weights_only else None

    def restore(self, engine, early_stopping: EarlyStoppingState) -> None:
        """After ``deepspeed.initialize``, on every rank."""
        if self.weights_only:
            if engine.lr_scheduler is not None and self.state["lr_scheduler"] is not None:
                engine.lr_scheduler.load_state_dict(self.state["lr_scheduler"])
            # The scheduler sets the rates after each step: the next step trains at the ones saved.
            for group, lr in zip(engine.optimizer.param_groups, self.state["lrs"]):
                group["lr"] = lr
            engine.global_steps = self.step
            engine.global_samples = self.step * engine.train_batch_size()
        else:
            read_checkpoints_weights_only(engine)
            # DeepSpeed's bf16 optimizer without ZeRO cannot read its state from the per-stage file (deepspeed_compat).
            bf16_without_zero = engine.bfloat16_enabled() and not engine.zero_optimization()
            path, _ = engine.load_checkpoint(str(self.path.parent), tag=self.path.name,
                                             load_optimizer_states=not bf16_without_zero)
            if path is None:
                raise PipellmError(f"`resume` {self.path}: DeepSpeed found no model states to load; the "
                                   f"checkpoint is incomplete, resume from an earlier one")
            if bf16_without_zero:
                load_bf16_optimizer_state(engine, str(self.path.parent), self.path.name)
            restore_rng(torch.load(self.path / rng_file(engine.global_rank), weights_only=True))
        early_stopping.load_state_dict(self.state["early_stopping"])


def trainer_state(engine, model, early_stopping: EarlyStoppingState) -> dict:
    """What ``pipellm_state.pt`` holds besides the step: the layout (to detect a changed one), the early-stopping
    state, and for weights-only resumes the LR scheduler and the learning rates it set (DeepSpeed saves both per
    stage, with the optimizer state, in a file a changed layout cannot read)."""
    return {"layout": layout_of(model), "early_stopping": early_stopping.state_dict(),
            "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
            "lrs": [group["lr"] for group in engine.optimizer.param_groups]}


def stopped_message(reason: str, step: int, save_path: Path, early_stopping: EarlyStoppingState) -> str:
    checkpoint = save_path / tag_of(step)
    if reason == "SIGTERM":
        return f"pipellm: stopped by SIGTERM at step {step}; checkpoint {checkpoint} (resume with resume: auto)"
    best = save_path / tag_of(early_stopping.best_step)
    # A run resumed from another save directory has its best checkpoint there.
    export = (f": {best} (export: python convert_model.py pp_to_hg --input-path {best} --save-path HF_OUT)"
              if best.is_dir() else " (saved by the run this one resumed from)")
    return (f"pipellm: early stopping at step {step}: eval_loss has not improved by min_delta="
            f"{early_stopping.min_delta:g} for {early_stopping.evals_without_improvement} evals; checkpoint "
            f"{checkpoint}; best eval_loss {early_stopping.best_loss:.4f} at step {early_stopping.best_step}{export}")



def agree_on_start(resume: ResumePoint | None) -> int:
    """The step every rank starts at; ranks that found different checkpoints (nodes without a shared file
    system, killed between their renames) stop with an error instead of training on different states."""
    import deepspeed.comm as dist

    mine = str(resume.path) if resume else None
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (socket.gethostname(), mine))
    for rank, (host, theirs) in enumerate(everyone):
        if theirs != mine:
            raise PipellmError(f"`resume`: rank {dist.get_rank()} resumes from {mine or 'nothing'} but rank {rank} "
                               f"(host {host}) from {theirs or 'nothing'}; give every node the same checkpoint "
                               f"(`resume: <path>`)")
    return resume.step if resume else 0


def cut_metrics_log(save_path: Path, step: int) -> None:
    """Drop ``metrics.jsonl`` records after ``step``: they belong to the interrupted run's lost steps."""
    import json

    path = save_path / "metrics.jsonl"
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines(keepends=True) if json.loads(line)["step"] <= step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(kept))


class CheckpointWriter:
    """Saves ``save_path/global_stepN`` atomically (module docstring); all ranks call ``save`` together."""

    def __init__(self, engine, save_path: Path, model_path: str, keep_last_n: int | None):
        self.engine, self.save_path, self.model_path, self.keep_last_n = engine, save_path, model_path, keep_last_n
        self.node_leader = int(os.environ.get("LOCAL_RANK", "0")) == 0

    def save(self, step: int, trainer_state: dict | None, best: bool = False) -> Path:
        """``trainer_state`` (None: not resumable) goes into ``pipellm_state.pt``; ``best``: point ``best`` here."""
        import deepspeed.comm as dist

        tag = tag_of(step)
        final, tmp = self.save_path / tag, self.save_path / (tag + TMP_SUFFIX)
        if self.node_leader:
            # Partial saves of killed runs, and a checkpoint of this step left by a run resumed from an earlier one.
            for leftover in [*self.save_path.glob(f"global_step*{TMP_SUFFIX}"), final]:
                if leftover.is_dir():
                    _remove_tree(leftover)
        dist.barrier()
        self.engine.save_checkpoint(str(self.save_path), tag=tmp.name, save_latest=False)  # ends with a barrier
        torch.save(capture_rng(), tmp / rng_file(dist.get_rank()))
        if self.node_leader and trainer_state is not None:
            torch.save(dict(trainer_state, step=step), tmp / STATE_FILE)
        if dist.get_rank() == 0:
            copy_model_files(Path(self.model_path), tmp)
        dist.barrier()
        if self.node_leader:
            try:
                tmp.rename(final)
            except FileNotFoundError:
                if not final.is_dir():  # else: another node renamed the shared directory first
                    raise
        dist.barrier()
        if self.node_leader:
            write_text_atomically(self.save_path / LATEST, tag)
            if best:
                write_text_atomically(self.save_path / BEST, tag)
            self._delete_old(step)
        dist.barrier()
        return final

    def _delete_old(self, step: int) -> None:
        """Keep the newest ``keep_last_n`` checkpoints up to ``step`` and the one ``best`` names. Checkpoints
        after ``step`` (from a run this one resumed at an earlier step) are left alone."""
        if self.keep_last_n is None:
            return
        steps = sorted(int(m.group(1)) for p in self.save_path.iterdir() if (m := TAG_RE.match(p.name)))
        kept = {tag_of(s) for s in [s for s in steps if s <= step][-self.keep_last_n:]}
        kept.add(_read_pointer(self.save_path / BEST))
        for s in steps:
            if s <= step and tag_of(s) not in kept:
                _remove_tree(self.save_path / tag_of(s))


class StopOnSigterm:
    """SIGTERM (preemption) asks the run to stop; ``agreed`` tells every rank whether any rank was asked."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._request)

    def _request(self, signum, frame) -> None:
        self.requested = True

    def agreed(self) -> bool:
        """All ranks, once per step: True when any rank received SIGTERM (so all stop after the same step)."""
        import deepspeed.comm as dist

        flag = torch.tensor([1.0 if self.requested else 0.0])
        return bool(all_reduce(flag, dist.ReduceOp.MAX)[0])
