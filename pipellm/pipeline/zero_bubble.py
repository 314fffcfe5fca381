"""The zero-bubble ZB-H1 schedule (Qi et al. 2023, "Zero Bubble Pipeline Parallelism") on DeepSpeed's engine.

Each micro batch's backward is split in two passes. B, the input gradient, is what the previous stage waits for:
it is sent upstream as soon as it is computed. W, the weight gradients, nobody waits for: stage s defers it until
after ``B(j + s)``, so the upstream stages get their input gradients sooner, and the last ``s`` Ws fill the tail
where 1F1B's stage would sit idle. The order of passes is ``pipellm.plan.schedules.zb_h1`` (the simulator's
table): ``ZeroBubbleH1Schedule`` walks it while it walks DeepSpeed's ``TrainSchedule`` for the transfers, whose
order of sends and receives (deadlock-free between neighbouring stages) stays as it is. Each send of an input
gradient stays right after its B; a due W runs after that send, before the next receive.

How the backward is split: ``pipellm.pipeline.split_backward`` (B: autograd with respect to the stage's inputs
only, recording the gradient at each weight's boundary node; W: autograd from there to the trainable parameters,
accumulated into their ``.grad`` as DeepSpeed's backward does, the bf16 optimizer's fp32 gradients included;
``attach`` keeps compiled layers' linear layers out of their graphs so that W can run them alone). The
gradient reductions (the tied embedding's all-reduce, the data-parallel all-reduce) run once, after the last W, as
in 1F1B. Memory: a micro batch's whole autograd graph (all its saved activations) and the gradients recorded at
its boundary nodes (for a linear layer, the size of its output) are held from its B until its W; stage s holds up
to ``P`` micro batches so, where 1F1B holds ``P - s`` (``pipellm.plan --schedule zb-h1`` prints the peak per
stage). Whether the smaller bubble pays on GPUs is not measured yet.
"""
from __future__ import annotations

import collections
import functools

import torch
from deepspeed.runtime.pipe import schedule as ds_schedule

from pipellm.pipeline.deepspeed_compat import (accumulating_weight_grads, add_pipeline_instructions,
                                               backward_tensors, engine_backward, pipeline_instruction,
                                               release_outputs, set_train_schedule)
from pipellm.pipeline.split_backward import SplitBackward, separate_weight_grads
from pipellm.plan.schedules import Op, zb_h1


class InputGradPass(ds_schedule.BufferOpInstruction):
    """B: the input gradient of the micro batch in ``buffer_id`` (what ``SendGrad`` sends); W comes later."""


class WeightGradPass(ds_schedule.PipeInstruction):
    """W: the weight gradients of the oldest micro batch whose B has run and whose W has not."""


class ZeroBubbleH1Schedule(ds_schedule.TrainSchedule):
    """DeepSpeed's ``TrainSchedule`` steps with ``BackwardPass`` split into ``InputGradPass`` and
    ``WeightGradPass``, in the order of ``pipellm.plan.schedules.zb_h1`` for this stage."""

    def steps(self):
        order = zb_h1(self.stage_id, self.stages, self.micro_batches)
        position, due = 0, []  # the next F or B of ``order``; Ws whose turn came after the last B
        for step in super().steps():
            commands = []
            for command in step:
                if due and not isinstance(command, ds_schedule.SendGrad):
                    commands += due  # after the last B's input gradient left, before anything else
                    due = []
                if isinstance(command, (ds_schedule.ForwardPass, ds_schedule.BackwardPass)):
                    kind = "F" if isinstance(command, ds_schedule.ForwardPass) else "B"
                    assert order[position][0] == kind, f"stage {self.stage_id}: {order[position]} is not a {kind}"
                    position += 1
                    if kind == "B":
                        command = InputGradPass(command.buffer_id)
                        while position < len(order) and order[position][0] == "W":
                            due.append(WeightGradPass())
                            position += 1
                commands.append(command)
            yield commands
        assert position == len(order) and not due, f"stage {self.stage_id}: {order[position:]} not scheduled"


class ZeroBubbleH1:
    """The ``PipelineSchedule`` that trains with ``ZeroBubbleH1Schedule``; evaluation is DeepSpeed's.

    ``executed``: the passes (``("F", j)``, ``("B", j)``, ``("W", j)``) of the last training batch on this stage in
    the order they ran, for comparison with ``pipellm.plan.schedules.zb_h1``; ``unsplit``: how many of its Ws
    differentiated from the outputs again (``SplitBackward``'s fallback). ``recompute``: the stage's layers are
    grad-checkpointed (W then runs from the outputs). ``compiled``: they are compiled (``attach`` keeps their
    linear layers out of the graphs; eager layers are left as they are)."""

    def __init__(self, recompute: bool = False, compiled: bool = False):
        self.recompute, self.compiled = recompute, compiled
        self.executed: list[Op] = []
        self.unsplit = 0
        self.pending: collections.deque = collections.deque()  # (micro batch, its SplitBackward) until W
        self.params: list[torch.nn.Parameter] = []
        self.training = False

    def attach(self, engine) -> None:
        """Teach the engine the two passes and this schedule (once, before the engine's instructions are timed),
        and keep the weight gradients of compiled layers apart (``separate_weight_grads``)."""
        if self.compiled:
            separate_weight_grads(engine.module)
        self.params = [p for p in engine.module.parameters() if p.requires_grad]
        forward = pipeline_instruction(engine, ds_schedule.ForwardPass)

        def recorded_forward(engine, buffer_id):
            if self.training:
                self.executed.append(("F", sum(kind == "F" for kind, _ in self.executed)))
            forward(engine, buffer_id=buffer_id)

        add_pipeline_instructions(engine, {ds_schedule.ForwardPass: recorded_forward,
                                           InputGradPass: self.input_grad, WeightGradPass: self.weight_grad})
        set_train_schedule(engine, ZeroBubbleH1Schedule)

    def train_batch(self, engine, micro_batches: list) -> torch.Tensor:
        self.executed, self.unsplit, self.training = [], 0, True
        try:
            loss = engine.train_batch(iter(micro_batches))
        finally:
            self.training = False
        assert not self.pending, "weight gradients left over after the optimizer step"
        return loss

    def eval_batch(self, engine, micro_batches: list) -> torch.Tensor:
        return engine.eval_batch(iter(micro_batches))

    def input_grad(self, engine, buffer_id: int) -> None:
        """B: the inputs' gradients into their ``.grad`` (``SendGrad`` sends them); the graph stays for W."""
        micro = sum(kind == "B" for kind, _ in self.executed)
        outputs, grads, inputs = backward_tensors(engine, buffer_id)
        with engine_backward(engine):
            self.pending.append((micro, SplitBackward(outputs, grads, inputs, self.params, self.recompute,
                                                      functools.partial(accumulating_weight_grads, engine))))
        release_outputs(engine, buffer_id)
        self.executed.append(("B", micro))

    def weight_grad(self, engine) -> None:
        """W: the oldest pending micro batch's parameter gradients, accumulated; its graph is freed."""
        micro, split = self.pending.popleft()
        with engine_backward(engine):
            split.weight_grads()
        self.unsplit += not split.split
        self.executed.append(("W", micro))
