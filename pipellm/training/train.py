"""``deepspeed train_ds.py --config X.yml``: pipeline-parallel training. What is checked before any process group
(``prepare``); the loop is ``pipellm.training.trainer``, the engine ``pipellm.training.pipeline_engine``.

A checkpoint ``save_path/global_step<N>/`` holds the per-layer weight files (``layer_XX-model_states.pt``, the
same format as ``convert_model.py hg_to_pp`` writes), the per-layer optimizer state by checkpoint name
(``layer_XX-optim_states.pt``: any layout resumes it, ``pipellm.training.stage_checkpoint``), and the model's
config and tokenizer, so
``convert_model.py pp_to_hg --input-path save_path`` exports it directly (it follows ``latest``).
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

from pipellm.config import TrainConfig, load_config, parse_launcher_args, validate_environment
from pipellm.errors import PipellmError
from pipellm.models import load_model_config
from pipellm.pipeline.layer_files import layer_file_name, resolve_checkpoint_dir
from pipellm.pipeline.partition import PipelineLayers
from pipellm.pipeline.reward import check_reward_model
from pipellm.training import trainer
from pipellm.training.distributed import rendezvous_without_launcher
from pipellm.training.lora import check_lora_model

DESCRIPTION = ("Train a model with DeepSpeed pipeline parallelism. Run it under the deepspeed launcher, which "
               "starts one process per GPU (stages x replicas = the config's model_topo dims), e.g. "
               "`deepspeed --num_gpus 2 train_ds.py --config configs/ds_config_pp.yml`; on several nodes "
               "`deepspeed --hostfile HOSTFILE train_ds.py --config X.yml`.")


def check_layer_files(cfg: TrainConfig, layers: PipelineLayers) -> None:
    if cfg.from_scratch:
        return
    for index in range(layers.num_files):
        path = Path(cfg.model_path) / layer_file_name(index)
        if not path.is_file():
            raise PipellmError(f"`model_path` {cfg.model_path} lacks {path.name}; convert the Hugging Face model "
                               f"with `convert_model.py hg_to_pp` or set `from_scratch: true`")


def prepare(argv=None) -> tuple[TrainConfig, trainer.EngineFactory]:
    """Everything that can fail on bad input, done before any process group work; the engine to build."""
    from pipellm.models.flex_attention import check_attention_backend
    from pipellm.models.kernels import check_liger_environment
    from pipellm.training.optim import check_pipeline_settings

    args = parse_launcher_args(DESCRIPTION, argv)
    cfg = load_config(args.config)
    if not cfg.from_scratch and Path(cfg.model_path).is_dir():
        # A training save directory works as a starting point too: start from its newest checkpoint.
        cfg.model_path = str(resolve_checkpoint_dir(cfg.model_path))
    rendezvous_without_launcher(cfg, "train_ds.py")
    validate_environment(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    hf_config, family = load_model_config(cfg.model_path)
    check_reward_model(cfg.objective, family.scores, cfg.model_path, cfg.source)
    layers = PipelineLayers.of(family, hf_config)
    layers.check_parts(cfg.model_topo.parts, cfg.pipe_degree, cfg.source)
    check_pipeline_settings(cfg.deepspeed)
    check_attention_backend(cfg)
    check_liger_environment(cfg)
    check_layer_files(cfg, layers)
    check_lora_model(cfg.lora, cfg.quantize_base, family, hf_config, cfg.source)
    from pipellm.training.pipeline_engine import PipelineEngine  # imports deepspeed: after the checks

    return cfg, functools.partial(PipelineEngine, hf_config=hf_config, family=family)


def main(argv=None) -> None:
    trainer.main(prepare, argv)
