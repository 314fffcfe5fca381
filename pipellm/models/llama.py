"""Llama: token embedding, pre-norm decoder blocks (RMSNorm, rotary GQA attention, SwiGLU MLP), final norm, head.

Module and parameter names follow transformers' ``LlamaForCausalLM`` so that a pipeline layer's state dict is
the Hugging Face checkpoint's keys with the prefixes of ``KEY_MAP`` removed. Rotary frequencies come from
transformers' own rope functions, so every static ``rope_parameters`` type (default, linear, yarn, llama3, ...)
means exactly what it means there.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from pipellm.models import kernels
from pipellm.models.attention import AttentionOptions, causal_attention
from pipellm.models.base import KeyMap, ModelFamily, Supported

# Rope types whose frequencies change with the sequence length (``dynamic``, ``longrope``) are inference-time
# extensions, not trained with; the static ones mean exactly what they mean in transformers.
STATIC_ROPE_TYPES = ("default",) + tuple(t for t in ROPE_INIT_FUNCTIONS if t not in ("dynamic", "longrope"))
ROPE_TYPE = Supported("rope_parameters.rope_type", STATIC_ROPE_TYPES,
                      "dynamic and longrope change with the sequence length: train with a static type")
SILU = Supported("hidden_act", ("silu",), "the MLP is SwiGLU")


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.norm_kernel = kernels.rms_norm  # liger's with speed.liger_kernels (pipellm.models.kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_kernel(x, self.weight, self.eps)


class RotaryEmbedding:
    """cos/sin tables for the positions of a batch, computed in fp32.

    Not an ``nn.Module`` with buffers on purpose: DeepSpeed casts every floating buffer to bf16/fp16, and a bf16
    ``inv_freq`` gives wrong angles beyond a few hundred positions.
    """

    def __init__(self, config):
        rope_type = config.rope_parameters.get("rope_type", "default")  # one of STATIC_ROPE_TYPES (check_config)
        init = ROPE_INIT_FUNCTIONS.get(rope_type, LlamaRotaryEmbedding.compute_default_rope_parameters)
        self.inv_freq, self.scaling = init(config)
        self.inv_freq = self.inv_freq.float()

    def __call__(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inv_freq.device != position_ids.device:
            self.inv_freq = self.inv_freq.to(position_ids.device)
        cos, sin = kernels.rotary_cos_sin(position_ids, self.inv_freq, self.scaling, dtype)
        return torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)


class LlamaAttention(nn.Module):
    def __init__(self, config, attention: AttentionOptions):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        bias = bool(getattr(config, "attention_bias", False))
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=bias)
        self.attention = attention
        self.rotary_kernel = kernels.rotary

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.rotary_kernel(q, k, cos, sin)
        out = causal_attention(q, k, v, self.attention, position_ids)
        return self.o_proj(out.reshape(batch, seq, self.n_heads * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        bias = bool(getattr(config, "mlp_bias", False))
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.swiglu_kernel = kernels.swiglu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.swiglu_kernel(self.gate_proj(x), self.up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, attention: AttentionOptions = AttentionOptions()):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, attention)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)
        self.rotary = RotaryEmbedding(config)

    def forward(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        cos, sin = self.rotary(position_ids, hidden.dtype)
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin, position_ids)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class LlamaEmbedding(nn.Embedding):
    def __init__(self, config):
        super().__init__(config.vocab_size, config.hidden_size)


class LlamaFinalNorm(RMSNorm):
    def __init__(self, config):
        super().__init__(config.hidden_size, config.rms_norm_eps)


class LlamaHead(nn.Linear):
    def __init__(self, config):
        super().__init__(config.hidden_size, config.vocab_size, bias=False)


KEY_MAP = KeyMap(prefixes={"embed": "model.embed_tokens.", "decoder": "model.layers.{i}.", "norm": "model.norm.",
                          "head": "lm_head."})

FAMILY = ModelFamily(
    name="llama",
    sequence_classification="LlamaForSequenceClassification",
    embed=LlamaEmbedding,
    decoder=LlamaDecoderLayer,
    norm=LlamaFinalNorm,
    head=LlamaHead,
    key_map=KEY_MAP,
    tied_weight="weight",
    # llama-7b (32 decoder layers + embedding + head = 34): the embedding and the head each cost about one
    # decoder layer of time at 32k vocab, so the end stages take one block more than the middle ones.
    default_parts={8: [5, 4, 4, 4, 4, 4, 4, 5], 4: [9, 8, 8, 9], 2: [17, 17]},
    ignored_hf_keys=(r"rotary_emb\.inv_freq$",),
    supported_config=(SILU, ROPE_TYPE),
)
