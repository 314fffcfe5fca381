"""The training loop of both engines (``train_ds.py``: the pipeline, ``train_ds_zero.py``: the ZeRO-3 baseline).

1. The entry point checks the config and names the engine (``prepare``: before any process group, so a bad file
   fails fast on every rank); the objective is built from the config's ``objective``. The run takes the lock on
   ``save_path`` before anything is written there (``pipellm.training.run_lock``: one run per save path).
2. The data is tokenized once into the on-disk cache (memory-mapped by every rank; each step's global batch is
   known to all ranks).
3. The process group starts; every rank checks it runs the same code, config and data. The engine builds its
   part of the model and loads its weights; the checkpointer restores the resume point, if any.
4. Loop: one engine step per optimizer step; the cadence says when to log, evaluate and save; the run stops
   early on SIGTERM (all ranks agree after each step), when the eval loss stops improving, or after too many
   non-finite steps in a row. A failure one rank meets alone (a peer that died, a checkpoint write out of disk)
   is one line from that rank naming the last good checkpoint, and exit code 2.
"""
from __future__ import annotations

import os
import sys
from typing import Callable

from pipellm.config import TrainConfig, dump_resolved
from pipellm.data import IGNORE_INDEX
from pipellm.data.batches import Schedule, load_training_data, micro_batches
from pipellm.errors import PipellmError
from pipellm.observe.gpu_profile import start_gpu_profile
from pipellm.observe.step_profile import StepProfiler
from pipellm.observe.metrics import (MetricsLog, ModelFlops, StepFigures, StepTimer, attention_pairs,
                                     device_peak_flops)
from pipellm.observe.run_info import write_run_info
from pipellm.observe.sinks import open_sinks
from pipellm.pipeline.loss import Objective
from pipellm.training.cadence import Cadence
from pipellm.training.checkpointer import Checkpointer, ResumePoint
from pipellm.training.distributed import (RankFailure, config_hash, data_fingerprint, init_process_group, peer_lost,
                                          run_owns_process_group, verify_same_run)
from pipellm.training.early_stopping import EarlyStoppingState
from pipellm.training.engine import Engine, EngineSetup
from pipellm.training.objective import build_objective
from pipellm.training.optim import NonFiniteRun
from pipellm.training.parameters import parameter_set
from pipellm.training.preemption import StopOnSigterm
from pipellm.training.reference import prepare_pairs
from pipellm.training.run_lock import RunLock

EngineFactory = Callable[[TrainConfig, EngineSetup], Engine]
"""Builds the run's engine once the process group exists (a ``PipelineEngine`` or ``ZeroEngine`` with the model
facts its entry point read)."""


class Trainer:
    """One run: its components, built in ``__init__`` (every rank), and the loop, ``fit``."""

    def __init__(self, cfg: TrainConfig, build_engine: EngineFactory, objective: Objective):
        from pipellm.data.tokenizer import load_tokenizer

        self.cfg, self.objective = cfg, objective
        self.preemption = StopOnSigterm()  # from the start: a SIGTERM during start-up stops after the first step
        resume = ResumePoint.find(cfg)
        self.is_logger = int(os.environ.get("RANK", "0")) == 0
        self.gpu_profile = start_gpu_profile(cfg.save_path, cfg.gpu_profile_interval_s)
        self.data = load_training_data(cfg, load_tokenizer(cfg.model_path),
                                       show_progress=int(os.environ.get("LOCAL_RANK", "0")) == 0,
                                       pairs=getattr(objective, "pairwise", False))
        # The pipeline's stall watchdog reports stalls inside steps first; the process group's timeout (a minute
        # later) covers the collectives outside them (start-up checks, checkpoint saves) and the ZeRO engine's.
        init_process_group(cfg.collective_timeout_s + 60)
        data_key = data_fingerprint(cfg.data_paths)
        verify_same_run(config_hash(dump_resolved(cfg)), data_key)
        self.order = Schedule(self.data.plan, cfg.n_epochs, cfg.max_steps)
        self.total_steps = self.order.total_steps
        self.cadence = Cadence.of(cfg, self.total_steps, has_eval=bool(self.data.eval_rows))
        self.engine = build_engine(cfg, EngineSetup(resume, self.total_steps, objective, parameter_set(cfg),
                                                    self.gpu_profile.finish if self.gpu_profile else None))
        # After the engine: run_info's hash is of the config as run, with the split `parts: auto` chose.
        write_run_info(cfg, self.data, config_digest=config_hash(dump_resolved(cfg)), data_key=data_key,
                       **self.engine.run_layout())
        self._announce()
        self.figures = self._step_figures()
        # Pairwise objectives: the reference log-probs (cached or computed now) travel with each micro batch.
        self.pairs = prepare_pairs(cfg, self.data, self.engine, objective, self.order, resumed=resume is not None) \
            if getattr(objective, "pairwise", False) else None
        self.checkpointer = Checkpointer(cfg, resume)
        self.early_stopping = EarlyStoppingState.from_config(cfg.early_stopping)
        self.nonfinite = NonFiniteRun(cfg.max_nonfinite_steps, loss_scaling=self.engine.loss_scaling)
        self.start_step = self.checkpointer.restore(self.engine, self.early_stopping)  # last: the RNG states
        self.log = MetricsLog(cfg.save_path, self.total_steps, self.start_step, enabled=self.is_logger,
                              sinks=open_sinks(cfg, self.start_step) if self.is_logger else [])
        self.timer = StepTimer()
        self.step_profiler = StepProfiler(cfg.save_path, tuple(cfg.profile_steps) if cfg.profile_steps else None)

    def fit(self) -> None:
        """Train from the start step to the end, or until a stop; every rank runs the same steps. A failure of
        this rank alone (``RankFailure``, a peer lost outside a step included) says where to resume from."""
        watch = self.engine.watchdog
        try:
            self._train()
        except (RankFailure, RuntimeError) as err:  # a peer lost outside the steps (a save's barrier): gloo's/NCCL's
            failure = err if isinstance(err, RankFailure) else peer_lost(
                err, f"{watch.who} lost its connection between steps", watch.peer_in(""))
            if failure is None:
                raise
            self._close()
            raise RankFailure(f"{failure}; {self.checkpointer.last_good()}") from None

    def _train(self) -> None:
        # Resumed from the checkpoint an early stop saved: the run is already over.
        done, stop_reason = self.start_step, "early stopping" if self.early_stopping.should_stop else None
        for step in range(self.start_step, self.total_steps):
            if stop_reason:
                break
            done = step + 1
            record, improved, sigterm = self.train_step(step)
            self.log.step(record)
            if self.nonfinite.exhausted:  # on every rank alike: the skip decision and the loss are the same
                self.checkpointer.save(done, self.engine, self.early_stopping)
                self._close()
                raise PipellmError(self.nonfinite.stop_message(self.checkpointer.path_of(done)))
            stop_reason = "early stopping" if self.early_stopping.should_stop else "SIGTERM" if sigterm else None
            if self.cadence.save_due(done, improved=improved, stopping=stop_reason is not None):
                self.checkpointer.save(done, self.engine, self.early_stopping, best=improved)
        self._finish(done, stop_reason)

    def train_step(self, step: int) -> tuple[dict | None, bool, bool]:
        """Step ``step`` (0-based): ``(its metrics record or None, the eval improved, SIGTERM agreed)``."""
        done, engine, watchdog = step + 1, self.engine, self.engine.watchdog
        rows = self.order.batch(step)
        input_ids, labels, position_ids, lengths = self.data.rows_of(rows)
        lr, skipped_before = engine.lr(), engine.skipped_steps  # the lr this step trains at
        # Every collective of the step is watched; checkpoint saves are not (they may take long).
        with watchdog.watch_step(done), self.step_profiler.step(done):
            loss = engine.train_step(self._micro_batches(rows, "train", input_ids, labels, position_ids))
            watchdog.enter("the all-reduce of the SIGTERM flag")
            sigterm = self.preemption.agreed()
            seconds = self.timer.lap()
            warning = self.nonfinite.record(done, loss, skipped=engine.skipped_steps > skipped_before)
            if warning and self.is_logger:
                print(warning, file=sys.stderr)
            record, improved = None, False
            if self.cadence.log_due(done):
                watchdog.enter("the all-reduce of the stages' peak memory")
                record = self.figures.record(step=done, epoch=self.order.locate(step)[0], loss=loss, lr=lr,
                                             grad_norm=engine.grad_norm(), tokens=int(lengths.sum()),
                                             pairs=attention_pairs(position_ids, lengths), seconds=seconds,
                                             elapsed=self.timer.elapsed,
                                             peak_mem_gib_per_stage=engine.peak_memory_per_stage())
                record.update(self.objective.figures(loss, "train"))
            if self.cadence.eval_due(done):
                eval_loss = self.evaluate()
                record.update(eval_loss=eval_loss, **self.objective.figures(eval_loss, "eval"))
                improved = self.early_stopping.update(eval_loss, done)
        return record, improved, sigterm

    def evaluate(self) -> float:
        """The objective's mean over every labelled token (pairwise objectives: pair) of the eval rows (all ranks
        take part)."""
        total, count = 0.0, 0
        for rows in self.data.eval_row_batches(self.cfg.global_batch_size):
            input_ids, labels, position_ids, _ = self.data.rows_of(rows, self.data.eval_store)
            weight = self.pairs.pairs(rows) if self.pairs else int((labels[:, 1:] != IGNORE_INDEX).sum())
            total += self.engine.eval_step(self._micro_batches(rows, "eval", input_ids, labels, position_ids)) * weight
            count += weight
        return total / max(count, 1)

    def _micro_batches(self, rows, split: str, input_ids, labels, position_ids) -> list:
        """This replica's micro batches of a global batch (``rows``: its samples, ``split``: train or eval)."""
        if self.pairs is not None:
            return self.pairs.micro_batches(rows, split, input_ids, labels, position_ids)
        return micro_batches(input_ids, labels, self.cfg.micro_batch_size, self.engine.replica, self.engine.replicas,
                             position_ids)

    def _announce(self) -> None:
        if not self.is_logger:
            return
        cfg, order = self.cfg, self.order
        print(f"pipellm data: {self.data.summary()}; template {self.data.files_meta[0]['template']}", file=sys.stderr)
        print(f"{self.engine.name}: {order.steps_per_epoch[0]} steps/epoch, {self.total_steps} steps, global batch "
              f"{cfg.global_batch_size} x {cfg.max_seq_len} tokens over {cfg.pipe_degree * cfg.data_degree} ranks",
              file=sys.stderr)

    def _step_figures(self) -> StepFigures:
        cfg, hf_config = self.cfg, self.engine.hf_config
        embedding = hf_config.vocab_size * hf_config.hidden_size
        total = self.engine.num_parameters()
        return StepFigures(cfg.global_batch_size, cfg.max_seq_len, cfg.pipe_degree * cfg.data_degree,
                           ModelFlops.of(hf_config, total, embedding,
                                         frozen_params=total - self.engine.num_parameters(trainable_only=True)),
                           cfg.peak_flops_per_gpu or device_peak_flops())

    def _close(self) -> None:
        """The metrics log and the GPU profile, complete on disk, and SIGTERM's handler as it was: however the run
        ends."""
        self.log.close()
        self.step_profiler.close()
        if self.gpu_profile:
            self.gpu_profile.finish()
        self.preemption.release()

    def _finish(self, done: int, stop_reason: str | None) -> None:
        self._close()
        if not self.is_logger:
            return
        if stop_reason:
            print(self._stopped_message(stop_reason, done), file=sys.stderr)
            return
        hint = self.engine.export_hint.format(save_path=self.checkpointer.save_path)
        saved = f"; checkpoint {self.checkpointer.path_of(self.total_steps)} {hint}" if self.cfg.save_final else ""
        print(f"{self.engine.name}: done, {self.total_steps} steps in {self.timer.elapsed:.1f}s{saved}",
              file=sys.stderr)

    def _stopped_message(self, reason: str, step: int) -> str:
        checkpoint, engine, stopping = self.checkpointer.path_of(step), self.engine, self.early_stopping
        if reason == "SIGTERM":
            how = ("(resume with resume: auto)" if engine.resumable
                   else engine.export_hint.format(save_path=self.checkpointer.save_path))
            return f"{engine.name}: stopped by SIGTERM at step {step}; checkpoint {checkpoint} {how}"
        best = self.checkpointer.path_of(stopping.best_step)
        # A run resumed from another save directory has its best checkpoint there.
        export = (f": {best} {engine.export_hint.format(save_path=best)}" if best.is_dir()
                  else " (saved by the run this one resumed from)")
        return (f"{engine.name}: early stopping at step {step}: eval_loss has not improved by min_delta="
                f"{stopping.min_delta:g} for {stopping.evals_without_improvement} evals; checkpoint "
                f"{checkpoint}; best eval_loss {stopping.best_loss:.4f} at step {stopping.best_step}{export}")


def main(prepare: Callable[[list[str] | None], tuple[TrainConfig, EngineFactory]], argv=None) -> None:
    """What ``train_ds.py`` and ``train_ds_zero.py`` run. ``prepare(argv)`` checks everything that can fail on bad
    input, before any process group, and names the engine; a ``PipellmError`` then or later ends the run with
    one line from rank 0 and exit code 2, a ``RankFailure`` with one line from each rank that met it."""
    try:
        with run_owns_process_group():
            cfg, build_engine = prepare(argv)
            objective = build_objective(cfg)
            with RunLock.hold(cfg, config_hash(dump_resolved(cfg))):
                Trainer(cfg, build_engine, objective).fit()
    except PipellmError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except RankFailure as failure:
        print(f"error: {failure}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(2)  # the others may be blocked in a collective, which destroying the process group would wait for
