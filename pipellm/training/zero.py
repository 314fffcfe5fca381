"""``deepspeed train_ds_zero.py --config X.yml``: the DeepSpeed ZeRO-3 baseline that pipellm is measured against.

The same YAML format, data layer (``pipellm.data.batches``: mixing, packing, eval split, global batch order),
objective and training loop (``pipellm.training.trainer``: cadence, evals, checkpoints, SIGTERM, non-finite
steps) as ``train_ds.py``, so the two runs compute the same objective (by default cross entropy averaged over
every labelled token of the global batch) and differ only in how the model is spread over the GPUs
(``pipellm.training.zero_engine``):

* ``model_path`` is a **Hugging Face model directory** here (not a ``convert_model.py hg_to_pp`` output): the
  transformers class of its ``config.json`` is built under ``deepspeed.zero.Init`` (transformers' ZeRO-3 hooks,
  see ``pipellm.training.zero_engine.ZeroInitConfig``), so each parameter is partitioned as it is created and no
  process materialises the whole model; transformers' ZeRO-3 loader fills the partitions module by module from
  the safetensors files, which rank 0 memory-maps. ``from_scratch: true`` initialises from ``config.json``
  instead (transformers' initialisation, seeded by ``seed``).
* Every ``model_type`` transformers has a causal-LM class for works; models that need remote code do not
  (pipellm never sets ``trust_remote_code``). The loss is the language-model loss only: a mixture-of-experts
  model's router load-balancing term, which the pipeline's mixtral adds, is not.
* ``objective: reward`` takes a ``*ForSequenceClassification`` directory (``pp_to_hg`` of a reward model) and
  trains transformers' classifier on the pipeline's reward objective (``pipellm.training.zero_engine``).
* ZeRO-3 is data parallel only: ``model_topo.process_topology.dims`` is ``[1, N]`` on N GPUs, which also makes
  the YAML's batch sizes mean what they mean for the pipeline (train = micro x accumulation x N). The pipeline's
  own YAML works too: its pipeline keys (``dims`` with more than one stage, ``parts``) are ignored with a note,
  and the run is data parallel over the launcher's processes with the file's global batch.
* ``zero_optimization`` defaults to ``{stage: 3}``; its keys, ZeRO++ ones included
  (``zero_quantized_weights``, ``zero_hpz_partition_size``, ``zero_quantized_gradients``), pass through.
* The optimizer is pipellm's (``pipellm.training.optim``: torch's fused AdamW, or Lion), stepped by ZeRO on each
  rank's flat fp32 partition: the same update rule as the pipeline and no JIT-compiled DeepSpeed op at start-up.
* ``use_grad_ckpt`` and ``use_flash_attn`` map to transformers' gradient checkpointing and attention
  implementation; ``compile_layers`` is not supported. Packed rows need no mask: transformers turns position
  ids that restart at 0 into a block-diagonal causal mask, so attention stays within each sample.

Checkpoints are DeepSpeed's ZeRO format (``save_path/global_step<N>/`` plus the model's config and tokenizer);
``python save_path/zero_to_fp32.py save_path OUT_DIR`` (written there by DeepSpeed) gathers the weights. They do
not resume a run: ``resume`` and ``early_stopping`` are refused.
"""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

from pipellm.config import ModelTopo, TrainConfig, load_config, parse_launcher_args, validate_environment
from pipellm.config.checks import complete_batch_sizes
from pipellm.config.schema import Speed
from pipellm.config.load import read_yaml
from pipellm.errors import PipellmError
from pipellm.models.base import is_reward_config
from pipellm.pipeline.reward import check_reward_model
from pipellm.training import trainer
from pipellm.training.distributed import rendezvous_without_launcher

DESCRIPTION = ("Train a Hugging Face model with DeepSpeed ZeRO-3 (the baseline). Run it under the deepspeed "
               "launcher, which starts one process per GPU, e.g. "
               "`deepspeed --num_gpus 2 train_ds_zero.py --config configs/ds_config_zero.yml`.")

HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
BATCH_SIZE_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def read_hf_config(model_path: str):
    """The transformers config of ``model_path``, checked to have a causal-LM class in transformers."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        hf_config = AutoConfig.from_pretrained(model_path, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise PipellmError(f"`model_path` {model_path}: cannot read config.json with transformers "
                           f"({str(e).splitlines()[0]}); train_ds_zero.py runs only model types transformers "
                           f"has a class for (no remote code)") from None
    if hf_config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise PipellmError(f"`model_path` {model_path}: model_type {hf_config.model_type!r} has no causal-LM "
                           f"class in transformers; train_ds_zero.py does not run remote code")
    return hf_config


def ignore_pipeline_keys(cfg: TrainConfig, world_size: int) -> None:
    """A pipeline YAML (more than one stage, ``parts`` or a pipeline schedule given) runs data parallel over the
    launcher's ``world_size`` processes: ``dims`` becomes ``[1, world_size]``, ``parts`` is dropped and the batch
    sizes are completed again from the ones the file gives (the global batch stays the file's), with a note."""
    topology = cfg.model_topo.process_topology
    default_parts = ModelTopo().parts
    pipeline_keys = [(cfg.pipe_degree > 1 or cfg.model_topo.parts != default_parts,
                      f"`model_topo.process_topology.dims` {topology.dims}"),
                     (cfg.model_topo.parts != default_parts, f"`model_topo.parts` {cfg.model_topo.parts}"),
                     (cfg.pipeline_schedule != "1f1b", f"`pipeline_schedule: {cfg.pipeline_schedule}`")]
    ignored = [key for given, key in pipeline_keys if given]
    if not ignored:
        return
    topology.dims = [world_size if axis == "data" else 1 for axis in topology.axes]
    cfg.model_topo.parts = default_parts
    given = read_yaml(Path(cfg.source))
    for name in BATCH_SIZE_KEYS:
        if name not in given:
            cfg.deepspeed.pop(name, None)
    complete_batch_sizes(cfg, cfg.source)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"pipellm zero3: note: ignored the pipeline keys {' and '.join(ignored)} of {cfg.source}; ZeRO-3 "
              f"runs data parallel over the {world_size} process(es) started (dims {topology.dims})",
              file=sys.stderr)


def prepare(argv=None) -> tuple[TrainConfig, trainer.EngineFactory]:
    """Everything that can fail on bad input, done before any process group work; the engine to build."""
    args = parse_launcher_args(DESCRIPTION, argv)
    cfg = load_config(args.config)
    model_path = Path(cfg.model_path)
    if not (model_path / "config.json").is_file():
        raise PipellmError(f"`model_path` {model_path} has no config.json; train_ds_zero.py takes a Hugging Face "
                           f"model directory")
    if not cfg.from_scratch and not any((model_path / name).is_file() for name in HF_WEIGHT_FILES):
        hint = (" (it holds pipeline layer files: export them with `python convert_model.py pp_to_hg`)"
                if any(model_path.glob("layer_*-model_states.pt")) else "")
        raise PipellmError(f"`model_path` {model_path} has no Hugging Face safetensors weights{hint}; point it at "
                           f"a Hugging Face model directory or set `from_scratch: true`")
    ignore_pipeline_keys(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    if cfg.resume is not None or cfg.early_stopping.patience:
        raise PipellmError("`resume` and `early_stopping` are pipeline training's (train_ds.py); train_ds_zero.py "
                           "does not resume or stop early: remove them")
    for key in ("compile_layers", "loss_chunk_tokens"):
        if getattr(cfg, key):
            raise PipellmError(f"`{key}` is not supported by train_ds_zero.py; remove it or set it to null")
    if cfg.speed != Speed():
        raise PipellmError("`speed` is pipeline training's (train_ds.py); remove it for train_ds_zero.py")
    stage = cfg.deepspeed.setdefault("zero_optimization", {}).setdefault("stage", 3)
    if stage != 3:
        raise PipellmError(f"`zero_optimization.stage` is {stage}; train_ds_zero.py is the ZeRO-3 baseline: "
                           f"set it to 3 or remove it")
    rendezvous_without_launcher(cfg, "train_ds_zero.py")
    validate_environment(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    hf_config = read_hf_config(cfg.model_path)
    check_reward_model(cfg.objective, is_reward_config(hf_config.to_dict()), model_path, cfg.source)
    if cfg.lora is not None:
        from pipellm.models import get_family
        from pipellm.training.lora import check_lora_model

        check_lora_model(cfg.lora, cfg.quantize_base, get_family(hf_config.model_type), hf_config, cfg.source)
    from pipellm.training.zero_engine import ZeroEngine  # imports deepspeed: after the checks

    return cfg, functools.partial(ZeroEngine, hf_config=hf_config)


def main(argv=None) -> None:
    trainer.main(prepare, argv)
