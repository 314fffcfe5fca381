"""Each trainable parameter's optimizer state as whole tensors, whichever of DeepSpeed's optimizer wrappers holds it.

A parameter's state is the torch optimizer's for that parameter (AdamW: ``step``, ``exp_avg``, ``exp_avg_sq``;
Lion: ``exp_avg``), each moment shaped like the parameter, plus ``master``, its fp32 master weight, when the model
computes in bf16 or fp16 (in fp32 the weight is its own master, and the layer file holds it exactly). DeepSpeed
holds these in one of two ways:

* **Per parameter** (fp32 without ZeRO; fp16 without ZeRO, whose unfused optimizer keeps one fp32 master per
  parameter): the torch optimizer steps each parameter (or its master) and keeps its state; every data-parallel
  replica holds all of it.
* **Partitioned** (ZeRO-1/2 and DeepSpeed's bf16 optimizer): each parameter group is flattened into one fp32
  tensor and each replica owns a contiguous share of it, which the torch optimizer steps; a parameter may be
  split between replicas. Gathering a parameter is a collective of the stage's replicas (all of them gather the
  same parameters in the same order); scattering copies each replica's share out of the whole tensors.

A per-parameter ``step`` becomes the step of its flat group when loaded partitioned, so the group's parameters
must agree on it (they do: every trainable parameter, a mixtral expert no token chose included, gets a gradient
every step).
"""
from __future__ import annotations

import abc
from typing import Iterable

import torch
from torch import nn

from pipellm.errors import PipellmError
from pipellm.pipeline.deepspeed_compat import (flat_fp32_partitions, fp32_masters, partition_fragment,
                                               relink_partition_state)

MASTER = "master"
STEP = "step"


def _on_cpu(tensor: torch.Tensor) -> torch.Tensor:
    """A copy that holds only this tensor's elements (a view into a flat buffer would save the whole buffer)."""
    return tensor.detach().to("cpu", copy=True)


def _torch_state_dict(optimizer: torch.optim.Optimizer, by_param: dict[int, dict]) -> dict:
    """``optimizer``'s state dict with the state ``by_param`` (``id(stepped tensor) -> state``); torch's
    ``load_state_dict`` then puts each tensor where the optimizer keeps it (the step of a fused optimizer on the
    parameter's device, moments in the parameter's dtype)."""
    stepped = [p for group in optimizer.param_groups for p in group["params"]]
    state = optimizer.state_dict()
    state["state"] = {index: by_param[id(p)] for index, p in enumerate(stepped) if id(p) in by_param}
    return state


class ParameterStates(abc.ABC):
    """Reads and writes the optimizer state of a DeepSpeed engine one parameter at a time (``of``)."""

    collective = False
    """Gathering is a collective of the data-parallel replicas (every replica calls ``gather`` alike)."""

    @staticmethod
    def of(engine) -> "ParameterStates":
        partitions = flat_fp32_partitions(engine.optimizer)
        if partitions is not None:
            return PartitionedStates(engine.optimizer, engine.basic_optimizer, partitions)
        return PerParameterStates(engine.basic_optimizer, fp32_masters(engine.optimizer) or {})

    def before_gathering(self) -> None:
        """Called once before a checkpoint's ``gather`` calls."""

    @abc.abstractmethod
    def gather(self, param: nn.Parameter) -> dict[str, torch.Tensor]:
        """The parameter's whole state, on the CPU."""

    @abc.abstractmethod
    def scatter(self, saved: Iterable[tuple[nn.Parameter, dict[str, torch.Tensor]]]) -> None:
        """Load the state of every parameter the optimizer steps (each once; streamed, so a stage's whole state
        is never in memory twice)."""


class PerParameterStates(ParameterStates):
    def __init__(self, optimizer: torch.optim.Optimizer, masters: dict[int, torch.Tensor]):
        self.optimizer, self.masters = optimizer, masters

    def gather(self, param):
        master = self.masters.get(id(param), param)
        state = {key: _on_cpu(value) for key, value in self.optimizer.state.get(master, {}).items()}
        if master is not param:
            state[MASTER] = _on_cpu(master)
        return state

    @torch.no_grad()
    def scatter(self, saved):
        by_master = {}
        for param, state in saved:
            master, state = self.masters.get(id(param), param), dict(state)
            if MASTER in state:
                master.copy_(state.pop(MASTER))
            # On the parameter's device now, so the whole state is never on the CPU at once (the step stays
            # where the checkpoint has it: torch decides where an optimizer keeps it).
            by_master[id(master)] = {key: value if key == STEP else value.to(master.device)
                                     for key, value in state.items()}
        self.optimizer.load_state_dict(_torch_state_dict(self.optimizer, by_master))


class PartitionedStates(ParameterStates):
    collective = True

    def __init__(self, wrapper, optimizer: torch.optim.Optimizer,
                 partitions: list[tuple[list[nn.Parameter], torch.Tensor]]):
        self.wrapper, self.optimizer, self.partitions = wrapper, optimizer, partitions
        self.group_of = {id(p): index for index, (params, _) in enumerate(partitions) for p in params}

    def before_gathering(self):
        # DeepSpeed links each parameter to its share of the state once, after the first optimizer step; ZeRO
        # with offload steps one group at a time and links them all after the first group's step, when the
        # other groups have no state yet.
        relink_partition_state(self.wrapper)

    def gather(self, param):
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        flat = self.partitions[self.group_of[id(param)]][1]
        flat_state = self.optimizer.state.get(flat, {})
        state = {STEP: _on_cpu(flat_state[STEP])} if STEP in flat_state else {}
        for key, value in flat_state.items():  # the same keys in the same order on every replica
            if torch.is_tensor(value) and value.shape == flat.shape:
                state[key] = _on_cpu(safe_get_full_optimizer_state(param, key))
        if param.dtype != torch.float32:
            state[MASTER] = _on_cpu(safe_get_full_fp32_param(param))
        return state

    @torch.no_grad()
    def scatter(self, saved):
        from deepspeed.utils import safe_set_full_fp32_param

        buffers: dict[int, dict[str, torch.Tensor]] = {}
        for param, state in saved:
            group = self.group_of[id(param)]
            flat, state = self.partitions[group][1], dict(state)
            if MASTER in state:
                safe_set_full_fp32_param(param, state.pop(MASTER))
            group_state = buffers.setdefault(group, {})
            if STEP in state:
                step = state.pop(STEP)
                first = group_state.setdefault(STEP, step)
                if not torch.equal(first, step):
                    raise PipellmError(f"the checkpoint's parameters of one optimizer group were stepped "
                                       f"{float(first):g} and {float(step):g} times; ZeRO and the bf16 optimizer keep "
                                       f"one step per group: resume without ZeRO, or with `resume_weights_only: true`")
            fragment = partition_fragment(param)
            for key, value in state.items():
                if key not in group_state:
                    group_state[key] = torch.zeros_like(flat)
                if fragment is not None:
                    start, flat_start, length = fragment
                    group_state[key].narrow(0, flat_start, length).copy_(value.flatten().narrow(0, start, length))
        self.optimizer.load_state_dict(_torch_state_dict(
            self.optimizer, {id(self.partitions[group][1]): state for group, state in buffers.items()}))
        relink_partition_state(self.wrapper)
