"""Every use of DeepSpeed's private members, in one place, for the DeepSpeed releases pipellm is tested with.

pipellm drives DeepSpeed's ``PipelineModule`` / ``PipelineEngine`` through their public API except where that API
has no way in: choosing each stage's layers ourselves, leaving frozen tied weights out of the tied gradients'
all-reduce, reading the process grid, timing every pipeline instruction, and reading and writing each parameter's
share of the optimizer state that DeepSpeed's optimizer wrappers hold (``pipellm.training.parameter_states``;
gathering and setting a whole parameter's state goes through the public ``deepspeed.utils.safe_*`` functions).
Those reach into private members, which a DeepSpeed release may rename; ``TESTED`` (also ``setup.py``'s pin) is
the range the test suite covers, and importing pipellm with another release stops with one line.
"""
from __future__ import annotations

import contextlib

import deepspeed
import torch
from deepspeed.pipe import PipelineModule

from pipellm.errors import PipellmError

TESTED = (0, 19)
"""DeepSpeed major.minor the suite runs against (``setup.py``: ``deepspeed>=0.19,<0.20``)."""


def check_version(version: str = deepspeed.__version__) -> None:
    major_minor = tuple(int(part) for part in version.split(".")[:2])
    if major_minor != TESTED:
        raise PipellmError(f"DeepSpeed {version} is installed but pipellm is tested with {TESTED[0]}.{TESTED[1]}.x "
                           f"(it uses DeepSpeed internals that change between releases): "
                           f"pip install 'deepspeed>={TESTED[0]}.{TESTED[1]},<{TESTED[0]}.{TESTED[1] + 1}'")


check_version()


class BoundedPipelineModule(PipelineModule):
    """A ``PipelineModule`` whose stages hold exactly the layers between the given DeepSpeed boundaries.

    DeepSpeed only offers named partition methods (``uniform``, ``parameters``, ``type:...``); pipellm computes the
    boundaries itself (``pipellm.pipeline.partition.Partition``), so it replaces the private method that sets them.
    """

    def __init__(self, layers: list, boundaries: list[int], **kwargs):
        self._boundaries = list(boundaries)
        super().__init__(layers=layers, **kwargs)

    def _partition_layers(self, method="uniform"):
        self.parts = self._boundaries
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    def get_tied_weights_and_groups(self):
        """The tied weights whose gradients the engine all-reduces between their stages (``ReduceTiedGrads``):
        only those that train. A frozen tied weight (LoRA's embedding, unless ``modules_to_save`` names it) has
        no gradient, and under DeepSpeed's bf16 optimizer not even the fp32 one the engine reads
        (``_hp_grad``: it exists only for the optimizer's parameters). Every stage of a tie freezes or trains
        it alike (the copies share one checkpoint name), so they all skip the same all-reduce."""
        return [(weight, group) for weight, group in super().get_tied_weights_and_groups() if weight.requires_grad]

    @property
    def local_layer_indices(self) -> range:
        """DeepSpeed layer indices of this stage's layers (in ``forward_funcs`` order)."""
        return range(self._local_start, self._local_stop)

    @property
    def data_parallel_rank(self) -> int:
        """This rank's replica index along the data axis."""
        return self._grid.data_parallel_id

    @property
    def pipe_parallel_group(self):
        """The process group of this replica's stages (a global gradient norm sums over it)."""
        return self._grid.get_pipe_parallel_group()

    @property
    def grid_layout(self) -> dict:
        """The process grid: ``{"axes": [...], "dims": [...]}``."""
        topology = self._grid._topo
        return {"axes": list(topology.get_axis_names()),
                "dims": [topology.get_dim(axis) for axis in topology.get_axis_names()]}


def is_pipeline_replicated(param: torch.nn.Parameter) -> bool:
    """A tied weight's copy on a later stage (its gradient is the first copy's): counted once in norms and sizes."""
    return bool(getattr(param, "ds_pipe_replicated", False))


def report_grad_norm(optimizer, norm: float) -> None:
    """Where DeepSpeed's engine reads a client optimizer's global gradient norm (``get_global_grad_norm``)."""
    optimizer._global_grad_norm = norm


def wrap_pipeline_instructions(engine, wrap) -> None:
    """Route every instruction of the engine's schedule (``ForwardPass``, ``SendActivation``, ...) through
    ``wrap(name, method) -> method``; the engine looks instructions up in this map on the instance."""
    engine._INSTRUCTION_MAP = {kind: wrap(kind.__name__, method)
                               for kind, method in engine._INSTRUCTION_MAP.items()}


def add_pipeline_instructions(engine, methods: dict) -> None:
    """Teach the engine more instructions (``{instruction class: method(engine, **kwargs)}``), or replace how it
    runs one of its own; before ``wrap_pipeline_instructions``, which then times them too."""
    engine._INSTRUCTION_MAP = {**engine._INSTRUCTION_MAP, **methods}


def pipeline_instruction(engine, kind):
    """How the engine runs an instruction: ``method(engine, **kwargs)``."""
    return engine._INSTRUCTION_MAP[kind]


def set_train_schedule(engine, make_schedule) -> None:
    """``train_batch`` runs ``make_schedule(micro_batches=, stages=, stage_id=)`` (a ``PipeSchedule``) instead of
    DeepSpeed's ``TrainSchedule``; the rest of ``train_batch`` (data iterator, loss aggregation) stays DeepSpeed's."""
    engine._train_schedule = lambda: make_schedule(micro_batches=engine.micro_batches, stages=engine.num_stages,
                                                   stage_id=engine.stage_id)


def backward_tensors(engine, buffer_id: int) -> tuple[list[torch.Tensor], list[torch.Tensor] | None,
                                                      list[torch.Tensor]]:
    """What ``_exec_backward_pass`` differentiates for the micro batch in ``buffer_id``: the tensors (the loss on
    the last stage, else the stage's floating-point outputs), the gradients received for them (a copy: the
    receive buffer is reused; None for the loss) and the stage's inputs that want a gradient (sent upstream)."""
    if engine.is_pipe_partitioned:
        raise NotImplementedError("the zero-bubble schedule does not split pipeline activations over model-"
                                  "parallel ranks")
    inputs = engine.pipe_buffers["inputs"][buffer_id]
    inputs = [t for t in (inputs if isinstance(inputs, tuple) else (inputs,))
              if torch.is_tensor(t) and t.requires_grad]
    if engine.is_last_stage():
        return [engine.loss], None, inputs
    outputs = engine.pipe_buffers["outputs"][buffer_id]
    outputs = [t for t in (outputs if isinstance(outputs, tuple) else (outputs,)) if t.is_floating_point()]
    received = engine.grad_layer if isinstance(engine.grad_layer, (list, tuple)) else [engine.grad_layer]
    return outputs, [grad.clone() for grad in received], inputs


def release_outputs(engine, buffer_id: int) -> None:
    """Drop the engine's reference to a micro batch's outputs once its backward no longer needs the buffer."""
    engine.pipe_buffers["outputs"][buffer_id] = None


@contextlib.contextmanager
def engine_backward(engine):
    """A backward pass the engine runs itself (as ``_exec_backward_pass`` marks it: DeepSpeed's post-backward hook
    then skips its check for a direct ``tensor.backward``)."""
    engine._running_engine_backward = True
    try:
        yield
    finally:
        engine._running_engine_backward = False


@contextlib.contextmanager
def accumulating_weight_grads(engine):
    """Around a backward that writes parameter gradients: DeepSpeed's bf16 optimizer clears the low-precision
    gradients before and adds them to its fp32 gradients after (as ``_exec_backward_pass`` does)."""
    bf16 = engine.using_bf16_optimizer
    if bf16:
        engine.optimizer.clear_lp_grads()
    yield
    if bf16 and not engine._config.bfloat16_config.immediate_grad_update:
        engine.optimizer.update_hp_grads(clear_lp_grads=False)


def instruction_names() -> set[str]:
    """The names of the pipeline schedule's instructions."""
    from deepspeed.runtime.pipe.engine import PipelineEngine

    return {kind.__name__ for kind in PipelineEngine._INSTRUCTION_MAP}


def flat_fp32_partitions(optimizer) -> list[tuple[list[torch.nn.Parameter], torch.Tensor]] | None:
    """DeepSpeed's optimizers that keep each parameter group's fp32 master weights as one flat tensor partitioned
    over the data-parallel replicas (ZeRO 1/2's and the bf16 optimizer's): per group, its low-precision
    parameters and this rank's flat fp32 partition (what the torch optimizer steps). None for the others."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if isinstance(optimizer, DeepSpeedZeroOptimizer):
        return list(zip(optimizer.bit16_groups, optimizer.single_partition_of_fp32_groups))
    if isinstance(optimizer, BF16_Optimizer):
        return list(zip(optimizer.bf16_groups, optimizer.fp32_groups_flat_partition))
    return None


def fp32_masters(optimizer) -> dict[int, torch.Tensor] | None:
    """fp16 without ZeRO (DeepSpeed's unfused fp16 optimizer: pipellm's torch optimizers are not its fused Adam):
    ``id(fp16 parameter) -> its fp32 master``, the tensor the torch optimizer steps. None for the others."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if not isinstance(optimizer, FP16_UnfusedOptimizer):
        return None
    return {id(low): master for lows, masters in zip(optimizer.fp16_groups, optimizer.fp32_groups)
            for low, master in zip(lows, masters)}


def partition_fragment(param: torch.nn.Parameter) -> tuple[int, int, int] | None:
    """Where this rank's share of a partitioned parameter lies: ``(start in the flattened parameter, start in
    the flat fp32 partition, length)``; None when this rank holds none of it."""
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is None:
        return None
    return mapping.lp_fragment_address.start, mapping.hp_fragment_address.start, mapping.lp_fragment_address.numel


def relink_partition_state(optimizer) -> None:
    """Point each parameter's view of the partitioned optimizer state at the torch optimizer's current state
    tensors (DeepSpeed links them once, after the first step; a loaded state replaces those tensors)."""
    optimizer._hp_optimizer_states_linked = False
    optimizer._lazy_init_hp_params_optimizer_state()


LOSS_SCALE_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")
"""What fp16's dynamic loss scaling changes as it runs (its settings come from the config)."""


def loss_scale_state(optimizer) -> dict | None:
    """fp16's dynamic loss scale and its counters (ZeRO keeps them in ``loss_scaler``, the fp16 optimizer in
    ``loss_scale_config``); None when the loss scale is static (fp32, bf16, a fixed fp16 scale)."""
    holder = getattr(optimizer, "loss_scaler", None) or getattr(optimizer, "loss_scale_config", None)
    if holder is None or not (getattr(holder, "dynamic", False) or getattr(holder, "dynamic_loss_scale", False)):
        return None
    return {name: float(value) if torch.is_tensor(value) else value
            for name in LOSS_SCALE_FIELDS if (value := getattr(holder, name, None)) is not None}


def restore_loss_scale_state(optimizer, state: dict) -> None:
    holder = getattr(optimizer, "loss_scaler", None) or getattr(optimizer, "loss_scale_config", None)
    for name, value in state.items():
        setattr(holder, name, value)
