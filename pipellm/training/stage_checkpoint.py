"""The pipeline engine's checkpoints, layout-free by construction: a run resumes with its full training state on
any other valid layout (other ``dims``, other ``parts`` or ``auto``, another world size, ZeRO-1 on or off).

**What a checkpoint holds.** Per layer file (``pipellm.pipeline.layer_files``): its weights,
``layer_XX-model_states.pt``, as before; and ``layer_XX-optim_states.pt``, the optimizer state of each of its
trainable parameters keyed by the parameter's checkpoint name (the Hugging Face key, or the name the parameter
set gives): AdamW's two moments and step, Lion's moment, and in bf16/fp16 runs the fp32 master weight
(``pipellm.training.parameter_states``). The engine's part of ``pipellm_state.pt`` holds the LR scheduler, the
learning rates, the skipped-step count and fp16's dynamic loss scale. Nothing in these files depends on which
stage or replica held a parameter, so the stages of any layout each read the files of their own layers. A tied
weight (a tied head, whose pipeline-replicated copy trains on the last stage) is saved once, with the embedding's
layer, and loaded into both copies (they are equal: DeepSpeed sums their gradients). Data-parallel replica 0 of
each stage writes its layers' files; under ZeRO-1 or the bf16 optimizer every replica of the stage first takes
part in gathering each parameter's partitioned state, and on load each replica copies out its own share.

**Why not DeepSpeed's universal checkpoint.** It converts a saved checkpoint offline (``ds_to_universal.py``: a
separate step after the job, and a second copy of the state) into per-parameter files that DeepSpeed then
repartitions on load; it reads only ZeRO's and the bf16 optimizer's files (not a plain fp32 or fp16 run's), and
has known pitfalls with pipeline-replicated (tied) weights and layers without parameters, untested for pipeline
training by pipellm's peers. pipellm's layer files are already layout-free and named by checkpoint key; saving the
optimizer state the same way makes every checkpoint resumable on any layout with one format and one load path
(the unchanged layout included), no conversion step, and files any tool reads with ``torch.load``.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from pipellm.errors import PipellmError
from pipellm.files import load_torch_file
from pipellm.models.base import ModelFamily
from pipellm.pipeline.deepspeed_compat import BoundedPipelineModule, loss_scale_state, restore_loss_scale_state
from pipellm.pipeline.layer_files import layer_file_name, optimizer_file_name
from pipellm.pipeline.partition import PipelineLayers
from pipellm.pipeline.weights import layer_state, stage_modules
from pipellm.training.checkpointer import OPTIMIZER_STATE_FORMAT
from pipellm.training.parameter_states import ParameterStates
from pipellm.training.parameters import NamedParameters

class StageCheckpoint:
    """This rank's stage's share of a checkpoint: its layers' weights and its trainable parameters' optimizer
    state, by layer file."""

    def __init__(self, model: BoundedPipelineModule, family: ModelFamily, hf_config, trainable: NamedParameters,
                 states: ParameterStates):
        self.model, self.states = model, states
        self.layers = PipelineLayers.of(family, hf_config)
        self.names = {id(param): name for name, param in trainable}

    def _layers(self):
        """``(layer file index, DeepSpeed layer index, module, its trainable parameters by name)`` per layer of
        this stage; a tied head's are the embedding's (layer file 0)."""
        for layer_index, module in stage_modules(self.model):
            params = [(self.names[id(p)], p) for p in module.parameters() if id(p) in self.names]
            yield self.layers.file_index(layer_index), layer_index, module, params

    def save(self, directory: Path, saves_frozen: bool) -> None:
        """Replica 0 writes each layer's files (all replicas of the stage call this: gathering may be collective);
        a tied head's weight is saved with the embedding, by the stage that holds it."""
        writer = self.model.data_parallel_rank == 0
        self.states.before_gathering()
        for file_index, layer_index, module, params in self._layers():
            if file_index != layer_index:
                continue
            states = ({name: self.states.gather(param) for name, param in params}
                      if writer or self.states.collective else {})
            if writer:
                torch.save(layer_state(module, saves_frozen), directory / layer_file_name(file_index))
                if states:
                    torch.save(states, directory / optimizer_file_name(file_index))

    def load_optimizer(self, directory: Path) -> None:
        """Every trainable parameter's optimizer state (and fp32 master) from ``directory``'s files, whatever
        layout saved them."""
        self.states.scatter(self._saved(directory))

    def _saved(self, directory: Path):
        seen: set[int] = set()
        for file_index, _, _, params in self._layers():
            params = [(name, param) for name, param in params if id(param) not in seen]
            if not params:
                continue
            path = directory / optimizer_file_name(file_index)
            saved = load_torch_file(path)
            for name, param in params:
                if name not in saved:
                    raise PipellmError(f"{path} has no optimizer state of `{name}`: the checkpoint trained other "
                                       f"parameters; set `resume_weights_only: true` to start from its weights")
                for key, value in saved[name].items():
                    if value.dim() and value.shape != param.shape:
                        raise PipellmError(f"{path}: `{name}`'s {key} has shape {tuple(value.shape)}, this model's "
                                           f"parameter {tuple(param.shape)}; resume with the checkpoint's model")
                seen.add(id(param))
                yield param, saved.pop(name)


def engine_state(engine) -> dict:
    """What ``pipellm_state.pt`` holds of the DeepSpeed engine ``engine``: what a resume must keep
    (``ResumePoint.check_config``) and the schedule's and loss scale's state."""
    precision = "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32"
    return {"optimizer_state": OPTIMIZER_STATE_FORMAT, "global_batch_size": engine.train_batch_size(),
            "precision": precision, "optimizer": type(engine.basic_optimizer).__name__,
            "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
            "lrs": [group["lr"] for group in engine.optimizer.param_groups],
            "skipped_steps": engine.skipped_steps,
            "loss_scale": loss_scale_state(engine.optimizer)}


def restore_engine_state(engine, state: dict, step: int, weights_only: bool) -> None:
    """The schedule's position (the next step trains at the saved learning rate) and the step counters; with the
    optimizer state also the skipped steps and fp16's loss scale."""
    groups = engine.optimizer.param_groups
    if engine.lr_scheduler is not None and state["lr_scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(per_group(state["lr_scheduler"], len(groups)))
    for group, lr in zip(groups, per_group({"lrs": state["lrs"]}, len(groups))["lrs"]):
        group["lr"] = lr
    engine.global_steps = step
    engine.global_samples = step * engine.train_batch_size()
    if not weights_only:
        engine.skipped_steps = state["skipped_steps"]
        if state["loss_scale"] is not None:
            restore_loss_scale_state(engine.optimizer, state["loss_scale"])


def per_group(state: dict, groups: int) -> dict:
    """A schedule's state for a stage with ``groups`` parameter groups. Every group has the same peak learning
    rate and schedule (``pipellm.training.optim``), so a list over the saving stage's groups holds one value
    repeated; a stage of another layout may have another number of groups (one holding only the embedding has no
    undecayed group)."""
    resized = {}
    for key, value in state.items():
        if isinstance(value, list) and len(value) != groups:
            if not value or any(item != value[0] for item in value):
                raise PipellmError(f"the checkpoint's LR scheduler has a different `{key}` per parameter group "
                                   f"({value}), which cannot follow a layout with {groups} groups per stage; "
                                   f"resume on the checkpoint's layout")
            value = [copy.deepcopy(value[0]) for _ in range(groups)]
        resized[key] = value
    return resized
