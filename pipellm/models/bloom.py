"""Bloom: embedding with its own LayerNorm, pre-norm decoder blocks (LayerNorm with biases, ALiBi attention with
a fused ``query_key_value`` interleaved per head, GELU-tanh MLP), final LayerNorm, head tied to the embedding.

Module and parameter names follow transformers' ``BloomForCausalLM``, so a pipeline layer's state dict is the
checkpoint's keys with the prefixes of ``KEY_MAP`` removed; ``query_key_value`` stays one fused tensor, as in
the checkpoint, and is split in ``forward``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipellm.models.attention import AttentionOptions, causal_attention
from pipellm.models.base import KeyMap, ModelFamily


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi's per-head slopes (Press et al.): a geometric sequence from 2^(-8/n) for n a power of two; otherwise
    those of the largest power of two below n_heads, then every other slope of twice that many heads."""
    closest = 2 ** math.floor(math.log2(n_heads))
    # Powers taken in fp32, as the reference implementations do, so the slopes agree to the bit.
    slopes = torch.pow(torch.tensor(2.0 ** (-8.0 / closest)), torch.arange(1, closest + 1))
    if closest < n_heads:
        extra = torch.pow(torch.tensor(2.0 ** (-4.0 / closest)), torch.arange(1, 2 * (n_heads - closest), 2))
        slopes = torch.cat([slopes, extra])
    return slopes


class AlibiSlopes:
    """Per-head ALiBi slopes in fp32 on the device of the positions.

    Not a buffer, for the reason ``llama.RotaryEmbedding`` is not: DeepSpeed would cast it to bf16/fp16.
    """

    def __init__(self, n_heads: int):
        self.slopes = alibi_slopes(n_heads)

    def __call__(self, device: torch.device) -> torch.Tensor:
        if self.slopes.device != device:
            self.slopes = self.slopes.to(device)
        return self.slopes


class BloomAttention(nn.Module):
    def __init__(self, config, attention: AttentionOptions):
        super().__init__()
        self.n_heads = config.n_head
        self.head_dim = config.hidden_size // self.n_heads
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=True)
        self.attention = attention
        self.alibi = AlibiSlopes(self.n_heads)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = x.shape
        # The fused rows are laid out head by head, [q; k; v] within each head.
        qkv = self.query_key_value(x).view(batch, seq, self.n_heads, 3, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(3))
        out = causal_attention(q, k, v, self.attention, position_ids, alibi_slopes=self.alibi(x.device))
        return self.dense(out.reshape(batch, seq, hidden))


class BloomMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 4 * config.hidden_size)
        self.dense_4h_to_h = nn.Linear(4 * config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate="tanh"))


class BloomBlock(nn.Module):
    def __init__(self, config, attention: AttentionOptions = AttentionOptions()):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.self_attention = BloomAttention(config, attention)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = BloomMLP(config)
        # False for every released Bloom; honoured so that a checkpoint trained with it means the same here.
        self.residual_post_norm = bool(getattr(config, "apply_residual_connection_post_layernorm", False))

    def forward(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        normed = self.input_layernorm(hidden)
        hidden = (normed if self.residual_post_norm else hidden) + self.self_attention(normed, position_ids)
        normed = self.post_attention_layernorm(hidden)
        return (normed if self.residual_post_norm else hidden) + self.mlp(normed)


class BloomEmbedding(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.word_embeddings_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings_layernorm(self.word_embeddings(input_ids))


class BloomFinalNorm(nn.LayerNorm):
    def __init__(self, config):
        super().__init__(config.hidden_size, eps=config.layer_norm_epsilon)


class BloomHead(nn.Linear):
    """Only for a config with ``tie_word_embeddings: false``; released Bloom models tie the head."""

    def __init__(self, config):
        super().__init__(config.hidden_size, config.vocab_size, bias=False)


FAMILY = ModelFamily(
    name="bloom",
    sequence_classification="BloomForSequenceClassification",
    embed=BloomEmbedding,
    decoder=BloomBlock,
    norm=BloomFinalNorm,
    head=BloomHead,
    # BloomForCausalLM saves under ``transformer.``; the original bigscience checkpoints (a bare BloomModel)
    # have no prefix at all. Both are read; the first spelling is written.
    key_map=KeyMap(prefixes={"embed": "transformer.", "decoder": "transformer.h.{i}.", "norm": "transformer.ln_f.",
                             "head": "lm_head."},
                   accepted_prefixes={"embed": ("",), "decoder": ("h.{i}.",), "norm": ("ln_f.",)}),
    # DeepSpeed ties whole modules: the last stage's copy of the embedding module also holds a
    # word_embeddings_layernorm, which the tied head does not use. It gets no gradient and is never saved (the
    # tied head has no layer file), so only stage 0's copy is the model's.
    tied_weight="word_embeddings.weight",
    # bloom-7b1 (30 decoder layers, 250k vocabulary): the tied head's logits cost about 4.7 decoder layers of
    # FLOPs, so the last stage holds the head alone; the first stage holds the other copy of the 1B-parameter
    # embedding (with its optimizer state), so it takes fewer decoder layers than the middle stages.
    default_parts={8: [4, 5, 5, 5, 4, 4, 4, 1], 4: [9, 9, 9, 5], 2: [18, 14]},
)
