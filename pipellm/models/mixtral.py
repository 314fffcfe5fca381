"""Mixtral: llama's attention and norms with a sparse mixture-of-experts MLP (softmax router, top-k experts with
renormalised weights, SwiGLU experts), and the router load-balancing loss.

Parameters are named as in Mixtral checkpoint files: ``block_sparse_moe.gate`` and one module per expert,
``block_sparse_moe.experts.E.w1/w2/w3`` (w1 gate, w3 up, w2 down). transformers 5 fuses the experts into 3-D
tensors in memory, but writes and reads this per-expert layout in files, so a pipeline layer file is the
checkpoint's tensors with the prefix removed, copied bit for bit both ways.

Load-balancing loss. transformers (``load_balancing_loss_func``, no attention mask) computes, over the router
logits of every layer and token of its batch,
``aux = E * sum_e (count_e / R) * (prob_e / R)``: ``count_e`` how often expert e is among a token's top-k,
``prob_e`` the sum of e's router probability, ``R`` the number of (layer, token) rows. It is a product of two
averages, so it is not a sum of per-layer losses: each decoder returns its layer's ``[count; prob]`` sums, the
pipeline adds them up over the layers of a micro batch, and ``router_aux_loss`` turns the total into
``router_aux_loss_coef * aux`` for that micro batch (``pipellm.pipeline.token_mean_loss`` documents how the micro
batches combine). It is always added, whatever ``output_router_logits`` says (the released config.json files say
false, which transformers uses to skip it at inference); set ``router_aux_loss_coef: 0`` to train without it.
Like transformers called without an attention mask, every position of a row counts, padding included.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipellm.models.attention import AttentionOptions
from pipellm.errors import PipellmError
from pipellm.models.base import ModelFamily, Supported
from pipellm.models.llama import (KEY_MAP, ROPE_TYPE, SILU, LlamaAttention, LlamaEmbedding, LlamaFinalNorm, LlamaHead,
                                  RMSNorm, RotaryEmbedding)


SUPPORTED_CONFIG = (
    Supported("router_jitter_noise", (0,), "the released mixtral checkpoints use 0"),
    Supported("tie_word_embeddings", (False,), "released checkpoints are untied, and only an untied head carries the "
                                               "router statistics"),
    SILU, ROPE_TYPE)


def check_sliding_window(config, config_path) -> None:
    window = getattr(config, "sliding_window", None)
    if window is not None and window < config.max_position_embeddings:
        raise PipellmError(f"{config_path}: sliding_window {window} is shorter than max_position_embeddings "
                           f"{config.max_position_embeddings}; pipellm's mixtral attends to the whole causal "
                           f"context, so set sliding_window to null")


class MixtralExpert(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MixtralSparseMoe(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(config.hidden_size, config.num_local_experts, bias=False)
        self.experts = nn.ModuleList(MixtralExpert(config) for _ in range(config.num_local_experts))

    # Each expert's token count changes every step: compiled with static shapes (``compile_layers``), the block
    # would recompile for every new count, so it runs eagerly between the compiled attention parts.
    @torch.compiler.disable
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(output, stats)``; ``stats`` is ``[2, E]`` fp32: top-k counts and summed router probabilities."""
        flat = x.reshape(-1, x.shape[-1])
        probs = F.softmax(self.gate(flat).float(), dim=-1)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(flat)
        for index, expert in enumerate(self.experts):
            # Every expert runs, on no tokens if none chose it, so each has a gradient (zero) every step.
            token, slot = torch.where(chosen == index)
            routed = expert(flat[token]) * weights[token, slot, None]
            out.index_add_(0, token, routed.to(out.dtype))
        counts = F.one_hot(chosen, len(self.experts)).sum(dim=(0, 1)).float()
        return out.view_as(x), torch.stack((counts, probs.sum(dim=0)))


class MixtralDecoderLayer(nn.Module):
    def __init__(self, config, attention: AttentionOptions = AttentionOptions()):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, attention)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.block_sparse_moe = MixtralSparseMoe(config)
        self.rotary = RotaryEmbedding(config)

    def forward(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.rotary(position_ids, hidden.dtype)
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin, position_ids)
        moe, stats = self.block_sparse_moe(self.post_attention_layernorm(hidden))
        return hidden + moe, stats


def router_aux_loss(stats: torch.Tensor, config) -> torch.Tensor:
    """``router_aux_loss_coef`` times transformers' load-balancing loss, from the layer-summed ``stats``."""
    counts, probs = stats
    rows = counts.sum() / config.num_experts_per_tok  # (layer, token) rows: each row made top-k choices
    balance = config.num_local_experts * torch.sum((counts / rows) * (probs / rows))
    return config.router_aux_loss_coef * balance


FAMILY = ModelFamily(
    name="mixtral",
    sequence_classification="MixtralForSequenceClassification",
    embed=LlamaEmbedding,
    decoder=MixtralDecoderLayer,
    norm=LlamaFinalNorm,
    head=LlamaHead,
    key_map=KEY_MAP,  # Mixtral's files use llama's names outside the experts
    tied_weight="weight",
    # mixtral-8x7b (32 decoder layers + embedding + head = 34): 4 decoder layers per stage; the 32k-vocab head
    # costs about a third of a (top-2) decoder layer, so the end stages carry the embedding and the head.
    default_parts={8: [5, 4, 4, 4, 4, 4, 4, 5], 4: [9, 8, 8, 9], 2: [17, 17]},
    ignored_hf_keys=(r"rotary_emb\.inv_freq$",),
    supported_config=SUPPORTED_CONFIG,
    check_key_relations=check_sliding_window,
    aux_loss=router_aux_loss,
)
