"""How a pipeline runs one global batch's micro batches through the stages: the schedule the pipeline engine calls.

Today's one schedule is DeepSpeed's 1F1B (``OneForwardOneBackward``): after a warm-up of forwards, each stage
alternates one forward and one backward, so a stage holds at most ``stages`` micro batches' activations. Another
schedule (zero-bubble, interleaved) implements ``PipelineSchedule`` and is handed to
``pipellm.training.pipeline_engine.PipelineEngine``.
"""
from __future__ import annotations

from typing import Protocol

import torch


class PipelineSchedule(Protocol):
    """Runs this replica's micro batches (``pipellm.data.batches.micro_batches``) of one global batch on every
    stage of a DeepSpeed ``PipelineEngine``; returns the batch's loss (the same on every rank of the replica)."""

    def train_batch(self, engine, micro_batches: list) -> torch.Tensor:
        """Forward and backward of every micro batch, then one optimizer step."""

    def eval_batch(self, engine, micro_batches: list) -> torch.Tensor:
        """Forward only."""


class OneForwardOneBackward:
    """DeepSpeed's own schedules: ``TrainSchedule`` (1F1B) and ``InferenceSchedule``."""

    def train_batch(self, engine, micro_batches: list) -> torch.Tensor:
        return engine.train_batch(iter(micro_batches))

    def eval_batch(self, engine, micro_batches: list) -> torch.Tensor:
        return engine.eval_batch(iter(micro_batches))
