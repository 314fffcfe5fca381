"""The typed schema of pipellm's keys in the training YAML: one dataclass per section, a docstring per field.

Choice fields are ``Literal`` types, so the loader (``pipellm.config.load``) rejects a value outside them with the
list of choices; ``Annotated`` adds the wording of a type whose plain name would read badly in an error.
"""
from __future__ import annotations

import dataclasses
from typing import Annotated, ClassVar, Literal

from pipellm.config.deepspeed_keys import DeepSpeedSettings

Template = Literal["auto", "builtin", "chat"]
Overlong = Literal["truncate", "drop"]
AttentionBackend = Literal["auto", "sdpa", "flex"]
Axes = Annotated[list[Literal["pipe", "data"]], "[pipe, data] or [data, pipe]"]
Parts = Annotated[list[int] | Literal["uniform", "parameters", "auto"],
                  "a list of layer counts, `uniform`, `parameters` or `auto`"]


@dataclasses.dataclass
class ProcessTopology:
    """How the world's processes are arranged: ``dims[i]`` processes along ``axes[i]``."""

    axes: Axes = dataclasses.field(default_factory=lambda: ["pipe", "data"])
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
    parts: Parts = "uniform"
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


@dataclasses.dataclass
class LRSchedule:
    """pipellm's learning-rate schedule around the peak ``optimizer.params.lr``: linear warmup, then decay to
    ``min_lr_ratio`` of the peak, reached at the run's last step (the run's steps: ``n_epochs`` or ``max_steps``)."""

    warmup_steps: int = 0
    """Steps of linear warmup: the s-th step (1-based) of the warmup trains at lr * s / warmup_steps."""
    decay: Literal["constant", "linear", "cosine"] = "constant"
    """After the warmup: ``constant``, ``linear`` or ``cosine`` (down to lr * min_lr_ratio at the last step)."""
    min_lr_ratio: float = 0.0
    """The last step's learning rate as a share of the peak (``linear`` and ``cosine`` decay)."""


@dataclasses.dataclass
class Lora:
    """LoRA (peft's LoRA layers): the base model is frozen and only low-rank adapters on the decoder's linear
    modules train, plus the modules of ``modules_to_save``. Checkpoints hold the adapters, their optimizer state
    and the base model's path; ``convert_model.py pp_to_hg`` merges them into the base or, with
    ``--lora-export adapter``, writes a PEFT adapter directory."""

    r: int = 16
    """The adapters' rank (> 0)."""
    alpha: float = 32.0
    """The scale: an adapter adds ``alpha / r * B @ A`` to its module's weight (peft's ``lora_alpha``)."""
    dropout: float = 0.0
    """Dropout on an adapter's input (peft's ``lora_dropout``), in [0, 1)."""
    target_modules: list[str] = dataclasses.field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    """Decoder linear modules that get an adapter, by their name in the family's checkpoint keys (llama
    ``q_proj`` ... ``down_proj``; bloom and chatglm ``query_key_value``, ``dense``, ``dense_h_to_4h``,
    ``dense_4h_to_h``; baichuan ``W_pack``, ``o_proj``, ...; mixtral ``q_proj`` ... and the experts' ``w1``,
    ``w2``, ``w3``). A name the family's decoder does not have is an error listing the ones it has."""
    modules_to_save: list[Literal["embed", "norm", "head"]] = dataclasses.field(default_factory=list)
    """Pipeline layers trained fully besides the adapters: ``embed``, ``norm`` (the final norm), ``head``. With
    tied embeddings ``embed`` and ``head`` are the one shared weight."""


@dataclasses.dataclass
class DPO:
    """``objective: dpo``: direct preference optimisation on ``preference`` records (``pipellm.pipeline.preference``)."""

    beta: float = 0.1
    """How far the policy may move from the reference: the reward of an answer is ``beta`` times its log-prob
    gain over the reference. Must be > 0."""
    loss: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    """``sigmoid`` (DPO's -log sigmoid of the reward margin), ``ipo`` (squared distance of the log-ratio margin
    from 1/(2 beta)) or ``hinge`` (relu(1 - margin), SLiC)."""
    label_smoothing: float = 0.0
    """``sigmoid`` only: the assumed share of pairs whose preference is flipped (conservative DPO), in [0, 0.5)."""
    reference: str = "initial"
    """The reference model: ``initial`` (the weights the run starts from) or a pipeline checkpoint directory
    (``hg_to_pp`` output, a training save directory or ``global_stepN``). Its log-probs are computed once before
    training and cached in ``save_path/reference_logps/`` (``pipellm.training.reference``). With ``lora:``,
    ``initial`` is the base with the adapters off, and a path must be a full checkpoint (not a LoRA save)."""


@dataclasses.dataclass
class Reward:
    """``objective: reward``: a reward model trained on ``preference`` records (``pipellm.pipeline.reward``); the
    model is a reward checkpoint (``convert_model.py hg_to_pp --init-reward-head``)."""

    margin: float = 0.0
    """The score gap the chosen answer should have over the rejected one: the loss is
    ``-log sigmoid(r_chosen - r_rejected - margin)``, the same for every pair. Must be >= 0."""


@dataclasses.dataclass
class Speed:
    """Optional faster paths of the pipeline stage, each off by default until ``benchmarks/stage_levers.py`` has
    measured it on a GPU (before/after tables: ``benchmarks/results/stage_levers_*``). Pipeline
    training only."""

    liger_kernels: bool = False
    """Decoder RMSNorm, SwiGLU and rotary (llama and the families built from its modules) through liger-kernel's
    Triton kernels (``pip install 'pipellm[liger]'``; CUDA only; not with ``pipeline_schedule: zb-h1``). Compared
    with the torch path by ``tests/test_speed_gpu.py`` (passed on an H100)."""
    loss_kernel: Literal["torch", "compiled", "liger"] = "torch"
    """The last stage's cross entropy: ``torch`` (``F.cross_entropy`` on an fp32 copy of the logits, or
    ``loss_chunk_tokens`` chunks), ``compiled`` (the same, ``torch.compile``d: the upcast is fused into the loss
    kernels, so no fp32 copy of the logits is written) or ``liger`` (liger-kernel's fused linear + cross entropy:
    the logits never exist whole; CUDA only). ``objective: token_mean`` only; not with ``loss_chunk_tokens``.
    ``compiled`` on one H100 (``benchmarks/results/rotary_tables_h100/``): +1.0% and +2.8% at seq 4096, micro batch
    4 (4.5 GiB less), but -4.7% at seq 2048, micro batch 8: measure it on your shape."""
    sdpa_backend: Literal["auto", "cudnn", "flash", "efficient", "math"] = "auto"
    """The one SDPA kernel attention uses on CUDA (an error if it cannot serve the shape or mask); ``auto``: torch's
    choice (with ``use_flash_attn`` the fused kernels, cuDNN first). Attention the flash-attn package or
    FlexAttention serves (``use_flash_attn`` with flash-attn installed, ``attention_backend: flex``) does not use
    SDPA."""
    fewer_host_syncs: bool = False
    """No host-device synchronisation per micro batch, so the host queues the next micro batch's kernels while the
    GPU runs: a step's micro batches are copied to the GPU at once (pinned, non-blocking) instead of DeepSpeed
    copying each from pageable memory as it loads it (a copy that waits for the GPU to drain), and DeepSpeed's
    throughput timer, which synchronises the device at every forward pass and which pipellm does not read, is
    turned off (unless the YAML sets DeepSpeed's ``timers`` itself)."""


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
    """JSON list or JSONL file(s) of training records, of the five formats (README, ``pipellm/data/records.py``);
    a directory stands for its ``*.json`` and ``*.jsonl`` files, sorted by name. An empty file is an error."""
    data_weights: list[float] | None = None
    """Mixing weight of each ``data_path`` entry (a directory's files share its weight): per epoch, ``floor(w)``
    copies of each sample of the file plus a fresh random ``frac(w)`` share of them (2: every sample twice; 0.3: a
    different 30% each epoch)."""
    eval_data_path: str | list[str] | None = None
    """File(s) of held-out records: the eval loss (mean over their labelled tokens) is logged."""
    eval_ratio: float = 0.0
    """Instead of ``eval_data_path``: hold out this share of each data file (seeded by ``seed``)."""
    eval_steps: int = 0
    """Evaluate every this many steps (and always at the end when there is eval data); 0: only at the end."""
    max_seq_len: int = 512
    """Tokens per row; longer samples are truncated or dropped (``overlong``), shorter rows right-padded."""
    template: Template = "auto"
    """Prompt template: ``auto`` (the tokenizer's chat template if it has one, else the built-in templates),
    ``builtin`` or ``chat``; with ChatGLM3's tokenizer ``auto`` and ``chat`` mean ChatGLM3's own format
    (``[gMASK]sop``, role tokens). The chat CLI prompts with the same one."""
    packing: bool = False
    """Pack several samples into each ``max_seq_len`` row; attention never crosses samples and positions restart
    per sample (per-token losses equal those of each sample alone). Otherwise one sample per padded row."""
    overlong: Overlong = "truncate"
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
    attention_backend: AttentionBackend = "auto"
    """Attention that needs a mask (``packing: true`` rows, ALiBi of bloom and baichuan2-13b) when flash-attn does
    not serve it: ``flex`` (torch's FlexAttention with a document block mask: no dense mask, blocks of other samples
    skipped; GPUs only, it has no backward on CPU), ``sdpa`` (torch SDPA with a dense seq x seq mask) or ``auto``
    (``flex`` on CUDA, ``sdpa`` on CPU). Unpacked rows without ALiBi always use SDPA's fused causal kernels.
    Pipeline training only (``train_ds_zero.py`` runs transformers' attention)."""
    compile_layers: bool | None = None
    """``torch.compile`` each decoder layer: fuses the norms, rotary and SwiGLU (llama-7b on 2 H200s: 41% -> 50%
    MFU, less memory); the first step pays the compile. Default (null): on for GPUs, off on CPU. Under
    ``pipeline_schedule: zb-h1`` each linear layer stays out of the compiled graphs, so that W can run its weight
    gradient alone (``pipellm.pipeline.split_backward``)."""
    loss_chunk_tokens: int | None = None
    """Compute the output projection and the loss this many tokens at a time (e.g. 4096), so the last stage
    never holds a whole micro batch's logits (tokens x vocab x 12 bytes with bf16 weights: 12.6 GB for llama-7B
    at 32k tokens); the backward recomputes each chunk's logits (one more forward matmul of the head). For long
    sequences. Default (null): the whole micro batch at once. Pipeline training only."""
    objective: str = "token_mean"
    """What training minimises, for both engines: ``token_mean`` (cross entropy averaged over every labelled token
    of the global batch), ``dpo`` (on ``preference`` records; see ``dpo``), ``reward`` (a reward model on ``preference``
    records; see ``reward``), or ``module:attribute`` naming a callable that takes this config and returns an
    objective (``pipellm.pipeline.loss.Objective``), its module importable on every rank (e.g. on PYTHONPATH)."""
    dpo: DPO = dataclasses.field(default_factory=DPO)
    """Settings of ``objective: dpo``; see ``DPO``."""
    reward: Reward = dataclasses.field(default_factory=Reward)
    """Settings of ``objective: reward``; see ``Reward``."""
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
    lock_stale_after_s: float = 600.0
    """The run lock (``save_path/run.lock``, one run per ``save_path``) of a run on another host counts as gone,
    and is taken over, after this many seconds without its heartbeat (refreshed every tenth of it); a lock of
    this host is taken over as soon as its process is gone."""
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
    profile_steps: list[int] | None = None
    """``[first, last]``: record training steps ``first`` to ``last`` (1-based, inclusive) with ``torch.profiler``
    on every rank, then write ``save_path/profile/rank<r>.trace.json`` (a Chrome trace) and ``rank<r>.kinds.md``
    / ``.csv`` (device time per step by kernel kind: matmul, attention, compiled elementwise, loss, copies,
    collectives, idle; ``pipellm.observe.step_profile``). Off by default: the steps it records run slower."""
    no_weight_decay: list[str] = dataclasses.field(default_factory=lambda: list(NO_WEIGHT_DECAY))
    """Regular expressions (Python ``re.search``) on parameter names as in the Hugging Face checkpoint
    (``model.layers.3.input_layernorm.weight``, also in ``train_ds_zero.py``): a parameter matching any of them
    gets no weight decay. Default: biases and norm weights of every supported family (``NO_WEIGHT_DECAY``)."""
    lr_schedule: LRSchedule = dataclasses.field(default_factory=LRSchedule)
    """Warmup and decay of the learning rate; see ``LRSchedule``. Not together with DeepSpeed's ``scheduler``."""
    max_nonfinite_steps: int = 3
    """After this many optimizer steps in a row skipped for a non-finite loss or gradients, save a checkpoint
    and stop with an error (a skipped step changes nothing: weights, optimizer state and schedule stay)."""
    deepspeed: dict = dataclasses.field(default_factory=dict)
    """The DeepSpeed keys of the file, passed to ``deepspeed.initialize`` (batch sizes completed)."""
    lora: Lora | None = None
    """LoRA fine-tuning (see ``Lora``); null (default): every parameter trains."""
    quantize_base: Literal["nf4"] | None = None
    """With ``lora``: ``nf4`` stores the frozen base's decoder linear weights in 4 bits (QLoRA, bitsandbytes'
    ``Linear4bit``; needs a GPU where bitsandbytes runs). null: the base keeps the run's precision."""
    pipeline_schedule: Literal["1f1b", "zb-h1"] = "1f1b"
    """How the stages order their passes over a step's micro batches (``pipellm.pipeline.schedule``): ``1f1b``
    (DeepSpeed's one-forward-one-backward) or ``zb-h1`` (zero-bubble ZB-H1: each backward split into the input
    gradient, sent upstream at once, and the weight gradients, deferred into the bubble; same gradients as 1F1B,
    proven on CPU; its speed on GPUs is not measured yet; the later stages hold more activations than with 1F1B).
    ``zb-h1`` needs fp32 or bf16 and ZeRO stage 0 or 1. Pipeline training only (``train_ds.py``).
    ``python -m pipellm.plan --schedule zb-h1`` simulates both."""
    speed: Speed = dataclasses.field(default_factory=Speed)
    """Optional faster paths of the pipeline stage (see ``Speed``), all off by default."""
    source: ClassVar[str] = "the training YAML"
    """The file the config was read from (``load_config`` sets it; not a key), named by errors found later."""

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

    def layers_compiled(self, on_gpu: bool) -> bool:
        """``compile_layers`` resolved: null is on for GPUs."""
        if self.compile_layers is not None:
            return self.compile_layers
        return on_gpu


