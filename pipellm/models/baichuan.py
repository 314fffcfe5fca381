"""Baichuan2 (7b and 13b): llama-shaped decoder blocks with a fused ``W_pack`` = [q; k; v] projection, RMSNorm,
SwiGLU MLP, and a NormHead (the head's rows L2-normalised inside the training graph, so gradients flow through
the normalisation). 7b uses RoPE; 13b uses ALiBi.

Checkpoints are written for remote code (``model_type: baichuan``); pipellm never runs it. Module and parameter
names follow that code, so a pipeline layer's state dict is the checkpoint's keys minus the ``KEY_MAP`` prefixes;
``W_pack`` stays one fused tensor and is split in ``forward``.

Nothing in a Baichuan config says which position embedding it uses. ``pipellm_position_embedding`` in
config.json (``"rope"`` or ``"alibi"``) says so explicitly; without it, ALiBi is chosen for hidden size 5120
(baichuan-13b and baichuan2-13b, the only ALiBi releases) unless the config has rope settings, RoPE otherwise.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig

from pipellm.models.attention import AttentionOptions, causal_attention
from pipellm.errors import PipellmError
from pipellm.models import kernels, llama
from pipellm.models.base import Export, KeyMap, ModelFamily, Supported
from pipellm.models.bloom import AlibiSlopes

POSITION_KEY = "pipellm_position_embedding"
ROPE_SETTINGS = ("rope_theta", "rope_scaling", "rope_parameters")
ALIBI_HIDDEN_SIZE = 5120


def position_embedding(config) -> str:
    """``"rope"`` or ``"alibi"`` for a Baichuan config (see the module docstring)."""
    explicit = getattr(config, POSITION_KEY, None)
    if explicit is not None:
        return explicit
    has_rope_settings = any(getattr(config, key, None) is not None for key in ROPE_SETTINGS)
    return "alibi" if config.hidden_size == ALIBI_HIDDEN_SIZE and not has_rope_settings else "rope"


SUPPORTED_CONFIG = (
    Supported(POSITION_KEY, ("rope", "alibi", None), '"rope" for baichuan2-7b, "alibi" for baichuan2-13b, or remove '
                                                     'it to decide from hidden_size'),
    Supported("z_loss_weight", (0, None), "pipellm trains with plain cross entropy (as the released Baichuan2 "
                                          "configs: 0)"),
    llama.SILU)


def rope_config(config) -> LlamaConfig:
    """The llama config whose rotary embedding is Baichuan2-7b's (theta 10000 unless the config says otherwise)."""
    theta = getattr(config, "rope_theta", None) or 10000.0
    return LlamaConfig(hidden_size=config.hidden_size, num_attention_heads=config.num_attention_heads,
                       rope_parameters={"rope_type": "default", "rope_theta": theta})


class BaichuanAttention(nn.Module):
    def __init__(self, config, attention: AttentionOptions):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.n_heads
        self.W_pack = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.attention = attention
        self.alibi = AlibiSlopes(self.n_heads) if position_embedding(config) == "alibi" else None
        self.rotary = None if self.alibi else llama.RotaryEmbedding(rope_config(config))

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = x.shape
        # W_pack's rows are three blocks [q; k; v], each heads x head_dim.
        qkv = self.W_pack(x).view(batch, seq, 3, self.n_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        if self.alibi:
            out = causal_attention(q, k, v, self.attention, position_ids, alibi_slopes=self.alibi(x.device))
        else:
            q, k = kernels.rotary(q, k, *self.rotary(position_ids, x.dtype))
            out = causal_attention(q, k, v, self.attention, position_ids)
        return self.o_proj(out.reshape(batch, seq, hidden))


class BaichuanDecoderLayer(nn.Module):
    def __init__(self, config, attention: AttentionOptions = AttentionOptions()):
        super().__init__()
        self.input_layernorm = llama.RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = BaichuanAttention(config, attention)
        self.post_attention_layernorm = llama.RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = llama.LlamaMLP(config)

    def forward(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), position_ids)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


def normalized_rows(weight: torch.Tensor) -> torch.Tensor:
    """Baichuan2's NormHead: logits against the L2-normalised rows of the head; the stored weight is the raw one."""
    return F.normalize(weight, dim=-1)


def _llama_layer(kind: str, state: dict, config) -> dict:
    """A layer in native llama layout: ``W_pack`` split into q/k/v, the head's rows normalised once for good."""
    if position_embedding(config) == "alibi":
        raise PipellmError(f"--export-as llama: this baichuan model uses ALiBi ({POSITION_KEY} or hidden_size "
                           f"{ALIBI_HIDDEN_SIZE}), which llama cannot express; export it without --export-as")
    if FAMILY.is_tied(config):
        # A tied llama head is the raw embedding; this model's is the normalised one, which llama cannot tie.
        raise PipellmError("--export-as llama: config.json sets tie_word_embeddings, and a NormHead tied to the "
                           "embedding has no llama equivalent; export it without --export-as")
    if kind == "decoder":
        state = dict(state)
        q, k, v = state.pop("self_attn.W_pack.weight").chunk(3, dim=0)
        state.update({"self_attn.q_proj.weight": q, "self_attn.k_proj.weight": k, "self_attn.v_proj.weight": v})
    elif kind == "head":
        weight = state["weight"]
        state = {"weight": F.normalize(weight.float(), dim=-1).to(weight.dtype)}
    return state


def _llama_config(config: dict) -> dict:
    """config.json of the native llama: the same sizes, the rotary embedding Baichuan2-7b uses, no remote code."""
    dropped = ("auto_map", "architectures", "model_type", "z_loss_weight", POSITION_KEY, "_name_or_path")
    llama_config = {key: value for key, value in config.items() if key not in dropped}
    llama_config.update(model_type="llama", architectures=["LlamaForCausalLM"],
                        num_key_value_heads=config["num_attention_heads"],
                        rope_parameters={"rope_type": "default", "rope_theta": config.get("rope_theta", 10000.0)},
                        tie_word_embeddings=False)
    # Baichuan2-13b-style configs name only model_max_length.
    llama_config.setdefault("max_position_embeddings", config.get("model_max_length", 4096))
    return llama_config


KEY_MAP = KeyMap(prefixes={"embed": "model.embed_tokens.", "decoder": "model.layers.{i}.", "norm": "model.norm.",
                           "head": "lm_head."})

FAMILY = ModelFamily(
    name="baichuan",
    sequence_classification="BaichuanForSequenceClassification",
    embed=llama.LlamaEmbedding,
    decoder=BaichuanDecoderLayer,
    norm=llama.LlamaFinalNorm,
    head=llama.LlamaHead,
    key_map=KEY_MAP,
    tied_weight="weight",
    head_weight=normalized_rows,
    # baichuan2-7b (32 decoder layers, 125k vocabulary): the head costs about 2.5 decoder layers of FLOPs, the
    # embedding about as much memory, so both end stages take fewer decoder layers. For baichuan2-13b (40
    # layers, head about 2 layers) use 8: [6, 6, 6, 5, 5, 5, 5, 4], 4: [11, 11, 11, 9], 2: [22, 20].
    default_parts={8: [4, 5, 5, 5, 4, 4, 4, 3], 4: [9, 9, 9, 7], 2: [18, 16]},
    ignored_hf_keys=(r"rotary_emb\.inv_freq$",),
    # Same layout with W_pack split: the layer prefixes are llama's own, the layer keys change.
    exports={"llama": Export(key_map=llama.FAMILY.key_map, convert_layer=_llama_layer, convert_config=_llama_config)},
    supported_config=SUPPORTED_CONFIG,
)
