"""``deepspeed train_ds.py --config X.yml``: pipeline-parallel training, top to bottom.

1. Read and validate the config (before any process group, so a bad file fails fast on every rank).
2. Tokenize the data once into the on-disk cache (memory-mapped by every rank; each step's global batch is known
   to all ranks).
3. Build this rank's pipeline stage and load only its layers (or resume a checkpoint: ``pipellm.training.resume``).
4. Loop: one ``engine.train_batch`` per optimizer step; log; evaluate; checkpoint every ``save_steps``, at
   improving evals and at the end; stop early on SIGTERM or when the eval loss stops improving.

A checkpoint ``save_path/global_step<N>/`` holds DeepSpeed's per-layer files (``layer_XX-model_states.pt``, the
same format as ``convert_model.py hg_to_pp`` writes), optimizer state, and the model's config and tokenizer, so
``convert_model.py pp_to_hg --input-path save_path`` exports it directly (it follows ``latest``).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from pipellm.data.batches import Schedule, TrainingData, load_training_data, micro_batches
from pipellm.config import TrainConfig, dump_resolved, load_config, parse_launcher_args, validate_environment
from pipellm.training.distributed import (StallWatchdog, all_reduce, config_hash, data_fingerprint,
                                 init_process_group, run_owns_process_group, verify_same_run)
from pipellm.errors import PipellmError
from pipellm.observe.gpu_profile import start_gpu_profile
from pipellm.observe.metrics import (MetricsLog, StepFigures, StepTimer, device_peak_flops, flops_per_token, peak_memory_gib,
                             perplexity)
from pipellm.observe.run_info import write_run_info
from pipellm.observe.sinks import open_sinks
from pipellm.models import load_model_config
from pipellm.models.base import ModelFamily
from pipellm.training.optim import NonFiniteRun, check_pipeline_settings, pipeline_optimizer
from pipellm.pipeline.layer_files import layer_file_name, resolve_checkpoint_dir
from pipellm.pipeline.partition import PipelineLayers
from pipellm.training.resume import (CheckpointWriter, EarlyStoppingState, ResumePoint, StopOnSigterm, agree_on_start,
                            cut_metrics_log, layout_of, stopped_message, trainer_state)


def read_model_config(cfg: TrainConfig):
    return load_model_config(cfg.model_path)


def check_layer_files(cfg: TrainConfig, family: ModelFamily, hf_config) -> None:
    if cfg.from_scratch:
        return
    for index in range(PipelineLayers.of(family, hf_config).num_files):
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
    PipelineLayers.of(family, hf_config).check_parts(cfg.model_topo.parts, cfg.pipe_degree)
    check_pipeline_settings(cfg.deepspeed)
    check_layer_files(cfg, family, hf_config)
    return cfg, hf_config, family


def train(cfg: TrainConfig, hf_config, family: ModelFamily) -> None:
    import deepspeed
    from deepspeed.runtime.pipe.topology import ProcessTopology
    from pipellm.data.tokenizer import load_tokenizer

    # imports deepspeed: after validation
    from pipellm.pipeline.deepspeed_compat import is_pipeline_replicated
    from pipellm.pipeline.stages import build_pipeline
    from pipellm.pipeline.weights import checkpoint_named_parameters, load_pipeline_weights

    stop_signal = StopOnSigterm()  # from the start: a SIGTERM during start-up stops after the first step
    resume = ResumePoint.find(cfg)
    tokenizer = load_tokenizer(cfg.model_path)
    rank = int(os.environ.get("RANK", "0"))
    gpu_profile = start_gpu_profile(cfg.save_path, cfg.gpu_profile_interval_s)
    data = load_training_data(cfg, tokenizer, show_progress=int(os.environ.get("LOCAL_RANK", "0")) == 0)

    # The watchdog below reports stalls inside steps first; the process group's timeout (a minute later) covers
    # the collectives outside them (start-up checks, checkpoint saves).
    init_process_group(cfg.collective_timeout_s + 60)
    on_gpu = torch.cuda.is_available()
    config_digest, data_key = config_hash(dump_resolved(cfg)), data_fingerprint(cfg.data_paths)
    verify_same_run(config_digest, data_key)
    if cfg.model_topo.parts == "auto":  # needs the process group: rank 0 measures, every rank takes its split
        from pipellm.plan.agree import agreed_auto_parts
        cfg.model_topo.parts = agreed_auto_parts(cfg, hf_config, family, resume)
        config_digest = config_hash(dump_resolved(cfg))  # run_info's hash is of the config as run: with its split
    topo_cfg = cfg.model_topo.process_topology
    topology = ProcessTopology(axes=topo_cfg.axes, dims=topo_cfg.dims)

    model = build_pipeline(family, hf_config, topology, cfg.model_topo.parts, use_grad_ckpt=cfg.use_grad_ckpt,
                           use_flash_attn=cfg.use_flash_attn, seed=cfg.seed,
                           compile_layers=on_gpu if cfg.compile_layers is None else cfg.compile_layers,
                           device=f"cuda:{torch.cuda.current_device()}" if on_gpu else "cpu", packed=cfg.packing,
                           loss_chunk_tokens=cfg.loss_chunk_tokens)
    if resume is not None:
        resume.check_layout(layout_of(model))
    weights_dir = resume.weights_dir if resume is not None else None if cfg.from_scratch else cfg.model_path
    if weights_dir is not None:
        load_pipeline_weights(model, family, hf_config, weights_dir)

    schedule = Schedule(data.plan, cfg.n_epochs, cfg.max_steps)
    total_steps = schedule.total_steps
    optimizer, lr_scheduler, ds_config = pipeline_optimizer(
        model, checkpoint_named_parameters(model, family, hf_config), cfg.deepspeed, cfg.no_weight_decay,
        cfg.lr_schedule, total_steps)
    ds_config.setdefault("steps_per_print", 10**9)  # pipellm logs; keep DeepSpeed's own step lines quiet
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                           config=ds_config)
    watchdog = StallWatchdog(engine, model.stage_id, cfg.collective_timeout_s,
                             before_exit=gpu_profile.finish if gpu_profile else None)
    nonfinite = NonFiniteRun(cfg.max_nonfinite_steps, loss_scaling=engine.fp16_enabled())

    save_path = Path(cfg.save_path)
    is_logger = rank == 0
    # The stage boundaries count DeepSpeed's layers, where the final norm and the head are two.
    write_run_info(cfg, data, config_digest=config_digest, data_key=data_key,
                   layout={"axes": topo_cfg.axes, "dims": topo_cfg.dims, "stage_layer_boundaries": model.parts},
                   coordinates={"stage": model.stage_id, "replica": model.data_parallel_rank})
    if is_logger:
        save_path.mkdir(parents=True, exist_ok=True)
        template = data.files_meta[0]["template"]
        print(f"pipellm data: {data.summary()}; template {template}", file=sys.stderr)
        print(f"pipellm: {schedule.steps_per_epoch[0]} steps/epoch, {total_steps} steps, global batch "
              f"{cfg.global_batch_size} x {cfg.max_seq_len} tokens", file=sys.stderr)

    # Parameters of the whole model: each stage counts its own (a tied copy once), replica 0 only.
    data_rank = model.data_parallel_rank
    local_params = sum(p.numel() for p in model.parameters() if not is_pipeline_replicated(p))
    total_params = all_reduce(torch.tensor([local_params if data_rank == 0 else 0], dtype=torch.float64))
    embedding = hf_config.vocab_size * hf_config.hidden_size
    figures = StepFigures(cfg.global_batch_size, cfg.max_seq_len, topology.world_size(),
                          flops_per_token(hf_config, int(total_params[0]), embedding, cfg.max_seq_len),
                          cfg.peak_flops_per_gpu or device_peak_flops())

    checkpoints = CheckpointWriter(engine, save_path, cfg.model_path, cfg.keep_last_n)
    early_stopping = EarlyStoppingState.from_config(cfg.early_stopping)
    start_step = agree_on_start(resume)
    if resume is not None:
        resume.restore(engine, early_stopping)  # last before the loop: it restores the RNG states
        if is_logger:
            cut_metrics_log(save_path, start_step)
            print(resume.describe(), file=sys.stderr)

    log = MetricsLog(save_path, total_steps, start_step, enabled=is_logger,
                     sinks=open_sinks(cfg, start_step) if is_logger else [])
    timer = StepTimer()
    # Resumed from the checkpoint an early stop saved: the run is already over.
    done, stop_reason = start_step, "early stopping" if early_stopping.should_stop else None
    for step in range(start_step, total_steps):
        if stop_reason:
            break
        input_ids, labels, position_ids, lengths = data.rows_of(schedule.batch(step))
        batches = micro_batches(input_ids, labels, cfg.micro_batch_size, data_rank, cfg.data_degree, position_ids)
        lr, skipped_before = engine.get_lr()[0], engine.skipped_steps  # the lr this step trains at
        # Every collective of the step is watched; checkpoint saves below are not (they may take long).
        with watchdog.watch_step(step + 1):
            loss = engine.train_batch(iter(batches))
            watchdog.enter("the all-reduce of the SIGTERM flag")
            sigterm = stop_signal.agreed()
            seconds = timer.lap()
            done = step + 1
            warning = nonfinite.record(done, float(loss), skipped=engine.skipped_steps > skipped_before)
            if warning and is_logger:
                print(warning, file=sys.stderr)
            record = None
            eval_due = bool(data.eval_rows) and ((cfg.eval_steps and done % cfg.eval_steps == 0)
                                                 or done == total_steps)
            if done % cfg.log_steps == 0 or done == total_steps or eval_due:
                watchdog.enter("the all-reduce of the stages' peak memory")
                record = figures.record(step=done, epoch=schedule.locate(step)[0], loss=loss, lr=lr,
                                        grad_norm=engine.get_global_grad_norm(), tokens=int(lengths.sum()),
                                        seconds=seconds, elapsed=timer.elapsed,
                                        peak_mem_gib_per_stage=_stage_peak_memory(model))
            improved = False
            if eval_due:
                eval_loss = evaluate(engine, data, cfg, data_rank)
                record.update(eval_loss=eval_loss, eval_ppl=perplexity(eval_loss))
                improved = early_stopping.update(eval_loss, done)
        log.step(record)
        if nonfinite.exhausted:  # on every rank alike: the skip decision and the loss are the same everywhere
            checkpoints.save(done, trainer_state(engine, model, early_stopping))
            log.close()
            raise PipellmError(nonfinite.stop_message(save_path / f"global_step{done}"))
        stop_reason = "early stopping" if early_stopping.should_stop else "SIGTERM" if sigterm else None
        if (improved or stop_reason or (cfg.save_steps and done % cfg.save_steps == 0)
                or (cfg.save_final and done == total_steps)):
            checkpoints.save(done, trainer_state(engine, model, early_stopping), best=improved)
    log.close()
    if gpu_profile:
        gpu_profile.finish()
    if is_logger and stop_reason:
        print(stopped_message(stop_reason, done, save_path, early_stopping), file=sys.stderr)
    elif is_logger:
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


def _stage_peak_memory(model) -> list[float]:
    """Peak memory (GiB) per pipeline stage, the maximum over its data-parallel replicas."""
    import deepspeed.comm as dist

    per_stage = torch.zeros(model.num_stages, dtype=torch.float64)
    per_stage[model.stage_id] = peak_memory_gib()
    return [round(x, 3) for x in all_reduce(per_stage, dist.ReduceOp.MAX).tolist()]


def main(argv=None) -> None:
    try:
        with run_owns_process_group():
            cfg, hf_config, family = prepare(argv)
            train(cfg, hf_config, family)
    except PipellmError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
