"""The engine interface the trainer drives (``pipellm.training.trainer``), and what pipellm's two engines share.

An engine owns the model as it is spread over the ranks and the DeepSpeed engine around it: it trains and
evaluates one global batch (this replica's micro batches of it), saves and loads its part of a checkpoint, and
reports what only it knows (parameter count, peak memory per stage, its place in the process grid). Everything
else (data order, cadence, checkpoint directories, early stopping, preemption, metrics) is the trainer's.

* ``pipellm.training.pipeline_engine.PipelineEngine``: DeepSpeed's pipeline engine (``train_ds.py``).
* ``pipellm.training.zero_engine.ZeroEngine``: a transformers model under ZeRO-3 (``train_ds_zero.py``).

Both build their optimizer the same way: the parameter set (``pipellm.training.parameters``) picks the trainable
parameters by checkpoint name, ``pipellm.training.optim.deepspeed_optimizer`` builds the optimizer and schedule.
"""
from __future__ import annotations

import abc
import dataclasses
from pathlib import Path
from typing import Callable, ClassVar

import torch

from pipellm.config import TrainConfig
from pipellm.errors import PipellmError
from pipellm.observe.metrics import peak_memory_gib
from pipellm.pipeline.loss import Objective
from pipellm.training.checkpointer import ResumePoint
from pipellm.training.distributed import StepWatch, all_reduce
from pipellm.training.optim import deepspeed_optimizer
from pipellm.training.parameters import NamedParameters, ParameterSet, nothing_to_train, optional_hook


@dataclasses.dataclass(frozen=True)
class EngineSetup:
    """What the trainer decided before the engine is built."""

    resume: ResumePoint | None
    """The checkpoint the run resumes from (None: a fresh start)."""
    total_steps: int
    """The run's optimizer steps (the LR schedule's length)."""
    objective: Objective
    """What the model's output is scored by."""
    parameter_set: ParameterSet
    """What is trainable."""
    on_stall: Callable[[], None] | None = None
    """Work to finish before a stalled run exits (the GPU profile's files)."""


class Engine(abc.ABC):
    """A model spread over the ranks, trained by a DeepSpeed engine (``self.ds``). Subclasses build the model and
    call ``__init__``, then set ``replica``/``replicas`` (this rank's data-parallel block of a global batch) and
    ``stage``/``num_stages`` (pipeline stages; 1 for a model that is not split)."""

    name: ClassVar[str]
    """The prefix of the run's log lines."""
    resumable: ClassVar[bool] = False
    """Its checkpoints resume a run (``resume_state``, ``load``)."""
    export_hint: ClassVar[str]
    """How to get Hugging Face weights out of a save directory (``{save_path}`` is filled in)."""
    watchdog: StepWatch
    """Follows each step's operations: a peer that goes away (and in the pipeline a stall) ends the run with one
    line."""
    trainable: NamedParameters
    """What the optimizer steps, by the names the parameter set gives (checkpoints key its state by them)."""
    replica: int
    replicas: int
    stage: int = 0
    num_stages: int = 1

    def __init__(self, cfg: TrainConfig, model, named_parameters: NamedParameters, ds_config: dict,
                 setup: EngineSetup):
        import deepspeed

        self.model, self.parameter_set = model, setup.parameter_set
        self.trainable = setup.parameter_set.trainable(named_parameters) or nothing_to_train(model)
        optimizer, lr_scheduler, ds_config = deepspeed_optimizer(
            model, self.trainable, ds_config, cfg.no_weight_decay, cfg.lr_schedule, setup.total_steps)
        ds_config.setdefault("steps_per_print", 10**9)  # pipellm logs; keep DeepSpeed's own step lines quiet
        self.ds, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                                config=ds_config)
        self.watchdog = StepWatch()

    @abc.abstractmethod
    def train_step(self, micro_batches: list) -> float:
        """Forward, backward and one optimizer step on this replica's micro batches of a global batch; the
        global batch's loss (the same on every rank)."""

    @abc.abstractmethod
    def eval_step(self, micro_batches: list) -> float:
        """The global batch's loss, without gradients."""

    @abc.abstractmethod
    def num_parameters(self, trainable_only: bool = False) -> int:
        """Parameters of the whole model (a tied weight once; with ``trainable_only`` those that train), the same
        on every rank."""

    @abc.abstractmethod
    def run_layout(self) -> dict:
        """``run_info.json``'s ``layout`` (the process grid) and ``coordinates`` (this rank in it)."""

    def lr(self) -> float:
        """The learning rate the next step trains at."""
        return self.ds.get_lr()[0]

    def grad_norm(self) -> float | None:
        return self.ds.get_global_grad_norm()

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped so far for non-finite gradients."""
        return self.ds.skipped_steps

    @property
    def loss_scaling(self) -> bool:
        """fp16's dynamic loss scaling, which skips overflowing steps as a matter of course."""
        return self.ds.fp16_enabled()

    def peak_memory_per_stage(self) -> list[float]:
        """Peak memory (GiB) per stage, the maximum over its data-parallel replicas (all ranks take part)."""
        import deepspeed.comm as dist

        per_stage = torch.zeros(self.num_stages, dtype=torch.float64)
        per_stage[self.stage] = peak_memory_gib()
        return [round(x, 3) for x in all_reduce(per_stage, dist.ReduceOp.MAX).tolist()]

    def save(self, save_dir: Path, tag: str) -> None:
        """This rank's files of a checkpoint into ``save_dir/tag`` (all ranks; ends with a barrier)."""
        self.save_states(save_dir, tag)
        write_files = optional_hook(self.parameter_set, "write_files")
        if write_files is not None and self.ds.global_rank == 0:
            write_files(save_dir / tag)

    def save_states(self, save_dir: Path, tag: str) -> None:
        """The weights and optimizer state (DeepSpeed's checkpoint; the pipeline engine's are layout-free)."""
        self.ds.save_checkpoint(str(save_dir), tag=tag, save_latest=False,
                                exclude_frozen_parameters=not self.parameter_set.saves_frozen)

    def resume_state(self) -> dict | None:
        """What ``pipellm_state.pt`` holds of the engine; None: its checkpoints do not resume."""
        return None

    def load(self, checkpoint: Path, weights_only: bool, state: dict) -> None:
        """Restore a checkpoint's states after ``deepspeed.initialize`` (all ranks)."""
        raise PipellmError(f"`resume` {checkpoint}: {type(self).__name__} does not resume runs")
