"""DeepSpeed's keys in the training YAML: which top-level keys are DeepSpeed's, and the few of them pipellm reads.

The keys are passed to ``deepspeed.initialize`` untouched; ``DeepSpeedSettings`` is the one place that reads the
precision, the ZeRO stage and the offload devices from them, so every module agrees on what a config asks for.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

# DeepSpeed's top-level keys (its config is open-ended; these are the ones a pipeline run may use).
DEEPSPEED_KEYS = frozenset("""
train_batch_size train_micro_batch_size_per_gpu gradient_accumulation_steps optimizer scheduler fp16 bf16 amp
torch_autocast gradient_clipping zero_optimization zero_allow_untested_optimizer zero_force_ds_cpu_optimizer
steps_per_print wall_clock_breakdown memory_breakdown dump_state prescale_gradients gradient_predivide_factor
communication_data_type seq_parallel_communication_data_type sparse_gradients disable_allgather activation_checkpointing
flops_profiler tensorboard wandb csv_monitor comet comms_logger pipeline checkpoint data_types data_efficiency
curriculum_learning compression_training aio elasticity autotuning timers compile nebula weight_quantization
hybrid_engine eigenvalue progressive_layer_drop quantize_training sparse_attention use_node_local_storage
load_universal_checkpoint gradient_allreduce_op disable_python_gc graph_harvesting use_data_before_expert_parallelism
""".split())

LOW_PRECISIONS = ("bf16", "fp16")


@dataclasses.dataclass(frozen=True)
class DeepSpeedSettings:
    """What pipellm reads of the DeepSpeed keys: the precision, the ZeRO stage and where ZeRO keeps the optimizer
    and the weights. The config check (``pipellm.config.checks``) holds each field to its type, naming the key
    of ``KEYS``."""

    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """``fp32``, ``bf16`` (``bf16.enabled``) or ``fp16`` (``fp16.enabled``)."""
    zero_stage: Literal[0, 1, 2, 3] = 0
    """``zero_optimization.stage`` (0: no ZeRO)."""
    offload_optimizer: Literal["none", "cpu", "nvme"] = "none"
    """``zero_optimization.offload_optimizer.device``: ``none``, ``cpu`` or ``nvme``."""
    offload_param: Literal["none", "cpu", "nvme"] = "none"
    """``zero_optimization.offload_param.device`` (ZeRO-3 only)."""
    fp32_grad_accumulation: bool = False
    """``data_types.grad_accum_dtype`` is fp32 (bf16 runs accumulate gradients in bf16 otherwise)."""
    immediate_grad_update: bool = True
    """``bf16.immediate_grad_update``: DeepSpeed's bf16 optimizer adds each micro batch's gradient into its
    accumulation buffer as soon as autograd has it, and frees it. DeepSpeed's default is false; pipellm's pipeline
    engine runs with true unless the YAML says otherwise (``pipellm.training.pipeline_engine``)."""

    KEYS = {"zero_stage": "zero_optimization.stage", "offload_optimizer": "zero_optimization.offload_optimizer.device",
            "offload_param": "zero_optimization.offload_param.device",
            "immediate_grad_update": "bf16.immediate_grad_update"}

    @staticmethod
    def enabled_precisions(ds_config: dict) -> list[str]:
        """The low precisions whose ``enabled`` is set (the config check allows one at most)."""
        return [key for key in LOW_PRECISIONS if isinstance(ds_config.get(key), dict) and ds_config[key].get("enabled")]

    @classmethod
    def of(cls, ds_config: dict) -> "DeepSpeedSettings":
        def device(key: str) -> str:
            return (zero.get(key) or {}).get("device", "none")

        zero = ds_config.get("zero_optimization") or {}
        accumulation = str((ds_config.get("data_types") or {}).get("grad_accum_dtype", "")).lower()
        return cls(precision=(cls.enabled_precisions(ds_config) or ["fp32"])[0], zero_stage=zero.get("stage", 0),
                   offload_optimizer=device("offload_optimizer"), offload_param=device("offload_param"),
                   fp32_grad_accumulation=accumulation in ("fp32", "float32", "float"),
                   immediate_grad_update=(ds_config.get("bf16") or {}).get("immediate_grad_update", True))

    @property
    def dtype(self):
        """The torch dtype of the weights the model computes with."""
        import torch

        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]

    @property
    def low_precision(self) -> bool:
        return self.precision != "fp32"
