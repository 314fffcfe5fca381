"""The one validation pass over a loaded config, before any process group exists.

``check_config`` runs the per-section checks of ``SECTION_CHECKS`` on the file's own content (``load_config``
calls it); ``validate_environment`` adds what needs the file system and the launcher,
``pipellm.pipeline.partition.PipelineLayers.check_parts`` what needs the model's layer count. Each failure is one
``PipellmError`` line naming the file, the key and the fix.
"""
from __future__ import annotations

import functools
import importlib.util
import inspect
import re
import typing
from pathlib import Path

from pipellm.config.deepspeed_keys import DeepSpeedSettings
from pipellm.config.schema import DPO, Reward, TrainConfig
from pipellm.config.speed_checks import check_speed
from pipellm.config.typecheck import suggest, type_name, type_ok
from pipellm.errors import PipellmError

# Keys with a lower bound: (key path, bound, what the bound or its absence means). An absent (null) value is fine.
LOWER_BOUNDS = (
    ("max_seq_len", 2, ""), ("n_epochs", 1, ""), ("log_steps", 1, ""), ("max_steps", 1, " (or absent)"),
    ("save_steps", 0, ""), ("loss_chunk_tokens", 1, " (or null: no chunking)"), ("eval_steps", 0, ""),
    ("tokenize_workers", 1, ""), ("gpu_profile_interval_s", 0, " (0: off)"), ("max_nonfinite_steps", 1, ""),
    ("keep_last_n", 1, " (or absent: keep all)"), ("early_stopping.patience", 0, " (0: off)"),
    ("early_stopping.min_delta", 0, ""), ("lr_schedule.warmup_steps", 0, ""), ("lock_stale_after_s", 1, ""),
)


def check_bounds(cfg: TrainConfig, source: str) -> None:
    for key, bound, note in LOWER_BOUNDS:
        value = functools.reduce(getattr, key.split("."), cfg)
        if value is not None and value < bound:
            raise PipellmError(f"{source}: `{key}` must be >= {bound}{note}, got {value}")


def check_topology(cfg: TrainConfig, source: str) -> None:
    topo = cfg.model_topo.process_topology
    if sorted(topo.axes) != ["data", "pipe"]:
        raise PipellmError(f"{source}: `model_topo.process_topology.axes` must be [pipe, data] or [data, pipe], "
                           f"got {topo.axes}")
    if len(topo.dims) != 2 or min(topo.dims) < 1:
        raise PipellmError(f"{source}: `model_topo.process_topology.dims` must be two positive integers [P, D], "
                           f"got {topo.dims}")
    parts = cfg.model_topo.parts
    if isinstance(parts, list):
        if len(parts) != cfg.pipe_degree:
            raise PipellmError(f"{source}: `model_topo.parts` has {len(parts)} entries but the pipeline has "
                               f"{cfg.pipe_degree} stages (`dims`); give one layer count per stage")
        if min(parts) < 1:
            raise PipellmError(f"{source}: `model_topo.parts` entries must be >= 1, got {parts}")


def check_data(cfg: TrainConfig, source: str) -> None:
    if not cfg.data_paths:
        raise PipellmError(f"{source}: `data_path` is an empty list; give at least one data file")
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


def check_checkpoints(cfg: TrainConfig, source: str) -> None:
    if cfg.resume is not None and not cfg.resume.strip():
        raise PipellmError(f"{source}: `resume` is empty; give `auto` or a checkpoint directory, or leave it out")
    if cfg.resume_weights_only and cfg.resume is None:
        raise PipellmError(f"{source}: `resume_weights_only: true` needs `resume` (`auto` or a checkpoint "
                           f"directory)")
    if cfg.early_stopping.patience and not (cfg.eval_steps and (cfg.eval_ratio or cfg.eval_data_path is not None)):
        raise PipellmError(f"{source}: `early_stopping.patience` needs evals during training: set `eval_steps` "
                           f"and eval data (`eval_ratio` or `eval_data_path`)")


def check_profile(cfg: TrainConfig, source: str) -> None:
    steps = cfg.profile_steps
    if steps is not None and (len(steps) != 2 or not 1 <= steps[0] <= steps[1]):
        raise PipellmError(f"{source}: `profile_steps` must be [first, last] with 1 <= first <= last (1-based "
                           f"training steps), got {steps}; e.g. [5, 6], or leave it out")


def check_learning_rate(cfg: TrainConfig, source: str) -> None:
    for pattern in cfg.no_weight_decay:
        try:
            re.compile(pattern)
        except re.error as e:
            raise PipellmError(f"{source}: `no_weight_decay` entry {pattern!r} is not a valid regular expression "
                               f"({e}); fix or remove it") from None
    schedule = cfg.lr_schedule
    if not 0 <= schedule.min_lr_ratio <= 1:
        raise PipellmError(f"{source}: `lr_schedule.min_lr_ratio` must be in [0, 1], got {schedule.min_lr_ratio}")
    if schedule.decay == "constant" and schedule.min_lr_ratio:
        raise PipellmError(f"{source}: `lr_schedule.min_lr_ratio` has no effect with `decay: constant`; set "
                           f"`decay: linear` or `cosine`, or remove it")


def check_optimizer_block(cfg: TrainConfig, source: str) -> None:
    """DeepSpeed's ``optimizer`` block, against the parameters of the optimizer pipellm builds from it."""
    optimizer = type_and_params(cfg, "optimizer", "{type: AdamW, params: {lr: 2.0e-5, weight_decay: 0.1}}", source)
    if optimizer is None:
        return
    if str(optimizer.get("type")).lower() not in ("adamw", "adam", "lion"):
        raise PipellmError(f"{source}: `optimizer.type` {optimizer.get('type')!r} is not supported; use AdamW or "
                           f"Lion")
    params = optimizer.get("params", {})
    if params.get("adam_w_mode") is False:
        raise PipellmError(f"{source}: `optimizer.params.adam_w_mode: false` (L2-coupled Adam) is not supported; "
                           f"pipellm's Adam is AdamW (decoupled weight decay): remove the key")
    import torch
    from pipellm.training.optim import optimizer_class

    cls = optimizer_class(optimizer)
    own = {k: v for k, v in params.items() if not (cls is torch.optim.AdamW and k in DEEPSPEED_ADAM_KEYS)}
    check_call_params(cls, own, "optimizer.params", source, skipped=("self", "params"))
    for key, (bound, within) in OPTIMIZER_RANGES.items():
        values = own.get(key, [])
        if not all(within(value) for value in (values if isinstance(values, list) else [values])):
            raise PipellmError(f"{source}: `optimizer.params.{key}` must be {bound}, got {own[key]!r}")
    try_construct(lambda: cls([torch.zeros(1, requires_grad=True)], **own), cls, "optimizer.params", source)


def check_scheduler_block(cfg: TrainConfig, source: str) -> None:
    """DeepSpeed's ``scheduler`` block, against the parameters of the scheduler DeepSpeed builds from it (one of
    DeepSpeed's ``lr_schedules``, else torch's of that name, as ``DeepSpeedEngine`` looks it up)."""
    scheduler = type_and_params(cfg, "scheduler", "{type: WarmupLR, params: {warmup_num_steps: 100}}", source)
    if scheduler is None:
        return
    import torch
    from deepspeed.runtime import lr_schedules

    known = {name: getattr(lr_schedules, name) for name in lr_schedules.VALID_LR_SCHEDULES}
    known.update((name, cls) for name, cls in vars(torch.optim.lr_scheduler).items() if name not in known and
                 isinstance(cls, type) and issubclass(cls, torch.optim.lr_scheduler.LRScheduler) and name[0] != "_")
    name = scheduler.get("type")
    if name not in known:
        raise PipellmError(f"{source}: `scheduler.type` {name!r} is not a DeepSpeed or torch scheduler; use one "
                           f"of {', '.join(lr_schedules.VALID_LR_SCHEDULES)}{suggest(str(name), known)}")
    params = scheduler.get("params", {})
    check_call_params(known[name], params, "scheduler.params", source, skipped=("self", "optimizer"))
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    try_construct(lambda: known[name](probe, **params), known[name], "scheduler.params", source)


# Keys of DeepSpeed's Adam that torch's AdamW has no use for (``pipellm.training.optim.build_optimizer`` drops
# them), and the ranges of the optimizer parameters every supported optimizer shares.
DEEPSPEED_ADAM_KEYS = ("torch_adam", "adam_w_mode")
OPTIMIZER_RANGES = {"lr": ("> 0", lambda v: v > 0), "eps": (">= 0", lambda v: v >= 0),
                    "weight_decay": (">= 0", lambda v: v >= 0), "betas": ("in [0, 1)", lambda v: 0 <= v < 1)}


def type_and_params(cfg: TrainConfig, key: str, example: str, source: str) -> dict | None:
    """DeepSpeed's block ``key`` (``{type: ..., params: {...}}``), checked to be one, or None when absent."""
    block = cfg.deepspeed.get(key)
    if block is None:
        return None
    if not (isinstance(block, dict) and isinstance(block.get("params", {}), dict)):
        raise PipellmError(f"{source}: `{key}` must be a mapping like {example}, got {block!r}")
    for name in block:
        if name not in ("type", "params"):
            raise PipellmError(f"{source}: unknown key `{key}.{name}` (it takes `type` and `params`)"
                               f"{suggest(name, ('type', 'params'))}")
    return block


def check_call_params(cls, params: dict, where: str, source: str, skipped: tuple[str, ...]) -> None:
    """``params`` against ``cls.__init__``'s keyword parameters: names, required ones, and the type of the
    default (a number, a bool, a string, or a list of as many numbers as a tuple default holds)."""
    accepted = {n: p for n, p in inspect.signature(cls.__init__).parameters.items() if n not in skipped and
                p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    for key, value in params.items():
        if key not in accepted:
            raise PipellmError(f"{source}: unknown key `{where}.{key}` for {cls.__name__}"
                               f"{suggest(key, accepted) or '; it takes ' + ', '.join(accepted)}")
        default = accepted[key].default
        expected = DEFAULT_TYPES.get(type(default), list[float] if isinstance(default, tuple) else None)
        if expected is not None and not (type_ok(value, expected) and
                                         (not isinstance(default, tuple) or len(value) == len(default))):
            shape = (f"a list of {len(default)} numbers" if isinstance(default, tuple) else
                     "a number" if expected is float else type_name(expected))
            raise PipellmError(f"{source}: `{where}.{key}` must be {shape}, got {value!r}")
    for key, parameter in accepted.items():
        if parameter.default is parameter.empty and key not in params:
            raise PipellmError(f"{source}: `{where}.{key}` is required by {cls.__name__}; add it")


# The type a value must have, by the type of the parameter's default (an int default takes any number).
DEFAULT_TYPES = {bool: bool, int: float, float: float, str: str}


def try_construct(make, cls, where: str, source: str) -> None:
    """Build the optimizer or scheduler once on a probe tensor, so that what its own checks refuse (ranges the
    table does not know) fails here, in one line, and not on every rank after the pipeline is built."""
    try:
        make()
    except (ValueError, TypeError, AssertionError, KeyError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PipellmError(f"{source}: `{where}`: {cls.__name__} refuses them ({reason}); fix the value") from None


def check_precision(cfg: TrainConfig, source: str) -> None:
    """The DeepSpeed keys pipellm reads (``DeepSpeedSettings``), each held to its field's type."""
    examples = {"bf16": "{enabled: true}", "fp16": "{enabled: true}", "data_types": "{grad_accum_dtype: fp32}"}
    for key, example in examples.items():
        if key in cfg.deepspeed and not isinstance(cfg.deepspeed[key], dict):
            raise PipellmError(f"{source}: `{key}` must be a mapping like {example}, got {cfg.deepspeed[key]!r}")
    if len(DeepSpeedSettings.enabled_precisions(cfg.deepspeed)) > 1:
        raise PipellmError(f"{source}: `bf16` and `fp16` are both enabled; enable one of them")
    zero = cfg.deepspeed.get("zero_optimization") or {}
    if not isinstance(zero, dict):
        raise PipellmError(f"{source}: `zero_optimization` must be a mapping like {{stage: 1}}, got {zero!r}")
    for name in ("offload_optimizer", "offload_param"):
        if zero.get(name) is not None and not isinstance(zero[name], dict):
            raise PipellmError(f"{source}: `zero_optimization.{name}` must be a mapping like {{device: cpu}}, got "
                               f"{zero[name]!r}")
    settings = DeepSpeedSettings.of(cfg.deepspeed)
    hints = typing.get_type_hints(DeepSpeedSettings)
    for field, key in DeepSpeedSettings.KEYS.items():
        value = getattr(settings, field)
        if not type_ok(value, hints[field]):
            raise PipellmError(f"{source}: `{key}` must be {type_name(hints[field])}, got {value!r}")


def complete_batch_sizes(cfg: TrainConfig, source: str) -> None:
    """Fill in the one missing batch size, or check that the three agree (train = micro * gas * D)."""
    ds, data_degree = cfg.deepspeed, cfg.data_degree
    names = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
    given = {n: ds[n] for n in names if ds.get(n) is not None}
    for name, value in given.items():
        if not type_ok(value, int) or value < 1:
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


def check_objective(cfg: TrainConfig, source: str) -> None:
    """A registered objective or the ``module:attribute`` form (the module itself is imported at start-up)."""
    from pipellm.training.objective import OBJECTIVES

    module, colon, attribute = cfg.objective.partition(":")
    if cfg.objective not in OBJECTIVES and not (colon and module and attribute):
        raise PipellmError(f"{source}: `objective` {cfg.objective!r} is not one of {', '.join(OBJECTIVES)} and not "
                           f"`module:attribute`{suggest(cfg.objective, OBJECTIVES)}")


def check_lora(cfg: TrainConfig, source: str) -> None:
    """The adapters' shape; the target modules are checked against the model's family at start-up
    (``pipellm.training.lora.check_lora_model``)."""
    lora = cfg.lora
    if lora is None:
        if cfg.quantize_base is not None:
            raise PipellmError(f"{source}: `quantize_base: {cfg.quantize_base}` quantizes the frozen base of a LoRA "
                               f"run; add a `lora:` section or remove `quantize_base`")
        return
    for key, ok, fix in (("r", lora.r > 0, "a positive rank, e.g. 16"), ("alpha", lora.alpha > 0, "e.g. 2 * r"),
                         ("dropout", 0 <= lora.dropout < 1, "a probability in [0, 1)"),
                         ("target_modules", bool(lora.target_modules), "at least one module name, e.g. [q_proj]")):
        if not ok:
            raise PipellmError(f"{source}: `lora.{key}` {getattr(lora, key)!r} is not valid: give {fix}")
    if cfg.quantize_base is not None and cfg.objective == "dpo" and cfg.dpo.reference != "initial":
        raise PipellmError(f"{source}: `dpo.reference` {cfg.dpo.reference} with `quantize_base`: QLoRA's 4-bit base "
                           f"cannot load the reference's weights; use `dpo.reference: initial` (the base, adapters "
                           f"off) or train LoRA without `quantize_base`")


PAIRWISE_OBJECTIVES = ("dpo", "reward")
"""Objectives that train on preference pairs (two samples each)."""


def check_pairwise(cfg: TrainConfig, source: str) -> None:
    """``dpo``'s settings, and batches that keep a pair's two rows together (after ``complete_batch_sizes``)."""
    dpo = cfg.dpo
    if dpo.beta <= 0:
        raise PipellmError(f"{source}: `dpo.beta` must be > 0, got {dpo.beta}")
    if not 0 <= dpo.label_smoothing < 0.5:
        raise PipellmError(f"{source}: `dpo.label_smoothing` must be in [0, 0.5), got {dpo.label_smoothing}")
    if dpo.label_smoothing and dpo.loss != "sigmoid":
        raise PipellmError(f"{source}: `dpo.label_smoothing` applies to `dpo.loss: sigmoid` only; remove it or "
                           f"use the sigmoid loss")
    if cfg.objective in PAIRWISE_OBJECTIVES and not cfg.packing and cfg.micro_batch_size % 2:
        raise PipellmError(f"{source}: `objective: {cfg.objective}` without packing puts a pair's chosen and "
                           f"rejected answers in two rows of one micro batch: `train_micro_batch_size_per_gpu` "
                           f"must be even, got {cfg.micro_batch_size}")


def check_pipeline_schedule(cfg: TrainConfig, source: str) -> None:
    """``zb-h1`` runs its split backward outside ``engine.backward``, so without fp16's loss scaling; the
    pipeline engine refuses ZeRO stages above 1 anyway."""
    settings = cfg.deepspeed_settings
    if cfg.pipeline_schedule == "zb-h1" and (settings.precision == "fp16" or settings.zero_stage > 1):
        raise PipellmError(f"{source}: `pipeline_schedule: zb-h1` runs with fp32 or bf16 and ZeRO stage 0 or 1; "
                           f"use `bf16: {{enabled: true}}` (ZeRO <= 1) or `pipeline_schedule: 1f1b`")


def check_reward(cfg: TrainConfig, source: str) -> None:
    """``reward``'s settings, and each objective's section only under its own objective."""
    if cfg.reward.margin < 0 or cfg.reward.margin != cfg.reward.margin:
        raise PipellmError(f"{source}: `reward.margin` must be >= 0, got {cfg.reward.margin}")
    for key, default, misplaced in (("reward", Reward(), cfg.objective != "reward"),
                                    ("dpo", DPO(), cfg.objective == "reward")):
        if misplaced and getattr(cfg, key) != default:
            raise PipellmError(f"{source}: `{key}:` settings do not apply to `objective: {cfg.objective}`; remove the "
                               f"`{key}:` section or set `objective: {key}`")
    if cfg.objective == "reward" and cfg.lora is not None and "head" not in cfg.lora.modules_to_save:
        raise PipellmError(f"{source}: `objective: reward` with `lora`: the score head must train; add `head` to "
                           f"`lora.modules_to_save`")


SECTION_CHECKS = (check_bounds, check_topology, check_data, check_checkpoints, check_profile,
                  check_learning_rate, check_optimizer_block, check_scheduler_block, check_precision, check_objective,
                  complete_batch_sizes, check_lora, check_pairwise, check_pipeline_schedule, check_reward,
                  check_speed)


def check_config(cfg: TrainConfig) -> None:
    """Every check of the file's own content, in one pass (no file system, world size or model yet)."""
    for check in SECTION_CHECKS:
        check(cfg, cfg.source)


def expand_data_directories(cfg: TrainConfig) -> None:
    """A directory in ``data_path`` / ``eval_data_path`` becomes its data files (``data_files``); they share the
    directory's ``data_weights`` entry. A config without directories is left as it is."""
    from pipellm.data.records import data_files

    if any(Path(p).is_dir() for p in cfg.data_paths):
        groups = [data_files(entry) for entry in cfg.data_paths]
        if cfg.data_weights is not None:
            cfg.data_weights = [w for w, group in zip(cfg.data_weights, groups) for _ in group]
        cfg.data_path = [str(file) for group in groups for file in group]
    if any(Path(p).is_dir() for p in cfg.eval_data_paths):
        cfg.eval_data_path = [str(file) for entry in cfg.eval_data_paths for file in data_files(entry)]


def lora_checkpoint(path: str) -> bool:
    """A LoRA run's save directory or tag directory (``pipellm.training.lora.LORA_FILE`` in it or its latest tag)."""
    from pipellm.pipeline.layer_files import follow_latest
    from pipellm.training.lora import LORA_FILE

    directory = follow_latest(Path(path)) or Path(path)
    return (directory / LORA_FILE).is_file()


def validate_environment(cfg: TrainConfig, world_size: int) -> None:
    """Checks that need the file system or the launcher: paths (data directories expanded) and world size."""
    model_path = Path(cfg.model_path)
    if not (model_path / "config.json").is_file():
        raise PipellmError(f"`model_path` {model_path} has no config.json; convert a Hugging Face model with "
                           f"`python convert_model.py hg_to_pp --input-path HF_DIR --save-path {model_path}`")
    expand_data_directories(cfg)
    for key, files in (("data_path", cfg.data_paths), ("eval_data_path", cfg.eval_data_paths)):
        for data_file in files:
            if not Path(data_file).is_file():
                raise PipellmError(f"`{key}` file {data_file} does not exist")
    if cfg.dpo.reference != "initial" and not Path(cfg.dpo.reference).is_dir():
        raise PipellmError(f"`dpo.reference` {cfg.dpo.reference} is not a directory; name a pipeline checkpoint "
                           f"(hg_to_pp output or a training save directory) or use `initial`")
    if cfg.dpo.reference != "initial" and lora_checkpoint(cfg.dpo.reference):
        raise PipellmError(f"`dpo.reference` {cfg.dpo.reference} is a LoRA checkpoint (its layer files hold only "
                           f"adapters); export it merged (convert_model.py pp_to_hg), convert that back "
                           f"(hg_to_pp) and name the result")
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
