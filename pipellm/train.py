"""``deepspeed train_ds.py --config X.yml``: pipeline-parallel training, top to bottom.

1. Read and validate the config (before any process group, so a bad file fails fast on every rank).
2. Tokenize the data once into the on-disk cache (memory-mapped by every rank; each step's global batch is known
   to all ranks).
3. Build this rank's pipeline stage and load only its layers.
4. Loop: one ``engine.train_batch`` per optimizer step; log; checkpoint every ``save_steps`` and at the end.

A checkpoint ``save_path/global_step<N>/`` holds DeepSpeed's per-layer files (``layer_XX-model_states.pt``, the
same format as ``convert_model.py hg_to_pp`` writes), optimizer state, and the model's config and tokenizer, so
``convert_model.py pp_to_hg --input-path save_path`` exports it directly (it follows ``latest``).
"""
from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

import torch

from pipellm.batches import Schedule, TrainingData, load_training_data, micro_batches
from pipellm.config import (TrainConfig, dump_resolved, load_config, parse_launcher_args, validate_environment,
                            validate_partition)
from pipellm.distributed import StallWatchdog, config_hash, data_fingerprint, verify_same_run
from pipellm.errors import PipellmError
from pipellm.metrics import MetricsLog, StepFigures, StepTimer, device_peak_flops, flops_per_token, peak_memory_gib
from pipellm.models import load_model_config
from pipellm.models.base import ModelFamily
from pipellm.optim import build_optimizer, record_grad_norm
from pipellm.checkpoint import copy_model_files, layer_file_name, num_layer_files, resolve_checkpoint_dir


def read_model_config(cfg: TrainConfig):
    return load_model_config(cfg.model_path)


def check_layer_files(cfg: TrainConfig, family: ModelFamily, hf_config) -> None:
    if cfg.from_scratch:
        return
    for index in range(num_layer_files(family, hf_config)):
        path = Path(cfg.model_path) / layer_file_name(index)
        if not path.is_file():
            raise PipellmError(f"`model_path` {cfg.model_path} lacks {path.name}; convert the Hugging Face model "
                               f"with `convert_model.py hg_to_pp` or set `from_scratch: true`")


def prepare(argv=None):
    """Everything that can fail on bad input, done before any process group work."""
    args = parse_launcher_args("Train a model with DeepSpeed pipeline parallelism.", argv)
    cfg = load_config(args.config)
    if not cfg.from_scratch and Path(cfg.model_path).is_dir():
        # A training save directory works as a starting point too: start from its newest checkpoint.
        cfg.model_path = str(resolve_checkpoint_dir(cfg.model_path))
    validate_environment(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    hf_config, family = read_model_config(cfg)
    validate_partition(cfg, family.num_decoder_layers(hf_config) + 2)
    check_layer_files(cfg, family, hf_config)
    return cfg, hf_config, family


def train(cfg: TrainConfig, hf_config, family: ModelFamily) -> None:
    import deepspeed
    from deepspeed.runtime.constants import GRADIENT_CLIPPING_DEFAULT
    from deepspeed.runtime.pipe.topology import ProcessTopology
    from transformers import AutoTokenizer

    from pipellm.pipeline import build_pipeline, load_pipeline_weights  # imports deepspeed: after validation

    tokenizer = AutoTokenizer.from_pretrained(cfg.model_path)
    rank = int(os.environ.get("RANK", "0"))
    data = load_training_data(cfg, tokenizer, show_progress=int(os.environ.get("LOCAL_RANK", "0")) == 0)

    on_gpu = torch.cuda.is_available()
    if on_gpu:  # before any NCCL collective, or every rank would use GPU 0
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # The watchdog below reports stalls inside steps first; the process group's timeout (a minute later) covers
    # the collectives outside them (start-up checks, checkpoint saves).
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo",
                               timeout=datetime.timedelta(seconds=cfg.collective_timeout_s + 60))
    verify_same_run(config_hash(dump_resolved(cfg)), data_fingerprint(cfg.data_paths))
    topo_cfg = cfg.model_topo.process_topology
    topology = ProcessTopology(axes=topo_cfg.axes, dims=topo_cfg.dims)

    model = build_pipeline(family, hf_config, topology, cfg.model_topo.parts, use_grad_ckpt=cfg.use_grad_ckpt,
                           use_flash_attn=cfg.use_flash_attn, seed=cfg.seed,
                           compile_layers=on_gpu if cfg.compile_layers is None else cfg.compile_layers,
                           device=f"cuda:{torch.cuda.current_device()}" if on_gpu else "cpu", packed=cfg.packing)
    if not cfg.from_scratch:
        load_pipeline_weights(model, family, hf_config, cfg.model_path)

    ds_config = dict(cfg.deepspeed)
    optimizer = build_optimizer(model, ds_config.pop("optimizer", None))
    plain_fp32 = not any(ds_config.get(k, {}).get("enabled") for k in ("bf16", "fp16")) \
        and not ds_config.get("zero_optimization", {}).get("stage", 0)
    if plain_fp32:
        # pipellm clips (and measures the norm) itself here; DeepSpeed's default clip would apply otherwise.
        max_norm = float(ds_config.get("gradient_clipping", GRADIENT_CLIPPING_DEFAULT))
        ds_config["gradient_clipping"] = 0.0
        record_grad_norm(optimizer, model, model._grid.get_pipe_parallel_group(), max_norm)
    ds_config.setdefault("steps_per_print", 10**9)  # pipellm logs; keep DeepSpeed's own step lines quiet
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    watchdog = StallWatchdog(engine, model.stage_id, cfg.collective_timeout_s)

    schedule = Schedule(data.plan, cfg.n_epochs, cfg.max_steps)
    total_steps = schedule.total_steps
    save_path = Path(cfg.save_path)
    is_logger = rank == 0
    if is_logger:
        save_path.mkdir(parents=True, exist_ok=True)
        (save_path / "train_config.json").write_text(dump_resolved(cfg))
        template = data.files_meta[0]["template"]
        print(f"pipellm data: {data.summary()}; template {template}", file=sys.stderr)
        print(f"pipellm: {schedule.steps_per_epoch[0]} steps/epoch, {total_steps} steps, global batch "
              f"{cfg.global_batch_size} x {cfg.max_seq_len} tokens", file=sys.stderr)

    # Parameters of the whole model: each stage counts its own (a tied copy once), replica 0 only.
    data_rank = model._grid.data_parallel_id
    local_params = sum(p.numel() for p in model.parameters() if not getattr(p, "ds_pipe_replicated", False))
    total_params = _all_reduce(torch.tensor([local_params if data_rank == 0 else 0], dtype=torch.float64))
    embedding = hf_config.vocab_size * hf_config.hidden_size
    figures = StepFigures(cfg.global_batch_size, cfg.max_seq_len, topology.world_size(),
                          flops_per_token(hf_config, int(total_params[0]), embedding, cfg.max_seq_len),
                          cfg.peak_flops_per_gpu or device_peak_flops())

    log = MetricsLog(save_path, total_steps, 0, enabled=is_logger)
    timer = StepTimer()
    for step in range(total_steps):
        input_ids, labels, position_ids, lengths = data.rows_of(schedule.batch(step))
        batches = micro_batches(input_ids, labels, cfg.micro_batch_size, data_rank, cfg.data_degree, position_ids)
        with watchdog.watch_step(step + 1):
            loss = engine.train_batch(iter(batches))
        seconds = timer.lap()
        done = step + 1
        record = None
        eval_due = bool(data.eval_rows) and ((cfg.eval_steps and done % cfg.eval_steps == 0) or done == total_steps)
        if done % cfg.log_steps == 0 or done == total_steps or eval_due:
            record = figures.record(step=done, epoch=schedule.locate(step)[0], loss=loss, lr=engine.get_lr()[0],
                                    grad_norm=engine.get_global_grad_norm(), tokens=int(lengths.sum()),
                                    seconds=seconds, elapsed=timer.elapsed,
                                    peak_mem_gib_per_stage=_stage_peak_memory(model))
        if eval_due:
            record["eval_loss"] = evaluate(engine, data, cfg, data_rank)
        log.step(record)
        if (cfg.save_steps and done % cfg.save_steps == 0) or (cfg.save_final and done == total_steps):
            save_checkpoint(engine, cfg, save_path, done, is_logger)
    log.close()
    if is_logger:
        saved = (f"; checkpoint {save_path}/global_step{total_steps} (export: python convert_model.py pp_to_hg "
                 f"--input-path {save_path} --save-path HF_OUT)") if cfg.save_final else ""
        print(f"pipellm: done, {total_steps} steps in {timer.elapsed:.1f}s{saved}", file=sys.stderr)


def evaluate(engine, data: TrainingData, cfg: TrainConfig, data_rank: int) -> float:
    """Mean cross entropy over every labelled token of the eval rows (all ranks take part)."""
    total, count = 0.0, 0
    for input_ids, labels, position_ids, _ in data.eval_batches(cfg.global_batch_size):
        batches = micro_batches(input_ids, labels, cfg.micro_batch_size, data_rank, cfg.data_degree, position_ids)
        labelled = int((labels[:, 1:] != -100).sum())
        loss = engine.eval_batch(iter(batches))
        total += float(loss) * labelled
        count += labelled
    return total / max(count, 1)


def _all_reduce(tensor: torch.Tensor, op=None) -> torch.Tensor:
    """All-reduce over the world (sum by default) on the backend's device; the result on the CPU."""
    import deepspeed.comm as dist

    reduced = tensor.to("cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(reduced, op=op or dist.ReduceOp.SUM)
    return reduced.cpu()


def _stage_peak_memory(model) -> list[float]:
    """Peak memory (GiB) per pipeline stage, the maximum over its data-parallel replicas."""
    import deepspeed.comm as dist

    per_stage = torch.zeros(model.num_stages, dtype=torch.float64)
    per_stage[model.stage_id] = peak_memory_gib()
    return [round(x, 3) for x in _all_reduce(per_stage, dist.ReduceOp.MAX).tolist()]


def save_checkpoint(engine, cfg: TrainConfig, save_path: Path, step: int, is_logger: bool) -> None:
    import deepspeed.comm as dist

    tag = f"global_step{step}"
    engine.save_checkpoint(str(save_path), tag=tag)
    if is_logger:
        copy_model_files(Path(cfg.model_path), save_path / tag)
    dist.barrier()


def main(argv=None) -> None:
    try:
        cfg, hf_config, family = prepare(argv)
        train(cfg, hf_config, family)
    except PipellmError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
