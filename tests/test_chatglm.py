"""ChatGLM3: the pipeline's loss and every parameter gradient equal transformers' GlmForCausalLM with the weights
mapped (fp32, 1 and 2 stages), the converters round-trip chatglm3's own checkpoint layout bit for bit without
running its remote code, and a 2-stage CPU training (two ranks spawned in-process) learns.

GlmForCausalLM is chatglm3's architecture: RMSNorm, q/k/v with biases and grouped key/value heads, rotary on the
first ``partial_rotary_factor = 0.5`` of each head's dims on interleaved pairs, fused [gate; up] MLP, untied head.
chatglm3's ``rope_ratio`` is its ``rope_theta = 10000 * rope_ratio``; the fused ``query_key_value`` is GLM's
q, k and v stacked.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import GlmConfig, GlmForCausalLM

from equivalence import (MICRO_BATCH, assert_matches_reference, make_batch, run_pipeline_both_losses,
                         train_two_stages)
from pipellm.pipeline.layer_files import layer_file_name
from pipellm.convert.converters import hg_to_pp, pp_to_hg
from pipellm.errors import PipellmError
from pipellm.models import load_model_config
from remote_tokenizers import write_chatglm3_tokenizer

ROPE_RATIO = 3


def tiny_glm(vocab_size: int = 97) -> GlmConfig:
    # No pad_token_id: GLM's embedding would zero the pad row's gradient (padding_idx); chatglm's does not.
    # Weights 10x the usual init, so attention is far from uniform and the rotary details move the loss.
    return GlmConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                     initializer_range=0.2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
                     attention_bias=True, tie_word_embeddings=False, pad_token_id=None,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0 * ROPE_RATIO,
                                      "partial_rotary_factor": 0.5})


def chatglm_config(glm: GlmConfig) -> dict:
    """chatglm3-6b's config.json, for the tiny sizes (its remote code is named but must never run)."""
    return {"model_type": "chatglm", "architectures": ["ChatGLMModel"],
            "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                         "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
            "num_layers": glm.num_hidden_layers, "padded_vocab_size": glm.vocab_size,
            "hidden_size": glm.hidden_size, "ffn_hidden_size": glm.intermediate_size, "kv_channels": glm.head_dim,
            "num_attention_heads": glm.num_attention_heads, "multi_query_attention": True,
            "multi_query_group_num": glm.num_key_value_heads, "add_qkv_bias": True, "add_bias_linear": False,
            "layernorm_epsilon": glm.rms_norm_eps, "rmsnorm": True, "post_layer_norm": True,
            "apply_residual_connection_post_layernorm": False, "original_rope": True, "rope_ratio": ROPE_RATIO,
            "seq_length": 64, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "eos_token_id": 2,
            "pad_token_id": 0}


def to_chatglm(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GlmForCausalLM names -> chatglm3 checkpoint keys (q, k, v fused into query_key_value)."""
    out = {}
    for name, tensor in tensors.items():
        name = name.replace("model.layers.", "transformer.encoder.layers.")
        for glm, chatglm in (("model.embed_tokens.", "transformer.embedding.word_embeddings."),
                             ("model.norm.", "transformer.encoder.final_layernorm."),
                             ("lm_head.", "transformer.output_layer."), ("self_attn.o_proj.", "self_attention.dense."),
                             ("mlp.gate_up_proj.", "mlp.dense_h_to_4h."), ("mlp.down_proj.", "mlp.dense_4h_to_h.")):
            name = name.replace(glm, chatglm)
        if ".self_attn.q_proj." in name:
            k_name, v_name = name.replace("q_proj", "k_proj"), name.replace("q_proj", "v_proj")
            tensor = torch.cat((tensor, tensors[k_name.replace("transformer.encoder.", "model.")],
                                tensors[v_name.replace("transformer.encoder.", "model.")]))
            name = name.replace("self_attn.q_proj.", "self_attention.query_key_value.")
        elif ".self_attn." in name:
            continue  # k_proj / v_proj: fused with q_proj above
        out[name] = tensor
    return out


def write_chatglm_checkpoint(glm: GlmForCausalLM, path) -> dict[str, torch.Tensor]:
    """chatglm3's files: config.json naming remote code (which raises if run), two ``.bin`` shards with an
    index, and the ``rotary_pos_emb.inv_freq`` buffer. Returns the tensors written."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps(chatglm_config(glm.config)))
    for module in ("configuration_chatglm.py", "modeling_chatglm.py"):
        (path / module).write_text("raise RuntimeError('the checkpoint\\'s remote code was run')\n")
    tensors = {k: v.detach().clone() for k, v in to_chatglm(glm.state_dict()).items()}
    # The buffer chatglm's RotaryEmbedding.__init__ registers: a quarter of the head dims, in the model's dtype.
    dims, dtype = glm.config.head_dim // 2, next(glm.parameters()).dtype
    tensors["transformer.rotary_pos_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, dims, 2).to(dtype=dtype) / dims))
    keys = sorted(tensors)
    shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    for file_name, shard_keys in shards.items():
        torch.save({k: tensors[k] for k in shard_keys}, path / file_name)
    weight_map = {k: file_name for file_name, shard_keys in shards.items() for k in shard_keys}
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return tensors


@pytest.mark.parametrize("dims,gas", [([1, 1], 2), ([2, 1], 1)], ids=["1stage", "2stage"])
def test_loss_and_grads_match_glm_reference(dims, gas, tmp_path):
    torch.manual_seed(0)
    reference = GlmForCausalLM(tiny_glm()).float()
    with torch.no_grad():  # non-trivial norms and biases, so their gradients and roles are tested too
        for name, p in reference.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    write_chatglm_checkpoint(reference, tmp_path / "hf")
    config, family = load_model_config(tmp_path / "hf")
    assert family.name == "chatglm" and config.num_hidden_layers == 3 and config.vocab_size == 97

    batch = make_batch(MICRO_BATCH * gas * dims[1], torch.Generator().manual_seed(1))
    input_ids, attention_mask, labels = batch
    ref_loss = reference(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    ref_loss.backward()
    ref_grads = to_chatglm({name: p.grad for name, p in reference.named_parameters()})
    state_dict = to_chatglm({k: v.clone() for k, v in reference.state_dict().items()})

    # The whole micro batch's logits at once, and loss_chunk_tokens' chunks.
    for results in run_pipeline_both_losses("chatglm", config, state_dict, batch, dims, gas, tmp_path):
        assert_matches_reference(results, ref_loss, ref_grads, set(ref_grads))


def test_checkpoint_layout_round_trips_bit_exact(tmp_path):
    """hg_to_pp reads chatglm3's sharded .bin layout (the derived inv_freq skipped) and pp_to_hg writes every key
    back bit for bit, inv_freq recomputed as chatglm computes it; the remote code in the directory never runs."""
    torch.manual_seed(0)
    original = write_chatglm_checkpoint(GlmForCausalLM(tiny_glm()).to(torch.bfloat16), tmp_path / "hf")
    pp = hg_to_pp(tmp_path / "hf", tmp_path / "pp")
    assert sorted(p.name for p in pp.glob("layer_*")) == [layer_file_name(i) for i in range(6)]
    assert set(torch.load(pp / layer_file_name(1), weights_only=True)) == {
        "input_layernorm.weight", "self_attention.query_key_value.weight", "self_attention.query_key_value.bias",
        "self_attention.dense.weight", "post_attention_layernorm.weight", "mlp.dense_h_to_4h.weight",
        "mlp.dense_4h_to_h.weight"}
    back = load_file(pp_to_hg(pp, tmp_path / "back") / "model.safetensors")
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) and back[k].dtype == original[k].dtype for k in original)


def test_two_stage_training_learns(tmp_path):
    torch.manual_seed(0)
    hf = tmp_path / "hf"
    written = write_chatglm_checkpoint(GlmForCausalLM(tiny_glm(vocab_size=1024)), hf)
    write_chatglm3_tokenizer(hf)  # as chatglm3 ships it: remote code; the data is rendered in chatglm3's format
    save, records = train_two_stages(tmp_path, hg_to_pp(hf, tmp_path / "pp"), parts=[2, 3], n_epochs=1)
    first, last = sum(r["loss"] for r in records[:3]) / 3, sum(r["loss"] for r in records[-3:]) / 3
    assert last < first - 1.0, (first, last)
    metas = [json.loads(p.read_text()) for p in (tmp_path / "data_cache").glob("*/meta.json")]
    assert [m["template"] for m in metas] == ["chatglm3"]
    out = pp_to_hg(save, tmp_path / "hf_out")
    exported = load_file(out / "model.safetensors")
    assert exported.keys() == written.keys()
    for name in ("tokenizer.model", "tokenizer_config.json", "tokenization_chatglm.py"):  # unchanged, code included
        assert (out / name).read_bytes() == (hf / name).read_bytes(), name


def test_chatglm1_style_block_is_refused_at_config_load(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**chatglm_config(tiny_glm()), "rmsnorm": False}))
    with pytest.raises(PipellmError, match=r"config\.json: rmsnorm false is not supported by pipellm's chatglm; "
                                           r"supported: true; the other value is a chatglm1-style block"):
        load_model_config(tmp_path)
