"""Every use of DeepSpeed's private members, in one place, for the DeepSpeed releases pipellm is tested with.

pipellm drives DeepSpeed's ``PipelineModule`` / ``PipelineEngine`` through their public API except where that API
has no way in: choosing each stage's layers ourselves, reading the process grid, timing every pipeline
instruction, loading the bf16 optimizer's own state and making checkpoint reads refuse arbitrary pickles. Those
reach into private members, which a DeepSpeed release may rename; ``TESTED`` (also ``setup.py``'s pin) is the
range the test suite covers, and importing pipellm with another release stops with one line.
"""
from __future__ import annotations

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
                               for kind, method in type(engine)._INSTRUCTION_MAP.items()}


def instruction_names() -> set[str]:
    """The names of the pipeline schedule's instructions."""
    from deepspeed.runtime.pipe.engine import PipelineEngine

    return {kind.__name__ for kind in PipelineEngine._INSTRUCTION_MAP}


def load_bf16_optimizer_state(engine, save_dir: str, tag: str) -> None:
    """DeepSpeed 0.19's bf16 optimizer without ZeRO saves its state to ``bf16_zero_*`` files, but its
    ``load_checkpoint`` hands it the per-stage file's copy, which it cannot read: load those files directly."""
    engine._load_zero_checkpoint(save_dir, tag, load_optimizer_states=True)


def read_checkpoints_weights_only(engine) -> None:
    """Make DeepSpeed's checkpoint reads refuse anything but tensors and plain data (it unpickles freely).
    Allowed besides, as the optimizer states hold them: the plain dataclass the bf16 and ZeRO optimizers map
    parameters with, ZeRO's stage enum, and the loss scalers (static: a scale and a flag, kept even in fp32;
    dynamic, fp16's: its scale, counters and settings)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    def load(path, map_location=None):
        with torch.serialization.safe_globals([fragment_address, LossScaler, DynamicLossScaler, ZeroStageEnum]):
            return torch.load(path, map_location=map_location, weights_only=True)
    engine.checkpoint_engine.load = load
