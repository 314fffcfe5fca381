"""The training YAML: pipellm's own keys as typed dataclasses, DeepSpeed's keys passed through.

One file holds both. A top-level key that is a field of ``TrainConfig`` is ours; a key DeepSpeed knows goes to
``deepspeed.initialize`` untouched; anything else is an error that names the closest known key. Everything is
validated here, before any process group exists, so a bad file costs one line and exit code 2, not a hang.

Batch sizes follow DeepSpeed: ``train_batch_size = train_micro_batch_size_per_gpu * gradient_accumulation_steps
* D`` where D is the data-parallel degree; give any two, the third is derived.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import re
import types
import typing
from pathlib import Path

import yaml

from pipellm.errors import PipellmError

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

PRECISIONS = ("fp32", "bf16", "fp16")
OFFLOAD_DEVICES = ("none", "cpu", "nvme")


@dataclasses.dataclass(frozen=True)
class DeepSpeedSettings:
    """What pipellm reads of the DeepSpeed keys: the precision, the ZeRO stage and where ZeRO keeps the optimizer
    and the weights. Read here only (``of``), so every module agrees on what a config asks for."""

    precision: str = "fp32"
    """``fp32``, ``bf16`` (``bf16.enabled``) or ``fp16`` (``fp16.enabled``)."""
    zero_stage: int = 0
    """``zero_optimization.stage`` (0: no ZeRO)."""
    offload_optimizer: str = "none"
    """``zero_optimization.offload_optimizer.device``: ``none``, ``cpu`` or ``nvme``."""
    offload_param: str = "none"
    """``zero_optimization.offload_param.device`` (ZeRO-3 only)."""
    fp32_grad_accumulation: bool = False
    """``data_types.grad_accum_dtype`` is fp32 (bf16 runs accumulate gradients in bf16 otherwise)."""

    @classmethod
    def of(cls, ds_config: dict) -> "DeepSpeedSettings":
        def enabled(key: str) -> bool:
            return bool((ds_config.get(key) or {}).get("enabled"))

        def device(key: str) -> str:
            return str((zero.get(key) or {}).get("device", "none")).lower()

        zero = ds_config.get("zero_optimization") or {}
        accumulation = str((ds_config.get("data_types") or {}).get("grad_accum_dtype", "")).lower()
        return cls(precision="bf16" if enabled("bf16") else "fp16" if enabled("fp16") else "fp32",
                   zero_stage=int(zero.get("stage", 0)), offload_optimizer=device("offload_optimizer"),
                   offload_param=device("offload_param"),
                   fp32_grad_accumulation=accumulation in ("fp32", "float32", "float"))

    @property
    def dtype(self):
        """The torch dtype of the weights the model computes with."""
        import torch

        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]

    @property
    def low_precision(self) -> bool:
        return self.precision != "fp32"


# Spellings of the original project that keep working.
ALIASES = {"n_epoches": "n_epochs"}


@dataclasses.dataclass
class ProcessTopology:
    """How the world's processes are arranged: ``dims[i]`` processes along ``axes[i]``."""

    axes: list[str] = dataclasses.field(default_factory=lambda: ["pipe", "data"])
    """Axis names, outermost first: ``[pipe, data]`` (neighbouring ranks are data-parallel replicas of one
    stage) or ``[data, pipe]`` (neighbouring ranks are consecutive stages of one replica)."""
    dims: list[int] = dataclasses.field(default_factory=lambda: [1, 1])
    """Processes along each axis: ``[P, D]`` for ``axes: [pipe, data]``. ``P * D`` must equal the world size."""

    def degree(self, axis: str) -> int:
        return self.dims[self.axes.index(axis)]


@dataclasses.dataclass
class ModelTopo:
    """Pipeline layout of the model."""

    process_topology: ProcessTopology = dataclasses.field(default_factory=ProcessTopology)
    """The process grid; see ``ProcessTopology``."""
    parts: list[int] | str = "uniform"
    """Pipeline layers per stage, the embedding and the head (final norm + output projection) counted as one
    layer each, so ``sum(parts) == num_hidden_layers + 2`` (llama-7b on 8 stages: ``[5, 4, 4, 4, 4, 4, 4, 5]``).
    Or ``uniform`` (equal layer counts), ``parameters`` (equal parameter counts) or ``auto`` (rank 0 times the
    embedding, one decoder layer and the head on its device and picks the split that minimises the slowest
    stage within device memory; ``pipellm.plan``)."""


@dataclasses.dataclass
class EarlyStopping:
    """Stop when the eval loss stops improving (needs eval data and ``eval_steps``)."""

    patience: int = 0
    """Stop (after saving a checkpoint) once this many evals in a row have not improved the best eval loss by
    ``min_delta``; 0: never stop early."""
    min_delta: float = 0.0
    """An eval improves when its loss is below the best so far minus this."""


# Biases and the weights of norm layers (any module name containing `norm`, and GPT-2/bloom-style `ln_*`), by
# Hugging Face checkpoint name: `model.layers.3.input_layernorm.weight`, `model.norm.weight`, `transformer.ln_f.weight`.
NO_WEIGHT_DECAY = (r"(^|\.)bias$", r"norm[^.]*\.weight$", r"(^|\.)ln_[^.]*\.weight$")
LR_DECAYS = ("constant", "linear", "cosine")


@dataclasses.dataclass
class LRSchedule:
    """pipellm's learning-rate schedule around the peak ``optimizer.params.lr``: linear warmup, then decay to
    ``min_lr_ratio`` of the peak, reached at the run's last step (the run's steps: ``n_epochs`` or ``max_steps``)."""

    warmup_steps: int = 0
    """Steps of linear warmup: the s-th step (1-based) of the warmup trains at lr * s / warmup_steps."""
    decay: str = "constant"
    """After the warmup: ``constant``, ``linear`` or ``cosine`` (down to lr * min_lr_ratio at the last step)."""
    min_lr_ratio: float = 0.0
    """The last step's learning rate as a share of the peak (``linear`` and ``cosine`` decay)."""


@dataclasses.dataclass
class TrainConfig:
    """pipellm's keys of the training YAML. DeepSpeed's keys are kept apart in ``deepspeed``."""

    model_path: str
    """Pipeline checkpoint to start from (``convert_model.py hg_to_pp`` output, or a training save directory):
    layer files, ``config.json`` and tokenizer files. With ``from_scratch`` only the config and tokenizer.
    For ``train_ds_zero.py`` (the ZeRO-3 baseline): a Hugging Face model directory instead."""
    save_path: str
    """Directory for checkpoints (``global_step<N>/``, ``latest``) and ``metrics.jsonl``."""
    data_path: str | list[str]
    """JSON list or JSONL file(s) of training records, of the five formats (README, ``pipellm/data/records.py``)."""
    data_weights: list[float] | None = None
    """Mixing weight of each ``data_path`` file: per epoch, ``floor(w)`` copies of each sample of the file plus
    a fresh random ``frac(w)`` share of them (2: every sample twice; 0.3: a different 30% each epoch)."""
    eval_data_path: str | list[str] | None = None
    """File(s) of held-out records: the eval loss (mean over their labelled tokens) is logged."""
    eval_ratio: float = 0.0
    """Instead of ``eval_data_path``: hold out this share of each data file (seeded by ``seed``)."""
    eval_steps: int = 0
    """Evaluate every this many steps (and always at the end when there is eval data); 0: only at the end."""
    max_seq_len: int = 512
    """Tokens per row; longer samples are truncated or dropped (``overlong``), shorter rows right-padded."""
    template: str = "auto"
    """Prompt template: ``auto`` (the tokenizer's chat template if it has one, else the built-in templates),
    ``builtin`` or ``chat``; with ChatGLM3's tokenizer ``auto`` and ``chat`` mean ChatGLM3's own format
    (``[gMASK]sop``, role tokens). The generation demo prompts with the same one."""
    packing: bool = False
    """Pack several samples into each ``max_seq_len`` row; attention never crosses samples and positions restart
    per sample (per-token losses equal those of each sample alone). Otherwise one sample per padded row."""
    overlong: str = "truncate"
    """Samples longer than ``max_seq_len``: ``truncate`` (keep the beginning: the whole prompt and the start of
    the answer) or ``drop``. Both are counted in the log."""
    skip_bad_records: bool = False
    """Skip (and count by reason) malformed records instead of stopping with an error naming the file and line."""
    data_cache_dir: str | None = None
    """Where tokenized data is cached (shared by the ranks of a node). Default: ``$PIPELLM_CACHE/data`` or
    ``~/.cache/pipellm/data``."""
    tokenize_workers: int | None = None
    """Processes that tokenize a large data file (default: the usable CPU cores, at most 8)."""
    n_epochs: int = 1
    """Passes over the data (the original spelling ``n_epoches`` is accepted)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps, even within an epoch."""
    seed: int = 42
    """Seed for weight initialisation (with ``from_scratch``) and data shuffling."""
    from_scratch: bool = False
    """Initialise weights randomly from ``config.json`` instead of loading layer files."""
    model_topo: ModelTopo = dataclasses.field(default_factory=ModelTopo)
    """Process grid and stage partition."""
    use_grad_ckpt: bool = False
    """Recompute each decoder layer's activations in the backward pass (less memory, about 1/3 more compute)."""
    use_flash_attn: bool = False
    """Use the fastest exact attention kernel available (flash-attn package, else torch's fused SDPA kernels)."""
    compile_layers: bool | None = None
    """``torch.compile`` each decoder layer: fuses the norms, rotary and SwiGLU (llama-7b on 2 H200s: 41% -> 50%
    MFU, less memory); the first step pays the compile. Default (null): on for GPUs, off on CPU."""
    loss_chunk_tokens: int | None = None
    """Compute the output projection and the loss this many tokens at a time (e.g. 4096), so the last stage
    never holds a whole micro batch's logits (tokens x vocab x 12 bytes with bf16 weights: 12.6 GB for llama-7B
    at 32k tokens); the backward recomputes each chunk's logits (one more forward matmul of the head). For long
    sequences. Default (null): the whole micro batch at once. Pipeline training only."""
    save_steps: int = 0
    """Save a checkpoint every this many steps (0: only at the end)."""
    save_final: bool = True
    """Save a checkpoint when training ends (benchmarks turn this off)."""
    keep_last_n: int | None = None
    """Keep only the newest this many checkpoints in ``save_path`` (older ones are deleted once ``latest`` names
    a newer one; the one named by ``best`` is never deleted). Default (null): keep all."""
    resume: str | None = None
    """Continue an interrupted run: ``auto`` (the checkpoint ``save_path/latest`` names; none: start at step 0)
    or a save directory or checkpoint directory. Restores weights, optimizer, LR scheduler, data position, RNG
    states, early-stopping state, and cuts ``metrics.jsonl`` back to the checkpoint's step."""
    resume_weights_only: bool = False
    """With ``resume``: load only the weights (into this run's ``parts``/``dims``, which may differ from the
    checkpoint's) and continue at the checkpoint's step with a fresh optimizer state."""
    early_stopping: EarlyStopping = dataclasses.field(default_factory=EarlyStopping)
    """Stop when the eval loss stops improving; see ``EarlyStopping``."""
    log_steps: int = 1
    """Write a log line and a ``metrics.jsonl`` record every this many steps."""
    collective_timeout_s: float = 1800.0
    """Seconds a collective or stage-to-stage transfer may wait for another rank before the run stops with an
    error naming the stage (a rank that died or hung otherwise stalls everyone silently)."""
    peak_flops_per_gpu: float | None = None
    """Peak dense bf16/fp16 FLOP/s of one device, for MFU. Default: looked up from the device name (H100/H200:
    989e12, A100: 312e12); MFU is not reported when unknown (e.g. on CPU)."""
    use_tensorboard: bool = True
    """Also write every ``metrics.jsonl`` figure to TensorBoard event files in ``save_path/tensorboard/``."""
    wandb_project: str | None = None
    """Also log every ``metrics.jsonl`` figure to this Weights & Biases project (needs ``pip install wandb``;
    entity, API key and mode come from wandb's own settings, e.g. ``WANDB_ENTITY``, ``WANDB_MODE=offline``)."""
    wandb_run_name: str | None = None
    """Name of the W&B run (default: one W&B makes up)."""
    gpu_profile_interval_s: float = 5.0
    """Sample every GPU's utilisation and memory this often (NVML, ``pip install 'pipellm[nvml]'``) into
    ``save_path/gpu_profile.csv`` and ``.png``; 0 turns it off. Nothing is sampled without NVML or GPUs."""
    no_weight_decay: list[str] = dataclasses.field(default_factory=lambda: list(NO_WEIGHT_DECAY))
    """Regular expressions (Python ``re.search``) on parameter names as in the Hugging Face checkpoint
    (``model.layers.3.input_layernorm.weight``, also in ``train_ds_zero.py``): a parameter matching any of them
    gets no weight decay. Default: biases and norm weights of every supported family (``pipellm.config``)."""
    lr_schedule: LRSchedule = dataclasses.field(default_factory=LRSchedule)
    """Warmup and decay of the learning rate; see ``LRSchedule``. Not together with DeepSpeed's ``scheduler``."""
    max_nonfinite_steps: int = 3
    """After this many optimizer steps in a row skipped for a non-finite loss or gradients, save a checkpoint
    and stop with an error (a skipped step changes nothing: weights, optimizer state and schedule stay)."""
    deepspeed: dict = dataclasses.field(default_factory=dict)
    """The DeepSpeed keys of the file, passed to ``deepspeed.initialize`` (batch sizes completed)."""

    @property
    def pipe_degree(self) -> int:
        return self.model_topo.process_topology.degree("pipe")

    @property
    def data_degree(self) -> int:
        return self.model_topo.process_topology.degree("data")

    @property
    def data_paths(self) -> list[str]:
        return [self.data_path] if isinstance(self.data_path, str) else list(self.data_path)

    @property
    def eval_data_paths(self) -> list[str]:
        if self.eval_data_path is None:
            return []
        return [self.eval_data_path] if isinstance(self.eval_data_path, str) else list(self.eval_data_path)

    @property
    def micro_batch_size(self) -> int:
        return self.deepspeed["train_micro_batch_size_per_gpu"]

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.deepspeed["gradient_accumulation_steps"]

    @property
    def global_batch_size(self) -> int:
        return self.deepspeed["train_batch_size"]

    @property
    def deepspeed_settings(self) -> DeepSpeedSettings:
        return DeepSpeedSettings.of(self.deepspeed)


def _type_ok(value, annotation) -> bool:
    """isinstance against the simple annotations used in this module (scalars, unions, list[...])."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(annotation))
    if origin is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(annotation))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(annotation)[0])}"
    return "null" if annotation is type(None) else annotation.__name__


def _build(cls, raw, where: str, source: str):
    """Instantiate dataclass ``cls`` from mapping ``raw``, checking names and types; ``where`` is the key path."""
    if not isinstance(raw, dict):
        raise PipellmError(f"{source}: `{where}` must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        name = ALIASES.get(key, key)
        path = f"{where}.{key}" if where else key
        if name not in fields:
            raise PipellmError(f"{source}: unknown key `{path}`{_suggest(key, fields)}")
        if dataclasses.is_dataclass(hints[name]):
            value = _build(hints[name], value, path, source)
        elif not _type_ok(value, hints[name]):
            raise PipellmError(f"{source}: `{path}` must be {_type_name(hints[name])}, got {value!r}")
        values[name] = value
    missing = [n for n, f in fields.items() if n not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise PipellmError(f"{source}: missing required key `{where + '.' if where else ''}{missing[0]}`")
    return cls(**values)


def _suggest(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f"; did you mean `{close[0]}`?" if close else ""


def parse_launcher_args(description: str, argv=None):
    """``--config PATH`` (and the ``--local_rank`` the deepspeed launcher appends) of the training scripts."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="training YAML (pipellm and DeepSpeed keys)")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    return parser.parse_args(argv)


def load_config(path: str | Path) -> TrainConfig:
    """Read and check the YAML file's own content (no file system or world-size checks; see ``validate``)."""
    path = Path(path)
    if not path.is_file():
        raise PipellmError(f"config file {path} does not exist; pass --config PATH to a YAML file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise PipellmError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise PipellmError(f"{path}: the top level must be a mapping of keys to values")
    ours_names = {f.name for f in dataclasses.fields(TrainConfig)} | set(ALIASES)
    ours, ds_keys = {}, {}
    for key, value in raw.items():
        if key in ours_names and key != "deepspeed":
            ours[key] = value
        elif key in DEEPSPEED_KEYS:
            ds_keys[key] = value
        else:
            raise PipellmError(f"{path}: unknown key `{key}`{_suggest(key, (ours_names | DEEPSPEED_KEYS) - {'deepspeed'})}")
    if "n_epochs" in ours and "n_epoches" in ours:
        raise PipellmError(f"{path}: give `n_epochs` or its old spelling `n_epoches`, not both")
    if "lr_schedule" in ours and "scheduler" in ds_keys:
        raise PipellmError(f"{path}: give pipellm's `lr_schedule` or DeepSpeed's `scheduler`, not both")
    cfg = _build(TrainConfig, ours, "", str(path))
    cfg.deepspeed = ds_keys
    _check_values(cfg, str(path))
    return cfg


def _check_values(cfg: TrainConfig, source: str) -> None:
    topo = cfg.model_topo.process_topology
    if sorted(topo.axes) != ["data", "pipe"]:
        raise PipellmError(f"{source}: `model_topo.process_topology.axes` must be [pipe, data] or [data, pipe], "
                           f"got {topo.axes}")
    if len(topo.dims) != 2 or min(topo.dims) < 1:
        raise PipellmError(f"{source}: `model_topo.process_topology.dims` must be two positive integers [P, D], "
                           f"got {topo.dims}")
    parts = cfg.model_topo.parts
    if isinstance(parts, str) and parts not in ("uniform", "parameters", "auto"):
        raise PipellmError(f"{source}: `model_topo.parts` must be a list of layer counts, `uniform`, "
                           f"`parameters` or `auto`, got {parts!r}")
    if isinstance(parts, list):
        if len(parts) != cfg.pipe_degree:
            raise PipellmError(f"{source}: `model_topo.parts` has {len(parts)} entries but the pipeline has "
                               f"{cfg.pipe_degree} stages (`dims`); give one layer count per stage")
        if min(parts) < 1:
            raise PipellmError(f"{source}: `model_topo.parts` entries must be >= 1, got {parts}")
    for key in ("max_seq_len", "n_epochs", "log_steps"):
        if getattr(cfg, key) < 1:
            raise PipellmError(f"{source}: `{key}` must be >= 1, got {getattr(cfg, key)}")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise PipellmError(f"{source}: `max_steps` must be >= 1 (or absent), got {cfg.max_steps}")
    if cfg.save_steps < 0:
        raise PipellmError(f"{source}: `save_steps` must be >= 0, got {cfg.save_steps}")
    if cfg.loss_chunk_tokens is not None and cfg.loss_chunk_tokens < 1:
        raise PipellmError(f"{source}: `loss_chunk_tokens` must be >= 1 (or null: no chunking), got "
                           f"{cfg.loss_chunk_tokens}")
    _check_checkpoint_keys(cfg, source)
    if cfg.gpu_profile_interval_s < 0:
        raise PipellmError(f"{source}: `gpu_profile_interval_s` must be >= 0 (0: off), got "
                           f"{cfg.gpu_profile_interval_s}")
    _check_data_keys(cfg, source)
    _check_optimization_keys(cfg, source)
    _complete_batch_sizes(cfg.deepspeed, cfg.data_degree, source)


def _check_data_keys(cfg: TrainConfig, source: str) -> None:
    if cfg.max_seq_len < 2:
        raise PipellmError(f"{source}: `max_seq_len` must be >= 2, got {cfg.max_seq_len}")
    if not cfg.data_paths:
        raise PipellmError(f"{source}: `data_path` is an empty list; give at least one data file")
    choices = {"template": ("auto", "builtin", "chat"), "overlong": ("truncate", "drop")}
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise PipellmError(f"{source}: `{key}` must be one of {', '.join(allowed)}, got {getattr(cfg, key)!r}")
    if cfg.data_weights is not None:
        if len(cfg.data_weights) != len(cfg.data_paths):
            raise PipellmError(f"{source}: `data_weights` has {len(cfg.data_weights)} entries but `data_path` has "
                               f"{len(cfg.data_paths)} files; give one weight per file")
        if any(w <= 0 for w in cfg.data_weights):
            raise PipellmError(f"{source}: `data_weights` must be > 0, got {cfg.data_weights}")
    if not 0 <= cfg.eval_ratio < 1:
        raise PipellmError(f"{source}: `eval_ratio` must be in [0, 1), got {cfg.eval_ratio}")
    if cfg.eval_ratio and cfg.eval_data_path is not None:
        raise PipellmError(f"{source}: give `eval_data_path` or `eval_ratio`, not both")
    if cfg.eval_steps < 0:
        raise PipellmError(f"{source}: `eval_steps` must be >= 0, got {cfg.eval_steps}")
    if cfg.tokenize_workers is not None and cfg.tokenize_workers < 1:
        raise PipellmError(f"{source}: `tokenize_workers` must be >= 1, got {cfg.tokenize_workers}")


def _check_checkpoint_keys(cfg: TrainConfig, source: str) -> None:
    if cfg.keep_last_n is not None and cfg.keep_last_n < 1:
        raise PipellmError(f"{source}: `keep_last_n` must be >= 1 (or absent: keep all), got {cfg.keep_last_n}")
    if cfg.resume is not None and not cfg.resume.strip():
        raise PipellmError(f"{source}: `resume` is empty; give `auto` or a checkpoint directory, or leave it out")
    if cfg.resume_weights_only and cfg.resume is None:
        raise PipellmError(f"{source}: `resume_weights_only: true` needs `resume` (`auto` or a checkpoint "
                           f"directory)")
    stopping = cfg.early_stopping
    if stopping.patience < 0:
        raise PipellmError(f"{source}: `early_stopping.patience` must be >= 0 (0: off), got {stopping.patience}")
    if stopping.min_delta < 0:
        raise PipellmError(f"{source}: `early_stopping.min_delta` must be >= 0, got {stopping.min_delta}")
    if stopping.patience and not (cfg.eval_steps and (cfg.eval_ratio or cfg.eval_data_path is not None)):
        raise PipellmError(f"{source}: `early_stopping.patience` needs evals during training: set `eval_steps` "
                           f"and eval data (`eval_ratio` or `eval_data_path`)")


def _check_optimization_keys(cfg: TrainConfig, source: str) -> None:
    for pattern in cfg.no_weight_decay:
        try:
            re.compile(pattern)
        except re.error as e:
            raise PipellmError(f"{source}: `no_weight_decay` entry {pattern!r} is not a valid regular expression "
                               f"({e}); fix or remove it") from None
    schedule = cfg.lr_schedule
    if schedule.warmup_steps < 0:
        raise PipellmError(f"{source}: `lr_schedule.warmup_steps` must be >= 0, got {schedule.warmup_steps}")
    if schedule.decay not in LR_DECAYS:
        raise PipellmError(f"{source}: `lr_schedule.decay` must be one of {', '.join(LR_DECAYS)}, got "
                           f"{schedule.decay!r}")
    if not 0 <= schedule.min_lr_ratio <= 1:
        raise PipellmError(f"{source}: `lr_schedule.min_lr_ratio` must be in [0, 1], got {schedule.min_lr_ratio}")
    if schedule.decay == "constant" and schedule.min_lr_ratio:
        raise PipellmError(f"{source}: `lr_schedule.min_lr_ratio` has no effect with `decay: constant`; set "
                           f"`decay: linear` or `cosine`, or remove it")
    if cfg.max_nonfinite_steps < 1:
        raise PipellmError(f"{source}: `max_nonfinite_steps` must be >= 1, got {cfg.max_nonfinite_steps}")
    optimizer = cfg.deepspeed.get("optimizer")
    if optimizer is not None and not (isinstance(optimizer, dict) and isinstance(optimizer.get("params", {}), dict)):
        raise PipellmError(f"{source}: `optimizer` must be a mapping like {{type: AdamW, params: {{lr: 2.0e-5, "
                           f"weight_decay: 0.1}}}}, got {optimizer!r}")
    if optimizer is not None and str(optimizer.get("type")).lower() not in ("adamw", "adam", "lion"):
        raise PipellmError(f"{source}: `optimizer.type` {optimizer.get('type')!r} is not supported; use AdamW or "
                           f"Lion")
    if optimizer is not None and optimizer.get("params", {}).get("adam_w_mode") is False:
        raise PipellmError(f"{source}: `optimizer.params.adam_w_mode: false` (L2-coupled Adam) is not supported; "
                           f"pipellm's Adam is AdamW (decoupled weight decay): remove the key")
    if all(isinstance(cfg.deepspeed.get(k), dict) and cfg.deepspeed[k].get("enabled") for k in ("bf16", "fp16")):
        raise PipellmError(f"{source}: `bf16` and `fp16` are both enabled; enable one of them")


def _complete_batch_sizes(ds: dict, data_degree: int, source: str) -> None:
    """Fill in the one missing batch size, or check that the three agree (train = micro * gas * D)."""
    names = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
    given = {n: ds[n] for n in names if ds.get(n) is not None}
    for name, value in given.items():
        if not _type_ok(value, int) or value < 1:
            raise PipellmError(f"{source}: `{name}` must be a positive integer, got {value!r}")
    train, micro, gas = (given.get(n) for n in names)
    if micro is None and gas is None:
        gas = 1
    if train is None:
        if micro is None:
            raise PipellmError(f"{source}: set `train_batch_size` or `train_micro_batch_size_per_gpu`")
        gas = gas or 1
        train = micro * gas * data_degree
    elif micro is None:
        if train % (gas * data_degree):
            raise PipellmError(f"{source}: `train_batch_size` {train} is not divisible by "
                               f"gradient_accumulation_steps {gas} x data-parallel degree {data_degree}")
        micro = train // (gas * data_degree)
    elif gas is None:
        if train % (micro * data_degree):
            raise PipellmError(f"{source}: `train_batch_size` {train} is not divisible by "
                               f"train_micro_batch_size_per_gpu {micro} x data-parallel degree {data_degree}")
        gas = train // (micro * data_degree)
    if train != micro * gas * data_degree:
        raise PipellmError(f"{source}: `train_batch_size` {train} != train_micro_batch_size_per_gpu {micro} x "
                           f"gradient_accumulation_steps {gas} x data-parallel degree {data_degree}; fix one of them")
    ds.update(zip(names, (train, micro, gas)))


def validate_environment(cfg: TrainConfig, world_size: int) -> None:
    """Checks that need the file system or the launcher: paths and world size."""
    model_path = Path(cfg.model_path)
    if not (model_path / "config.json").is_file():
        raise PipellmError(f"`model_path` {model_path} has no config.json; convert a Hugging Face model with "
                           f"`python convert_model.py hg_to_pp --input-path HF_DIR --save-path {model_path}`")
    for key, files in (("data_path", cfg.data_paths), ("eval_data_path", cfg.eval_data_paths)):
        for data_file in files:
            if not Path(data_file).is_file():
                raise PipellmError(f"`{key}` file {data_file} does not exist")
    save_path = Path(cfg.save_path)
    if save_path.exists() and not save_path.is_dir():
        raise PipellmError(f"`save_path` {save_path} exists and is not a directory")
    for key, module, fix in (("wandb_project", "wandb", "pip install wandb, or remove `wandb_project`"),
                             ("use_tensorboard", "tensorboard", "pip install tensorboard, or set `use_tensorboard: "
                                                                "false`")):
        if getattr(cfg, key) and importlib.util.find_spec(module) is None:
            raise PipellmError(f"`{key}` is set but the {module} package is not installed: {fix}")
    grid = cfg.pipe_degree * cfg.data_degree
    if grid != world_size:
        raise PipellmError(f"`model_topo.process_topology.dims` {cfg.model_topo.process_topology.dims} needs "
                           f"{grid} processes but the launcher started {world_size}; change `dims` or the "
                           f"launcher's --num_gpus/--num_nodes")


def validate_partition(cfg: TrainConfig, num_layers: int) -> None:
    """``parts`` against the model's pipeline layer count (embedding + decoder layers + head)."""
    parts = cfg.model_topo.parts
    if isinstance(parts, list) and sum(parts) != num_layers:
        raise PipellmError(f"`model_topo.parts` {parts} sums to {sum(parts)} but the model has {num_layers} "
                           f"pipeline layers (embedding + {num_layers - 2} decoder layers + head)")
    if num_layers < cfg.pipe_degree:
        raise PipellmError(f"the model has {num_layers} pipeline layers, fewer than the {cfg.pipe_degree} stages")


def dump_resolved(cfg: TrainConfig) -> str:
    """The configuration as run, for the run directory."""
    return json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True)
