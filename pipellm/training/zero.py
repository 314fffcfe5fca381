"""``deepspeed train_ds_zero.py --config X.yml``: the DeepSpeed ZeRO-3 baseline that pipellm is measured against.

The same YAML format, data layer (``pipellm.data.batches``: mixing, packing, eval split, global batch order) and loss
as ``train_ds.py``, so the two runs compute the same objective (cross entropy averaged over every labelled token
of the global batch) and differ only in how the model is spread over the GPUs:

* ``model_path`` is a **Hugging Face model directory** here (not a ``convert_model.py hg_to_pp`` output): the
  transformers class of its ``config.json`` is built under ``deepspeed.zero.Init`` (transformers' ZeRO-3 hooks,
  see ``ZeroInitConfig``), so each parameter is partitioned as it is created and no process materialises the
  whole model; transformers' ZeRO-3 loader fills the partitions module by module from the safetensors files,
  which rank 0 memory-maps. ``from_scratch: true`` initialises from ``config.json`` instead (transformers'
  initialisation, seeded by ``seed``).
* Every ``model_type`` transformers has a causal-LM class for works; models that need remote code do not
  (pipellm never sets ``trust_remote_code``). The loss is the language-model loss only: a mixture-of-experts
  model's router load-balancing term, which the pipeline's mixtral adds, is not.
* ZeRO-3 is data parallel only: ``model_topo.process_topology.dims`` must be ``[1, N]`` on N GPUs, which also
  makes the YAML's batch sizes mean what they mean for the pipeline (train = micro x accumulation x N).
* ``zero_optimization`` defaults to ``{stage: 3}``; its keys, ZeRO++ ones included
  (``zero_quantized_weights``, ``zero_hpz_partition_size``, ``zero_quantized_gradients``), pass through.
* The optimizer is pipellm's (``pipellm.training.optim``: torch's fused AdamW, or Lion), stepped by ZeRO on each rank's
  flat fp32 partition: the same update rule as the pipeline and no JIT-compiled DeepSpeed op at start-up.
* ``use_grad_ckpt`` and ``use_flash_attn`` map to transformers' gradient checkpointing and attention
  implementation; ``compile_layers`` is not supported. Packed rows need no mask: transformers turns position
  ids that restart at 0 into a block-diagonal causal mask, so attention stays within each sample.

Checkpoints are DeepSpeed's ZeRO format (``save_path/global_step<N>/`` plus the model's config and tokenizer);
``python save_path/zero_to_fp32.py save_path OUT_DIR`` (written there by DeepSpeed) gathers the weights.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from pipellm.data.batches import Schedule, load_training_data, micro_batches
from pipellm.config import DeepSpeedSettings, TrainConfig, dump_resolved, load_config, parse_launcher_args, validate_environment
from pipellm.training.distributed import (all_reduce, config_hash, data_fingerprint, init_process_group,
                                 run_owns_process_group, verify_same_run)
from pipellm.errors import PipellmError
from pipellm.observe.gpu_profile import start_gpu_profile
from pipellm.observe.metrics import (MetricsLog, StepFigures, StepTimer, device_peak_flops, flops_per_token, peak_memory_gib,
                             perplexity)
from pipellm.training.optim import build_lr_scheduler, build_optimizer, zero_settings
from pipellm.observe.run_info import write_run_info
from pipellm.observe.sinks import open_sinks

HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


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


def prepare(argv=None) -> tuple[TrainConfig, object]:
    """Everything that can fail on bad input, done before any process group work."""
    args = parse_launcher_args("Train a Hugging Face model with DeepSpeed ZeRO-3 (the baseline).", argv)
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
    if cfg.pipe_degree != 1:
        raise PipellmError(f"`model_topo.process_topology.dims` is {cfg.model_topo.process_topology.dims}; "
                           f"train_ds_zero.py is data parallel only: use [1, N] for N GPUs")
    if cfg.resume is not None or cfg.early_stopping.patience:
        raise PipellmError("`resume` and `early_stopping` are pipeline training's (train_ds.py); train_ds_zero.py "
                           "does not resume or stop early: remove them")
    for key in ("compile_layers", "loss_chunk_tokens"):
        if getattr(cfg, key):
            raise PipellmError(f"`{key}` is not supported by train_ds_zero.py; remove it or set it to null")
    stage = cfg.deepspeed.setdefault("zero_optimization", {}).setdefault("stage", 3)
    if stage != 3:
        raise PipellmError(f"`zero_optimization.stage` is {stage}; train_ds_zero.py is the ZeRO-3 baseline: "
                           f"set it to 3 or remove it")
    validate_environment(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    return cfg, read_hf_config(cfg.model_path)


def attention_implementation(use_flash_attn: bool) -> str:
    """The flash-attn package's kernel where asked for and usable, else torch SDPA (which on GPUs picks its fused
    flash / cuDNN kernels for causal attention without a mask, as the pipeline's ``use_flash_attn`` does)."""
    if use_flash_attn and torch.cuda.is_available():
        from pipellm.models.attention import flash_attn_func

        if flash_attn_func() is not None:
            return "flash_attention_2"
    return "sdpa"


class ZeroInitConfig:
    """What transformers' ZeRO-3 hooks read (``is_zero3()``, ``config``) through the weak reference that
    ``set_hf_deepspeed_config`` registers. transformers' own ``HfDeepSpeedConfig`` needs the accelerate package
    for nothing more; with this, ``from_config``/``from_pretrained`` build the model under ``deepspeed.zero.Init``
    and load (or initialise) weights partition by partition."""

    def __init__(self, ds_config: dict):
        self.config = ds_config

    def is_zero3(self) -> bool:
        return True


def build_model(cfg: TrainConfig, hf_config, ds_config: dict):
    """The transformers model, partitioned as it is created, with the checkpoint's (or fresh) weights."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import set_hf_deepspeed_config, unset_hf_deepspeed_config

    dtype = DeepSpeedSettings.of(ds_config).dtype
    attn = attention_implementation(cfg.use_flash_attn)
    zero_init = ZeroInitConfig(ds_config)
    set_hf_deepspeed_config(zero_init)
    try:
        if cfg.from_scratch:
            torch.manual_seed(cfg.seed)
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation=attn)
        else:
            model = AutoModelForCausalLM.from_pretrained(cfg.model_path, config=hf_config, dtype=dtype,
                                                         attn_implementation=attn)
    finally:
        unset_hf_deepspeed_config()
    if cfg.use_grad_ckpt:
        # The name all transformers 5 releases have (newer ones also call it activation_checkpointing_enable).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def train(cfg: TrainConfig, hf_config) -> None:
    import deepspeed
    import deepspeed.comm as dist
    from pipellm.data.tokenizer import load_tokenizer

    from pipellm.pipeline.loss import token_mean_loss  # the pipeline's loss function: the same objective
    from pipellm.training.resume import CheckpointWriter

    tokenizer = load_tokenizer(cfg.model_path)
    gpu_profile = start_gpu_profile(cfg.save_path, cfg.gpu_profile_interval_s)
    data = load_training_data(cfg, tokenizer, show_progress=int(os.environ.get("LOCAL_RANK", "0")) == 0)

    init_process_group(cfg.collective_timeout_s)
    on_gpu = torch.cuda.is_available()
    config_digest, data_key = config_hash(dump_resolved(cfg)), data_fingerprint(cfg.data_paths)
    verify_same_run(config_digest, data_key)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if on_gpu else "cpu")

    ds_config = dict(cfg.deepspeed)
    ds_config.setdefault("steps_per_print", 10**9)  # pipellm logs; keep DeepSpeed's own step lines quiet
    # pipellm's optimizers are plain torch optimizers that ZeRO steps on its flat fp32 partitions (CPU ones too).
    ds_config.update(zero_settings(ds_config))
    model = build_model(cfg, hf_config, ds_config)
    optimizer = build_optimizer(model.named_parameters(), ds_config.pop("optimizer", None), cfg.no_weight_decay)
    schedule = Schedule(data.plan, cfg.n_epochs, cfg.max_steps)
    total_steps = schedule.total_steps
    lr_scheduler = None if "scheduler" in ds_config else build_lr_scheduler(optimizer, total_steps, cfg.lr_schedule)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                           config=ds_config)

    save_path = Path(cfg.save_path)
    is_logger = rank == 0
    write_run_info(cfg, data, config_digest=config_digest, data_key=data_key,
                   layout={"zero_stage": 3, "dims": cfg.model_topo.process_topology.dims},
                   coordinates={"replica": rank})
    if is_logger:
        save_path.mkdir(parents=True, exist_ok=True)
        print(f"pipellm data: {data.summary()}", file=sys.stderr)
        print(f"pipellm zero3: {schedule.steps_per_epoch[0]} steps/epoch, {total_steps} steps, global batch "
              f"{cfg.global_batch_size} x {cfg.max_seq_len} tokens over {world_size} ranks", file=sys.stderr)

    # ZeRO-3 leaves each rank a slice of every parameter; ds_numel is the whole parameter's size.
    num_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    embedding = hf_config.vocab_size * hf_config.hidden_size
    figures = StepFigures(cfg.global_batch_size, cfg.max_seq_len, world_size,
                          flops_per_token(hf_config, num_params, embedding, cfg.max_seq_len),
                          cfg.peak_flops_per_gpu or device_peak_flops())

    def global_batch_loss(input_ids, labels, position_ids, train_step: bool) -> float:
        """This rank's micro batches of one global batch (forward, and backward + step when training); returns
        the pipeline engine's figure: the mean over micro batches and ranks of the scaled token-sum losses,
        which is the mean cross entropy over the global batch's labelled tokens."""
        batches = micro_batches(input_ids, labels, cfg.micro_batch_size, rank, world_size, position_ids)
        total = torch.zeros((), dtype=torch.float32, device=device)
        for (ids, positions), (targets, loss_scale) in batches:
            with torch.set_grad_enabled(train_step):
                # No attention mask and no KV cache: transformers then reads packed samples off the restarting
                # position ids and keeps attention within each of them.
                logits = engine(input_ids=ids.to(device), position_ids=positions.to(device), use_cache=False).logits
                loss = token_mean_loss(logits, (targets.to(device), loss_scale.to(device)))
            if train_step:
                # backward divides by the accumulation steps and ZeRO averages gradients over the ranks, as the
                # pipeline engine does; step() updates the weights after the last micro batch only.
                engine.backward(loss)
                engine.step()
            total += loss.detach().float()
        return float(all_reduce(total.reshape(1))[0]) / (len(batches) * world_size)

    def evaluate() -> float:
        """Mean cross entropy over every labelled token of the eval rows, as ``pipellm.train.evaluate``."""
        engine.eval()
        total, count = 0.0, 0
        for input_ids, labels, position_ids, _ in data.eval_batches(cfg.global_batch_size):
            labelled = int((labels[:, 1:] != -100).sum())
            total += global_batch_loss(input_ids, labels, position_ids, train_step=False) * labelled
            count += labelled
        engine.train()
        return total / max(count, 1)

    checkpoints = CheckpointWriter(engine, save_path, cfg.model_path, cfg.keep_last_n)
    log = MetricsLog(save_path, total_steps, 0, enabled=is_logger, sinks=open_sinks(cfg) if is_logger else [])
    timer = StepTimer()
    for step in range(total_steps):
        input_ids, labels, position_ids, lengths = data.rows_of(schedule.batch(step))
        lr = engine.get_lr()[0]  # the lr this step trains at (the scheduler moves on after it)
        loss = global_batch_loss(input_ids, labels, position_ids, train_step=True)
        seconds = timer.lap()
        done = step + 1
        record = None
        eval_due = bool(data.eval_rows) and ((cfg.eval_steps and done % cfg.eval_steps == 0) or done == total_steps)
        if done % cfg.log_steps == 0 or done == total_steps or eval_due:
            memory = float(all_reduce(torch.tensor([peak_memory_gib()], dtype=torch.float64),
                                       dist.ReduceOp.MAX)[0])
            # One "stage" (the whole model), the maximum over its data-parallel ranks, as for the pipeline.
            record = figures.record(step=done, epoch=schedule.locate(step)[0], loss=loss, lr=lr,
                                    grad_norm=engine.get_global_grad_norm(), tokens=int(lengths.sum()),
                                    seconds=seconds, elapsed=timer.elapsed, peak_mem_gib_per_stage=[round(memory, 3)])
        if eval_due:
            eval_loss = evaluate()
            record.update(eval_loss=eval_loss, eval_ppl=perplexity(eval_loss))
        log.step(record)
        if (cfg.save_steps and done % cfg.save_steps == 0) or (cfg.save_final and done == total_steps):
            checkpoints.save(done, trainer_state=None)  # not resumable: the ZeRO baseline does not resume
    log.close()
    if gpu_profile:
        gpu_profile.finish()
    if is_logger:
        saved = (f"; checkpoint {save_path}/global_step{total_steps} (weights: python {save_path}/zero_to_fp32.py "
                 f"{save_path} OUT_DIR)") if cfg.save_final else ""
        print(f"pipellm zero3: done, {total_steps} steps in {timer.elapsed:.1f}s{saved}", file=sys.stderr)


def main(argv=None) -> None:
    try:
        with run_owns_process_group():
            cfg, hf_config = prepare(argv)
            train(cfg, hf_config)
    except PipellmError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
