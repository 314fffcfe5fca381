"""The ZeRO-3 engine (``train_ds_zero.py``, the baseline pipellm is measured against): the transformers model of a
Hugging Face directory, partitioned over every rank as it is created, scored by the pipeline's objective.

transformers' ZeRO-3 hooks (``ZeroInitConfig``) build the model under ``deepspeed.zero.Init`` and fill the
partitions module by module from the safetensors files; ``from_scratch`` initialises from ``config.json``
instead (transformers' initialisation, seeded by ``seed``). The logits go to the same objective the pipeline's
last stage calls, with the same micro batches and loss scale, so both engines minimise the same number.

A reward model (``objective: reward``) is transformers' ``*ForSequenceClassification``; the objective gets the score
of every position (``PositionScores``) as the pipeline's ``ScoreHead`` gives it, and picks each sample's last token
itself, packed rows included.
"""
from __future__ import annotations

import torch

from pipellm.config import DeepSpeedSettings, TrainConfig
from pipellm.pipeline.loss import HeadOutput
from pipellm.training.distributed import all_reduce
from pipellm.training.engine import Engine, EngineSetup
from pipellm.training.parameters import optional_hook


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
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.integrations import set_hf_deepspeed_config, unset_hf_deepspeed_config

    auto_class = AutoModelForSequenceClassification if cfg.objective == "reward" else AutoModelForCausalLM
    dtype = DeepSpeedSettings.of(ds_config).dtype
    attn = attention_implementation(cfg.use_flash_attn)
    zero_init = ZeroInitConfig(ds_config)
    set_hf_deepspeed_config(zero_init)
    try:
        if cfg.from_scratch:
            torch.manual_seed(cfg.seed)
            model = auto_class.from_config(hf_config, dtype=dtype, attn_implementation=attn)
        else:
            model = auto_class.from_pretrained(cfg.model_path, config=hf_config, dtype=dtype,
                                               attn_implementation=attn)
    finally:
        unset_hf_deepspeed_config()
    if cfg.use_grad_ckpt:
        # The name all transformers 5 releases have (newer ones also call it activation_checkpointing_enable).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


class PositionScores:
    """The score of every position of a transformers ``*ForSequenceClassification``: the output of its ``score``
    layer, caught by a forward hook before the classifier pools one position per row (the rightmost non-pad
    token, which in a packed row is only its last sample's)."""

    def __init__(self, model):
        self.caught: torch.Tensor | None = None
        model.get_submodule("score").register_forward_hook(self._catch)

    def _catch(self, module, inputs, output) -> None:
        self.caught = output

    def take(self) -> HeadOutput:
        """The last forward's scores, ``(batch, seq, 1)``, as the logits the reward objective reads."""
        scores, self.caught = self.caught, None
        return HeadOutput(logits=scores)


class ZeroEngine(Engine):
    name = "pipellm zero3"
    export_hint = "(weights: python {save_path}/zero_to_fp32.py {save_path} OUT_DIR)"

    def __init__(self, cfg: TrainConfig, setup: EngineSetup, *, hf_config):
        import deepspeed.comm as dist

        from pipellm.training.optim import zero_settings

        self.hf_config, self.objective = hf_config, setup.objective
        on_gpu = torch.cuda.is_available()
        self.device = torch.device(f"cuda:{torch.cuda.current_device()}" if on_gpu else "cpu")
        # pipellm's optimizers are plain torch optimizers that ZeRO steps on its flat fp32 partitions (CPU ones too).
        ds_config = dict(cfg.deepspeed, **zero_settings(cfg.deepspeed))
        prepare = optional_hook(setup.parameter_set, "prepare_transformers_model", lambda model: model)
        model = prepare(build_model(cfg, hf_config, ds_config))
        super().__init__(cfg, model, list(model.named_parameters()), ds_config, setup)
        # After ZeRO's own hooks: the scores caught are the output it wraps to gather the weight for the backward.
        self.scores = PositionScores(model) if cfg.objective == "reward" else None
        self.replica, self.replicas = dist.get_rank(), dist.get_world_size()
        self.dims = cfg.model_topo.process_topology.dims

    def train_step(self, micro_batches: list) -> float:
        return self._global_batch_loss(micro_batches, train=True)

    def eval_step(self, micro_batches: list) -> float:
        self.ds.eval()
        try:
            return self._global_batch_loss(micro_batches, train=False)
        finally:
            self.ds.train()

    def _global_batch_loss(self, micro_batches: list, train: bool) -> float:
        """Forward (and when training backward + step) of each micro batch; the pipeline engine's figure: the
        mean over micro batches and ranks of the scaled losses, which is the objective of the global batch."""
        device = self.device
        total = torch.zeros((), dtype=torch.float32, device=device)
        for (ids, positions), labels in micro_batches:
            with torch.set_grad_enabled(train):
                # No attention mask and no KV cache: transformers then reads packed samples off the restarting
                # position ids and keeps attention within each of them.
                logits = self.ds(input_ids=ids.to(device), position_ids=positions.to(device), use_cache=False).logits
                output = self.scores.take() if self.scores else HeadOutput(logits=logits)
                loss = self.objective.loss(output, tuple(t.to(device) for t in labels))
            if train:
                # backward divides by the accumulation steps and ZeRO averages gradients over the ranks, as the
                # pipeline engine does; step() updates the weights after the last micro batch only.
                self.ds.backward(loss)
                self.ds.step()
            total += loss.detach().float()
        return float(all_reduce(total.reshape(1))[0]) / (len(micro_batches) * self.replicas)

    def num_parameters(self, trainable_only: bool = False) -> int:
        # ZeRO-3 leaves each rank a slice of every parameter; ds_numel is the whole parameter's size.
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.model.parameters()
                   if p.requires_grad or not trainable_only)

    def run_layout(self) -> dict:
        return {"layout": {"zero_stage": 3, "dims": self.dims}, "coordinates": {"replica": self.replica}}
