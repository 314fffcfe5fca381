"""The training YAML: pipellm's keys as typed dataclasses (``schema``), DeepSpeed's passed through
(``deepspeed_keys``), read by ``load`` and checked in one pass by ``checks``, before any process group exists.

Batch sizes follow DeepSpeed: ``train_batch_size = train_micro_batch_size_per_gpu * gradient_accumulation_steps
* D`` where D is the data-parallel degree; give any two, the third is derived.
"""
from pipellm.config.checks import validate_environment
from pipellm.config.deepspeed_keys import DEEPSPEED_KEYS, DeepSpeedSettings
from pipellm.config.load import dump_resolved, load_config, parse_launcher_args
from pipellm.config.schema import (NO_WEIGHT_DECAY, EarlyStopping, LRSchedule, ModelTopo, ProcessTopology,
                                   TrainConfig)

__all__ = ["DEEPSPEED_KEYS", "DeepSpeedSettings", "EarlyStopping", "LRSchedule", "ModelTopo", "NO_WEIGHT_DECAY",
           "ProcessTopology", "TrainConfig", "dump_resolved", "load_config", "parse_launcher_args",
           "validate_environment"]
