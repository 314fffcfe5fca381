"""The pipeline engine (``train_ds.py``): this rank's stage of a ``PipelineModule`` under DeepSpeed's pipeline
engine, run by a ``pipellm.pipeline.schedule.PipelineSchedule``.

The stage is built from the family (``pipellm.pipeline.stages.build_pipeline``) with the objective as its loss,
loads only its own layer files (or a checkpoint's, on resume), and its parameters are named by their Hugging
Face checkpoint keys for the optimizer. Every instruction of the schedule is timed by the stall watchdog.
"""
from __future__ import annotations

from pathlib import Path

import torch

from pipellm.config import TrainConfig
from pipellm.errors import PipellmError
from pipellm.models.base import ModelFamily
from pipellm.pipeline.deepspeed_compat import (is_pipeline_replicated, load_bf16_optimizer_state,
                                               read_checkpoints_weights_only)
from pipellm.pipeline.schedule import OneForwardOneBackward, PipelineSchedule
from pipellm.training.distributed import StallWatchdog, all_reduce
from pipellm.training.engine import Engine, EngineSetup


class PipelineEngine(Engine):
    name = "pipellm"
    resumable = True
    export_hint = "(export: python convert_model.py pp_to_hg --input-path {save_path} --save-path HF_OUT)"

    def __init__(self, cfg: TrainConfig, setup: EngineSetup, *, hf_config, family: ModelFamily,
                 schedule: PipelineSchedule = OneForwardOneBackward()):
        from pipellm.pipeline.weights import checkpoint_named_parameters, load_pipeline_weights

        self.hf_config, self.schedule = hf_config, schedule
        self.model = model = build_stage(cfg, setup, hf_config, family)
        if setup.resume is not None:
            setup.resume.check_layout(self.checkpoint_layout())
        weights_dir = setup.resume.weights_dir if setup.resume is not None else (
            None if cfg.from_scratch else cfg.model_path)
        if weights_dir is not None:
            load_pipeline_weights(model, family, hf_config, weights_dir)
        super().__init__(cfg, model, checkpoint_named_parameters(model, family, hf_config), cfg.deepspeed, setup)
        self.replica, self.replicas = model.data_parallel_rank, cfg.data_degree
        self.stage, self.num_stages = model.stage_id, model.num_stages
        self.watchdog = StallWatchdog(self.ds, model.stage_id, cfg.collective_timeout_s, before_exit=setup.on_stall)

    def train_step(self, micro_batches: list) -> float:
        return float(self.schedule.train_batch(self.ds, micro_batches))

    def eval_step(self, micro_batches: list) -> float:
        return float(self.schedule.eval_batch(self.ds, micro_batches))

    def num_parameters(self) -> int:
        """Each stage counts its own (a tied copy once), replica 0 only."""
        local = sum(p.numel() for p in self.model.parameters() if not is_pipeline_replicated(p))
        return int(all_reduce(torch.tensor([local if self.replica == 0 else 0], dtype=torch.float64))[0])

    def run_layout(self) -> dict:
        # The stage boundaries count DeepSpeed's layers, where the final norm and the head are two.
        topology = self.checkpoint_layout()
        return {"layout": {"axes": topology["axes"], "dims": topology["dims"],
                           "stage_layer_boundaries": topology["stage_boundaries"]},
                "coordinates": {"stage": self.stage, "replica": self.replica}}

    def checkpoint_layout(self) -> dict:
        """What a stage's optimizer state depends on: which layers each stage holds, and the process grid."""
        return {"stage_boundaries": list(self.model.parts), **self.model.grid_layout}

    def resume_state(self) -> dict:
        """The layout (to detect a changed one), and for weights-only resumes the LR scheduler and the learning
        rates it set (DeepSpeed saves both per stage, with the optimizer state, in a file a changed layout
        cannot read)."""
        return {"layout": self.checkpoint_layout(),
                "lr_scheduler": self.ds.lr_scheduler.state_dict() if self.ds.lr_scheduler is not None else None,
                "lrs": [group["lr"] for group in self.ds.optimizer.param_groups]}

    def load(self, checkpoint: Path, weights_only: bool, state: dict) -> None:
        """Weights only: the weights were loaded before ``deepspeed.initialize``; the schedule's position here.
        Otherwise the weights with the optimizer and LR scheduler states."""
        engine = self.ds
        if weights_only:
            if engine.lr_scheduler is not None and state["lr_scheduler"] is not None:
                engine.lr_scheduler.load_state_dict(state["lr_scheduler"])
            # The scheduler sets the rates after each step: the next step trains at the ones saved.
            for group, lr in zip(engine.optimizer.param_groups, state["lrs"]):
                group["lr"] = lr
            engine.global_steps = state["step"]
            engine.global_samples = state["step"] * engine.train_batch_size()
            return
        read_checkpoints_weights_only(engine)
        # DeepSpeed's bf16 optimizer without ZeRO cannot read its state from the per-stage file (deepspeed_compat).
        bf16_without_zero = engine.bfloat16_enabled() and not engine.zero_optimization()
        path, _ = engine.load_checkpoint(str(checkpoint.parent), tag=checkpoint.name,
                                         load_optimizer_states=not bf16_without_zero)
        if path is None:
            raise PipellmError(f"`resume` {checkpoint}: DeepSpeed found no model states to load; the "
                               f"checkpoint is incomplete, resume from an earlier one")
        if bf16_without_zero:
            load_bf16_optimizer_state(engine, str(checkpoint.parent), checkpoint.name)


def build_stage(cfg: TrainConfig, setup: EngineSetup, hf_config, family: ModelFamily):
    """This rank's stage, randomly initialised, with the objective as its loss; ``parts: auto`` is decided here
    (it needs the process group: rank 0 measures, every rank takes its split)."""
    from deepspeed.runtime.pipe.topology import ProcessTopology

    from pipellm.pipeline.stages import build_pipeline

    if cfg.model_topo.parts == "auto":
        from pipellm.plan.agree import agreed_auto_parts

        cfg.model_topo.parts = agreed_auto_parts(cfg, hf_config, family, setup.resume)
    topology = cfg.model_topo.process_topology
    on_gpu = torch.cuda.is_available()
    return build_pipeline(family, hf_config, ProcessTopology(axes=topology.axes, dims=topology.dims),
                          cfg.model_topo.parts, use_grad_ckpt=cfg.use_grad_ckpt, use_flash_attn=cfg.use_flash_attn,
                          seed=cfg.seed, compile_layers=on_gpu if cfg.compile_layers is None else cfg.compile_layers,
                          device=f"cuda:{torch.cuda.current_device()}" if on_gpu else "cpu", packed=cfg.packing,
                          loss_chunk_tokens=cfg.loss_chunk_tokens, objective=setup.objective,
                          attention_backend=cfg.attention_backend)
