"""The pipeline engine (``train_ds.py``): this rank's stage of a ``PipelineModule`` under DeepSpeed's pipeline
engine, run by a ``pipellm.pipeline.schedule.PipelineSchedule``.

The stage is built from the family (``pipellm.pipeline.stages.build_pipeline``) with the objective as its loss,
loads only its own layer files (or a checkpoint's, on resume), and its parameters are named by their Hugging
Face checkpoint keys for the optimizer. Its checkpoints are layout-free (``pipellm.training.stage_checkpoint``).
Every instruction of the schedule is timed by the stall watchdog.
"""
from __future__ import annotations

from pathlib import Path

import torch

from pipellm.config import TrainConfig
from pipellm.models.base import ModelFamily
from pipellm.pipeline.deepspeed_compat import is_pipeline_replicated
from pipellm.pipeline.schedule import PipelineSchedule, schedule_named
from pipellm.training.distributed import StallWatchdog, all_reduce
from pipellm.training.engine import Engine, EngineSetup
from pipellm.training.parameter_states import ParameterStates
from pipellm.training.parameters import NOTHING_TO_TRAIN, optional_hook
from pipellm.training.stage_checkpoint import StageCheckpoint, engine_state, restore_engine_state


class PipelineEngine(Engine):
    name = "pipellm"
    resumable = True
    export_hint = "(export: python convert_model.py pp_to_hg --input-path {save_path} --save-path HF_OUT)"

    def __init__(self, cfg: TrainConfig, setup: EngineSetup, *, hf_config, family: ModelFamily,
                 schedule: PipelineSchedule | None = None):
        from pipellm.pipeline.weights import checkpoint_named_parameters, load_pipeline_weights

        self.hf_config = hf_config
        self.schedule = schedule_named(cfg.pipeline_schedule, cfg.use_grad_ckpt,
                                       cfg.layers_compiled(torch.cuda.is_available())) if schedule is None else schedule
        self.model = model = build_stage(cfg, setup, hf_config, family)
        weights_dir = setup.resume.path if setup.resume is not None else (
            None if cfg.from_scratch else cfg.model_path)
        if setup.parameter_set.saves_frozen:
            if weights_dir is not None:
                load_pipeline_weights(model, family, hf_config, weights_dir)
        else:  # the frozen base from model_path, what trains from the checkpoint (if any) once the set added it
            if not cfg.from_scratch:
                load_pipeline_weights(model, family, hf_config, cfg.model_path)
            prepare_layers(model, family, hf_config, setup.parameter_set)
            if setup.resume is not None:
                load_pipeline_weights(model, family, hf_config, setup.resume.path, strict=False)
        ds_config = pipeline_deepspeed_config(cfg)
        super().__init__(cfg, model, checkpoint_named_parameters(model, family, hf_config), ds_config, setup)
        self.checkpoint = StageCheckpoint(model, family, hf_config, self.trainable, ParameterStates.of(self.ds))
        self.replica, self.replicas = model.data_parallel_rank, cfg.data_degree
        self.stage, self.num_stages = model.stage_id, model.num_stages
        self.copy_batches_early = cfg.speed.fewer_host_syncs and torch.cuda.is_available()
        attach = optional_hook(self.schedule, "attach")  # before the watchdog times every instruction
        if attach is not None:
            attach(self.ds)
        self.watchdog = StallWatchdog(self.ds, model.stage_id, cfg.collective_timeout_s, before_exit=setup.on_stall)

    def train_step(self, micro_batches: list) -> float:
        if self.copy_batches_early:
            micro_batches = on_device(micro_batches, self.ds.device)
        return float(self.schedule.train_batch(self.ds, micro_batches))

    def eval_step(self, micro_batches: list) -> float:
        return float(self.schedule.eval_batch(self.ds, micro_batches))

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Each stage counts its own (a tied copy once; not a placeholder), replica 0 only."""
        local = sum(p.numel() for name, p in self.model.named_parameters()
                    if not is_pipeline_replicated(p) and name != NOTHING_TO_TRAIN and
                    (p.requires_grad or not trainable_only))
        return int(all_reduce(torch.tensor([local if self.replica == 0 else 0], dtype=torch.float64))[0])

    def run_layout(self) -> dict:
        # The stage boundaries count DeepSpeed's layers, where the final norm and the head are two.
        topology = self.checkpoint_layout()
        return {"layout": {"axes": topology["axes"], "dims": topology["dims"],
                           "stage_layer_boundaries": topology["stage_boundaries"]},
                "coordinates": {"stage": self.stage, "replica": self.replica}}

    def checkpoint_layout(self) -> dict:
        """Which layers each stage holds, and the process grid (a rank's RNG states belong to its place in it)."""
        return {"stage_boundaries": list(self.model.parts), **self.model.grid_layout}

    def save_states(self, save_dir: Path, tag: str) -> None:
        import deepspeed.comm as dist

        directory = save_dir / tag
        directory.mkdir(parents=True, exist_ok=True)
        self.checkpoint.save(directory, self.parameter_set.saves_frozen)
        dist.barrier()

    def resume_state(self) -> dict:
        """The layout it was saved on (for the log and the RNG states), the LR scheduler, learning rates, skipped
        steps and loss scale (``stage_checkpoint.engine_state``)."""
        return {"layout": self.checkpoint_layout(), **engine_state(self.ds)}

    def load(self, checkpoint: Path, weights_only: bool, state: dict) -> None:
        """The weights were loaded before ``deepspeed.initialize``; here the schedule's position and, unless
        weights only, every trainable parameter's optimizer state and fp32 master weight."""
        restore_engine_state(self.ds, state, state["step"], weights_only)
        if not weights_only:
            self.checkpoint.load_optimizer(checkpoint)


def pipeline_deepspeed_config(cfg: TrainConfig) -> dict:
    """The YAML's DeepSpeed keys with pipellm's defaults for the pipeline engine, each unless the YAML sets it:

    * ``bf16.immediate_grad_update: true`` under bf16: each micro batch's bf16 weight gradient goes into the bf16
      optimizer's accumulation buffer (bf16, or fp32 with ``data_types.grad_accum_dtype: fp32``) as soon as
      autograd has it, and is freed. DeepSpeed's default zeroes every bf16 gradient before each micro batch,
      accumulates into it, and adds it to the buffer after the backward: more memory traffic per micro batch, and
      the bf16 gradients held throughout (2 bytes a parameter). The same sums where a parameter's gradient arrives
      in one backward pass per micro batch (DeepSpeed runs one per stage output that takes a gradient: a mixtral
      stage's two parts now go into the buffer one by one). On one H100 it trains 4.1% faster in 5.0 GiB less
      (``benchmarks/results/stage_levers_h100_grads/``); ``tests/test_speed.py`` trains both ways on 2 stages.
    * DeepSpeed's throughput timer off under ``speed.fewer_host_syncs`` (``without_throughput_timer``)."""
    ds_config, settings = dict(cfg.deepspeed), cfg.deepspeed_settings
    if settings.precision == "bf16":
        ds_config["bf16"] = {**ds_config["bf16"], "immediate_grad_update": settings.immediate_grad_update}
    return without_throughput_timer(ds_config) if cfg.speed.fewer_host_syncs else ds_config


def without_throughput_timer(ds_config: dict) -> dict:
    """``ds_config`` with DeepSpeed's throughput timer off (``speed.fewer_host_syncs``): it synchronises the device
    at the start of every forward pass to time it, and pipellm times its steps itself. A ``timers`` block the
    YAML sets is kept as it is."""
    return {"timers": {"throughput": {"enabled": False}}, **ds_config}


def on_device(batch, device):
    """``batch`` (tensors in tuples, lists and named tuples) with every host tensor copied to ``device`` through
    pinned memory, without waiting (``speed.fewer_host_syncs``). DeepSpeed's loading of each micro batch then
    copies on the device, which does not make the host wait for the GPU as a pageable host copy does."""
    if torch.is_tensor(batch):
        return batch.pin_memory().to(device, non_blocking=True) if batch.device.type == "cpu" else batch
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(on_device(item, device) for item in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(on_device(item, device) for item in batch)
    return batch


def prepare_layers(model, family: ModelFamily, hf_config, parameter_set) -> None:
    """The parameter set's changes to each of this stage's layers (LoRA: adapters into the decoders)."""
    from pipellm.pipeline.partition import PipelineLayers
    from pipellm.pipeline.weights import stage_modules

    prepare = optional_hook(parameter_set, "prepare_layer")
    if prepare is None:
        return
    layers = PipelineLayers.of(family, hf_config)
    for layer_index, module in stage_modules(model):
        file_index = layers.file_index(layer_index)
        prepare(module, layers.kind(file_index)[0], file_index)


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
                          seed=cfg.seed, compile_layers=cfg.layers_compiled(on_gpu),
                          device=f"cuda:{torch.cuda.current_device()}" if on_gpu else "cpu", packed=cfg.packing,
                          loss_chunk_tokens=cfg.loss_chunk_tokens, objective=setup.objective,
                          attention_backend=cfg.attention_backend, speed=cfg.speed)
