"""Checkpoints a run can be resumed from exactly: where to resume, atomic saves, ``latest``, ``best``, keep-last-N.

**A save** at step N writes ``save_path/global_stepN.tmp-<host>-<pid>/`` (rank 0's host and pid; the engine's
files: for the pipeline per layer ``layer_XX-model_states.pt`` and ``layer_XX-optim_states.pt``, the weights and
the optimizer state by checkpoint name, ``pipellm.training.stage_checkpoint``; pipellm's ``pipellm_state.pt`` and
one ``rng_state_rankR.pt`` per rank), then, once every rank is done, renames it to ``global_stepN/`` (each node's
local rank 0 renames its own copy, so nodes without a shared file system work too) and only then moves
``latest`` (and ``best``) atomically. A run killed mid-save leaves a temporary directory that resuming ignores
and the next run on ``save_path`` removes at its start (it holds the run lock, ``pipellm.training.run_lock``, so
no other live run writes there); ``latest`` still names the previous complete checkpoint. A save that fails for
want of disk (full, read-only) ends the run with one line naming the file and how much to free; ``latest``
again still names the previous checkpoint.

**Resuming** (``resume: auto`` or a path) restores the weights, the optimizer state (fp32 master weights
included) and LR scheduler state, the step (the data order is a pure function of seed, step and the global batch
size, ``pipellm.data.batches.Schedule``, so the step is the data position, mid-epoch included, whatever the
replica count), every rank's RNG states and the early-stopping state; ``MetricsLog`` cuts ``metrics.jsonl`` back
to the checkpoint's step: the run continues exactly as an uninterrupted one (bit-identical on CPU fp32). The
checkpoint is layout-free, so the run may resume on another layout (``dims``, ``parts``, world size, ZeRO-1 on or
off); then the RNG states, which belong to a rank's place in the old grid, are reseeded from (seed, step, rank).
A changed ``train_batch_size``, precision or optimizer type is refused (``resume_weights_only: true`` starts a new
run from the weights, at the checkpoint's step and learning rate, with a fresh optimizer state). An engine
without a resume state (the ZeRO-3 baseline) writes no ``pipellm_state.pt``: not resumable.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import torch

from pipellm.config import TrainConfig
from pipellm.errors import PipellmError
from pipellm.files import HOST, directory_bytes, disk_error, write_text_atomically
from pipellm.pipeline.layer_files import LATEST, copy_model_files, follow_latest
from pipellm.training.distributed import RankFailure
from pipellm.training.early_stopping import EarlyStoppingState
from pipellm.training.rng import capture_rng, reseed_rng, restore_rng, rng_file

TAG_RE = re.compile(r"^global_step(\d+)$")
TMP_SUFFIX = ".tmp"
STATE_FILE = "pipellm_state.pt"
BEST = "best"
OPTIMIZER_STATE_FORMAT = "per-parameter"
"""``pipellm_state.pt``'s ``optimizer_state``: saved per parameter by checkpoint name, any layout resumes it
(``pipellm.training.stage_checkpoint``)."""


def tag_of(step: int) -> str:
    return f"global_step{step}"


def _remove_tree(path: Path) -> None:
    """Remove a directory; another node's rank may be removing the same one (shared file system)."""
    def ignore_missing(function, name, exc_info):
        if not issubclass(exc_info[0], FileNotFoundError):
            raise exc_info[1]
    shutil.rmtree(path, onerror=ignore_missing)


class ResumePoint:
    """The checkpoint a run resumes from (found before any process group exists)."""

    def __init__(self, path: Path, weights_only: bool, seed: int):
        self.path, self.weights_only, self.seed = path, weights_only, seed
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
            path = follow_latest(save_path)
            if path is None:
                if int(os.environ.get("RANK", "0")) == 0:
                    print(f"pipellm: resume: auto found no checkpoint ({save_path / LATEST} does not exist); "
                          f"starting at step 0", file=sys.stderr)
                return None
        else:
            path = Path(cfg.resume)
            if not path.is_dir():
                raise PipellmError(f"`resume` {path} does not exist or is not a directory; give `auto`, a save "
                                   f"directory or a global_stepN directory")
            path = follow_latest(path) or path
        if not (path / STATE_FILE).is_file():
            raise PipellmError(f"`resume` {cfg.resume}: {path} is not a resumable checkpoint (no {STATE_FILE}); "
                               f"give a save directory with a `latest` file or a global_stepN directory written "
                               f"by pipellm training, or start from its weights with `model_path: {path}`")
        point = cls(path, cfg.resume_weights_only, cfg.seed)
        point.check_config(cfg)
        return point

    def check_config(self, cfg: TrainConfig) -> None:
        """What the optimizer state and the data position need unchanged (any layout may change); a new run from
        the weights (``resume_weights_only``) needs none of it."""
        from pipellm.training.optim import optimizer_class

        if self.weights_only:
            return
        saved, way_out = self.state, "or set `resume_weights_only: true` to start a new run from its weights"
        if saved.get("optimizer_state") != OPTIMIZER_STATE_FORMAT:
            raise PipellmError(f"`resume` {self.path} was saved by an earlier pipellm, with DeepSpeed's per-stage "
                               f"optimizer files, which this version does not read; resume it with that version, "
                               f"{way_out}")
        if saved["global_batch_size"] != cfg.global_batch_size:
            raise PipellmError(f"`train_batch_size` {cfg.global_batch_size} differs from the "
                               f"{saved['global_batch_size']} {self.path} was trained with: the step counts global "
                               f"batches of {saved['global_batch_size']} (the data position, the LR schedule); keep "
                               f"{saved['global_batch_size']} with any `dims` and micro batch size, {way_out}")
        precision = cfg.deepspeed_settings.precision
        if saved["precision"] != precision:
            raise PipellmError(f"`resume` {self.path} was trained in {saved['precision']} and this run is {precision}: "
                               f"its fp32 master weights and optimizer state resume in the same precision; restore "
                               f"`{saved['precision']}.enabled`, {way_out}")
        optimizer = optimizer_class(cfg.deepspeed.get("optimizer")).__name__
        if saved["optimizer"] != optimizer:
            raise PipellmError(f"`resume` {self.path} was trained with {saved['optimizer']}, this run's "
                               f"`optimizer.type` is {optimizer}: their states differ; restore it, {way_out}")

    def layout_changed(self, layout: dict) -> bool:
        return self.state["layout"] != layout

    def describe(self, layout: dict) -> str:
        """What was restored, in words; ``layout`` is this run's."""
        if self.weights_only:
            what = "weights only, fresh optimizer state"
        elif self.layout_changed(layout):
            what = (f"weights, optimizer, LR scheduler states; layout {describe_layout(self.state['layout'])} -> "
                    f"{describe_layout(layout)}, RNG states reseeded")
        else:
            what = "weights, optimizer, LR scheduler, RNG states"
        return f"pipellm: resumed from {self.path} at step {self.step} ({what})"


def describe_layout(layout: dict) -> str:
    """``pipe 2 x data 1, stage boundaries [0, 3, 7]``"""
    grid = " x ".join(f"{axis} {dim}" for axis, dim in zip(layout["axes"], layout["dims"]))
    return f"{grid}, stage boundaries {layout['stage_boundaries']}"


class Checkpointer:
    """Saves ``save_path/global_stepN`` atomically (module docstring) and restores a resume point; all ranks call
    ``restore`` and ``save`` together."""

    def __init__(self, cfg: TrainConfig, resume: ResumePoint | None):
        import deepspeed.comm as dist

        self.save_path, self.model_path, self.keep_last_n = Path(cfg.save_path), Path(cfg.model_path), cfg.keep_last_n
        self.resume = resume
        self.node_leader = int(os.environ.get("LOCAL_RANK", "0")) == 0
        # Temporaries are named after rank 0's host and pid: every rank writes into the same one.
        run = [f"{HOST}-{os.getpid()}"]
        dist.broadcast_object_list(run, src=0)
        self.tmp_suffix = f"{TMP_SUFFIX}-{run[0]}"
        if self.node_leader:
            self._remove_dead_runs_temporaries()

    def _remove_dead_runs_temporaries(self) -> None:
        """Partial saves of runs that were killed: this run holds the lock on ``save_path``
        (``pipellm.training.run_lock``), so no live run writes any other temporary here."""
        for leftover in sorted(self.save_path.glob(f"global_step*{TMP_SUFFIX}*")):
            if leftover.is_dir() and not leftover.name.endswith(self.tmp_suffix):
                _remove_tree(leftover)
                if int(os.environ.get("RANK", "0")) == 0:
                    print(f"pipellm: removed {leftover}, a partial checkpoint of a run that is gone",
                          file=sys.stderr)

    def path_of(self, step: int) -> Path:
        return self.save_path / tag_of(step)

    def restore(self, engine, early_stopping: EarlyStoppingState) -> int:
        """The step every rank starts at, with the engine's, the RNG and the early-stopping states restored from
        the resume point (call last before the loop: it sets the RNG states)."""
        import deepspeed.comm as dist

        start_step = self._agree_on_start()
        if self.resume is None:
            return start_step
        resume = self.resume
        engine.load(resume.path, resume.weights_only, resume.state)
        layout = engine.checkpoint_layout()
        if not resume.weights_only:
            if resume.layout_changed(layout):  # a rank's RNG states belong to its place in the saved grid
                reseed_rng(resume.seed, resume.step, dist.get_rank())
            else:
                restore_rng(torch.load(resume.path / rng_file(dist.get_rank()), weights_only=True))
        early_stopping.load_state_dict(resume.state["early_stopping"])
        if dist.get_rank() == 0:
            print(resume.describe(layout), file=sys.stderr)
        return start_step

    def _agree_on_start(self) -> int:
        """Ranks that found different checkpoints (nodes without a shared file system, killed between their
        renames) stop with an error instead of training on different states."""
        import deepspeed.comm as dist

        mine = str(self.resume.path) if self.resume else None
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, (HOST, mine))
        for rank, (host, theirs) in enumerate(everyone):
            if theirs != mine:
                raise PipellmError(f"`resume`: rank {dist.get_rank()} resumes from {mine or 'nothing'} but rank "
                                   f"{rank} (host {host}) from {theirs or 'nothing'}; give every node the same "
                                   f"checkpoint (`resume: <path>`)")
        return self.resume.step if self.resume else 0

    def save(self, step: int, engine, early_stopping: EarlyStoppingState, best: bool = False) -> Path:
        """The engine's files, the RNG states and (when the engine can resume) ``pipellm_state.pt``; ``best``:
        point ``best`` here. A write that fails for want of disk raises ``RankFailure`` naming the file."""
        import deepspeed.comm as dist

        final, tmp = self.path_of(step), self.save_path / (tag_of(step) + self.tmp_suffix)
        if self.node_leader and final.is_dir():  # left by a run resumed from an earlier checkpoint
            _remove_tree(final)
        dist.barrier()
        try:
            self._write(step, engine, early_stopping, tmp)
        except (OSError, RuntimeError) as err:
            previous = follow_latest(self.save_path)
            failure = disk_error(err, tmp, final, directory_bytes(previous) if previous else 0, "change save_path")
            if failure is err:
                raise
            raise RankFailure(str(failure)) from None
        dist.barrier()
        if self.node_leader:
            try:
                tmp.rename(final)
            except FileNotFoundError:
                if not final.is_dir():  # else: another node renamed the shared directory first
                    raise
        dist.barrier()
        if self.node_leader:
            write_text_atomically(self.save_path / LATEST, tag_of(step))
            if best:
                write_text_atomically(self.save_path / BEST, tag_of(step))
            self._delete_old(step)
        dist.barrier()
        return final

    def _write(self, step: int, engine, early_stopping: EarlyStoppingState, tmp: Path) -> None:
        """This rank's files of the checkpoint into ``tmp``."""
        import deepspeed.comm as dist

        engine.save(self.save_path, tmp.name)  # ends with a barrier
        torch.save(capture_rng(), tmp / rng_file(dist.get_rank()))
        resume_state = engine.resume_state()
        if self.node_leader and resume_state is not None:
            torch.save(dict(resume_state, early_stopping=early_stopping.state_dict(), step=step), tmp / STATE_FILE)
        if dist.get_rank() == 0:
            copy_model_files(self.model_path, tmp)

    def last_good(self) -> str:
        """Where the run can resume from, in words."""
        latest = follow_latest(self.save_path)
        return (f"the last good checkpoint is {latest} ({self.save_path / LATEST} names it)" if latest
                else f"no checkpoint was saved in {self.save_path}")

    def _delete_old(self, step: int) -> None:
        """Keep the newest ``keep_last_n`` checkpoints up to ``step`` and the one ``best`` names. Checkpoints
        after ``step`` (from a run this one resumed at an earlier step) are left alone."""
        if self.keep_last_n is None:
            return
        steps = sorted(int(m.group(1)) for p in self.save_path.iterdir() if (m := TAG_RE.match(p.name)))
        kept = {tag_of(s) for s in [s for s in steps if s <= step][-self.keep_last_n:]}
        best = self.save_path / BEST
        kept.add(best.read_text().strip() if best.is_file() else None)
        for s in steps:
            if s <= step and tag_of(s) not in kept:
                _remove_tree(self.save_path / tag_of(s))
