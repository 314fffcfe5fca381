"""ChatGLM3 (and chatglm2, same layout): token embedding, pre-norm decoder blocks (RMSNorm, multi-query attention
with a fused biased ``query_key_value``, rotary on interleaved pairs of half of each head's dims, SwiGLU MLP with
a fused ``[gate; up]`` projection), final RMSNorm, untied ``output_layer``.

The checkpoints are made for remote code (``model_type: chatglm``, no transformers class). pipellm never runs it:
``ChatGLMConfig`` reads ``config.json`` with the defaults of chatglm3's ``configuration_chatglm.py``, and the
modules below re-implement ``modeling_chatglm.py``'s maths. Parameter names are the checkpoint's (fused tensors
stay fused and are split in ``forward``), so conversion copies tensors bit for bit.

Not here: the ``[gMASK]sop`` prompt prefix and the role tokens of chatglm's chat format belong to the data layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from pipellm.models import kernels
from pipellm.models.attention import AttentionOptions, causal_attention
from pipellm.models.base import KeyMap, ModelFamily, Supported
from pipellm.models.llama import RMSNorm


class ChatGLMConfig(PretrainedConfig):
    """chatglm's ``config.json`` under the names pipellm reads (``num_hidden_layers``, ``vocab_size``)."""

    model_type = "chatglm"
    attribute_map = {"num_hidden_layers": "num_layers", "vocab_size": "padded_vocab_size"}

    # Defaults of chatglm3's configuration_chatglm.py: a config.json that omits a key means these values.
    def __init__(self, num_layers=28, padded_vocab_size=65024, hidden_size=4096, ffn_hidden_size=13696,
                 kv_channels=128, num_attention_heads=32, seq_length=2048, layernorm_epsilon=1e-5, rmsnorm=True,
                 apply_residual_connection_post_layernorm=False, post_layer_norm=True, add_bias_linear=False,
                 add_qkv_bias=False, multi_query_attention=False, multi_query_group_num=1, rope_ratio=1,
                 tie_word_embeddings=False, **kwargs):
        self.num_layers = num_layers
        self.padded_vocab_size = padded_vocab_size
        self.hidden_size = hidden_size
        self.ffn_hidden_size = ffn_hidden_size
        self.kv_channels = kv_channels
        self.num_attention_heads = num_attention_heads
        self.seq_length = seq_length
        self.layernorm_epsilon = layernorm_epsilon
        self.rmsnorm = rmsnorm
        self.apply_residual_connection_post_layernorm = apply_residual_connection_post_layernorm
        self.post_layer_norm = post_layer_norm
        self.add_bias_linear = add_bias_linear
        self.add_qkv_bias = add_qkv_bias
        self.multi_query_attention = multi_query_attention
        self.multi_query_group_num = multi_query_group_num
        self.rope_ratio = rope_ratio
        self.tie_word_embeddings = tie_word_embeddings
        super().__init__(**kwargs)


# The keys whose other value makes a chatglm1-style block, unlike chatglm2/3's.
CHATGLM1_STYLE = "the other value is a chatglm1-style block; pipellm trains chatglm2/3 checkpoints"
SUPPORTED_CONFIG = tuple(Supported(key, (value,), CHATGLM1_STYLE) for key, value in (
    ("rmsnorm", True), ("apply_residual_connection_post_layernorm", False), ("post_layer_norm", True)))


def head_dim(config) -> int:
    return config.kv_channels or config.hidden_size // config.num_attention_heads


def rotary_buffer(config, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``transformer.rotary_pos_emb.inv_freq`` as chatglm's ``RotaryEmbedding.__init__`` registers it: over a
    quarter of the head dims, computed in the model's dtype. (Its forward recomputes the angles in fp32 with
    ``10000 * rope_ratio`` as the base, as ``ChatGLMRotary`` does; the buffer itself holds the plain base.)"""
    dims = head_dim(config) // 2
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dims, 2).to(dtype=dtype) / dims))
    return {"transformer.rotary_pos_emb.inv_freq": inv_freq}


class ChatGLMRotary:
    """cos/sin of chatglm's rotary angles, in fp32 (see ``llama.RotaryEmbedding`` for why not a buffer).

    chatglm rotates the first half of each head's dims (``head_dim // 2`` of them), as interleaved pairs
    ``(x[2j], x[2j + 1])`` turned by angle ``position * theta_j``, ``theta_j = (10000 * rope_ratio) ** (-2j / rot)``.
    """

    def __init__(self, config):
        self.rotary_dims = head_dim(config) // 2
        base = 10000 * config.rope_ratio
        self.inv_freq = 1.0 / (base ** (torch.arange(0, self.rotary_dims, 2, dtype=torch.float) / self.rotary_dims))

    def __call__(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inv_freq.device != position_ids.device:
            self.inv_freq = self.inv_freq.to(position_ids.device)
        return kernels.rotary_cos_sin(position_ids, self.inv_freq, 1.0, dtype)  # [batch, seq, rotary_dims / 2]

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` (``[batch, heads, seq, head_dim]``) with the tables of ``__call__``."""
        rotated, passed = x[..., :self.rotary_dims], x[..., self.rotary_dims:]
        even, odd = rotated.unflatten(-1, (-1, 2)).unbind(-1)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)
        return torch.cat((rotated, passed), dim=-1)


class ChatGLMAttention(nn.Module):
    def __init__(self, config, attention: AttentionOptions):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.multi_query_group_num if config.multi_query_attention else self.n_heads
        self.head_dim = head_dim(config)
        # [Q | K | V] rows: all query heads, then the key groups, then the value groups.
        self.query_key_value = nn.Linear(config.hidden_size, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim,
                                         bias=config.add_bias_linear or config.add_qkv_bias)
        self.dense = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=config.add_bias_linear)
        self.attention = attention

    def forward(self, x: torch.Tensor, rotary: ChatGLMRotary, cos: torch.Tensor, sin: torch.Tensor,
                position_ids: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        q, k, v = self.query_key_value(x).split(
            [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim], dim=-1)
        q = rotary.apply(q.view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2), cos, sin)
        k = rotary.apply(k.view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2), cos, sin)
        v = v.view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        # Key/value group g serves query heads g * n/groups ... (g + 1) * n/groups - 1, as causal_attention expands.
        out = causal_attention(q, k, v, self.attention, position_ids)
        return self.dense(out.reshape(batch, seq, self.n_heads * self.head_dim))


class ChatGLMMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 2 * config.ffn_hidden_size, bias=config.add_bias_linear)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=config.add_bias_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.dense_h_to_4h(x).chunk(2, dim=-1)
        return self.dense_4h_to_h(F.silu(gate) * up)


class ChatGLMDecoderLayer(nn.Module):
    def __init__(self, config, attention: AttentionOptions = AttentionOptions()):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.self_attention = ChatGLMAttention(config, attention)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.mlp = ChatGLMMLP(config)
        self.rotary = ChatGLMRotary(config)

    def forward(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        cos, sin = self.rotary(position_ids, hidden.dtype)
        hidden = hidden + self.self_attention(self.input_layernorm(hidden), self.rotary, cos, sin, position_ids)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class ChatGLMEmbedding(nn.Embedding):
    def __init__(self, config):
        super().__init__(config.padded_vocab_size, config.hidden_size)


class ChatGLMFinalNorm(RMSNorm):
    def __init__(self, config):
        super().__init__(config.hidden_size, config.layernorm_epsilon)


class ChatGLMHead(nn.Linear):
    def __init__(self, config):
        super().__init__(config.hidden_size, config.padded_vocab_size, bias=False)


FAMILY = ModelFamily(
    name="chatglm",
    sequence_classification="ChatGLMForSequenceClassification",
    embed=ChatGLMEmbedding,
    decoder=ChatGLMDecoderLayer,
    norm=ChatGLMFinalNorm,
    head=ChatGLMHead,
    key_map=KeyMap(prefixes={"embed": "transformer.embedding.word_embeddings.",
                             "decoder": "transformer.encoder.layers.{i}.",
                             "norm": "transformer.encoder.final_layernorm.", "head": "transformer.output_layer."}),
    tied_weight="weight",
    # chatglm3-6b (28 decoder layers + embedding + head = 30): every layout of 8 stages has a stage with 4 decoder
    # layers, so 4 bounds the step; the end stages take 2 each, the first because 1F1B keeps the most activations
    # in flight there, the last because its 65k-vocab head and loss cost about 1.5 decoder layers.
    default_parts={8: [3, 4, 4, 4, 4, 4, 4, 3], 4: [8, 7, 7, 8], 2: [16, 14]},
    ignored_hf_keys=(r"rotary_pos_emb\.inv_freq$",),
    derived_hf_tensors=rotary_buffer,
    supported_config=SUPPORTED_CONFIG,
    config_class=ChatGLMConfig,
)
