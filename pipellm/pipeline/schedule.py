"""How a pipeline runs one global batch's micro batches through the stages: the schedule the pipeline engine calls.

``schedule_named`` (the ``pipeline_schedule`` key): ``1f1b`` is DeepSpeed's 1F1B (``OneForwardOneBackward``): after a
warm-up of forwards, each stage alternates one forward and one backward, so a stage holds at most ``stages`` micro
batches' activations. ``zb-h1`` is the zero-bubble ZB-H1 schedule (``pipellm.pipeline.zero_bubble``), which splits
each backward and defers the weight gradients. Another schedule implements ``PipelineSchedule`` and joins its
table; ``pipellm.training.pipeline_engine.PipelineEngine`` runs the configured one.
"""
from __future__ import annotations

import functools
from typing import Protocol

import torch


class PipelineSchedule(Protocol):
    """Runs this replica's micro batches (``pipellm.data.batches.micro_batches``) of one global batch on every
    stage of a DeepSpeed ``PipelineEngine``; returns the batch's loss (the same on every rank of the replica).

    Optional: ``attach(engine)``, called once before training with the DeepSpeed engine, for what the schedule
    adds to it (its instructions, its ``PipeSchedule``)."""

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


def schedule_named(name: str, recompute: bool = False, compiled: bool = False) -> PipelineSchedule:
    """The schedule of ``pipeline_schedule`` (``pipellm.config.schema.TrainConfig``); ``recompute``: the stages
    checkpoint their layers (``use_grad_ckpt``); ``compiled``: their layers are compiled (``compile_layers``)."""
    from pipellm.pipeline.zero_bubble import ZeroBubbleH1  # imports deepspeed

    return {"1f1b": OneForwardOneBackward,
            "zb-h1": functools.partial(ZeroBubbleH1, recompute=recompute, compiled=compiled)}[name]()
