"""Baichuan2: checkpoints in the remote-code layout (``model_type: baichuan``, fused ``W_pack``, NormHead) are
read without running any of their code. The pipeline's loss and every parameter gradient equal a reference on 1
and 2 stages (fp32): for 7b (RoPE) transformers' LlamaForCausalLM with the weights mapped and NormHead applied to
its head, for 13b (ALiBi) the reference written below. The converters round-trip bit for bit, ``--export-as
llama`` gives a native Llama with the same logits, and a 2-stage CPU training (two ranks spawned in-process)
learns."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.nn.utils import parametrize
from transformers import LlamaConfig, LlamaForCausalLM, PretrainedConfig

from equivalence import (CHUNK_TOKENS, LAUNCHER_DATA, MICRO_BATCH, assert_matches_reference, make_batch,
                         run_pipelines, train_two_stages)
from pipellm.data import IGNORE_INDEX
from pipellm.pipeline.layer_files import layer_file_name
from pipellm.convert.converters import hg_to_pp, main as convert_main, pp_to_hg
from pipellm.errors import PipellmError
from pipellm.models import load_model_config
from pipellm.models.baichuan import position_embedding
from pipellm.quickstart import mean_token_loss
from remote_tokenizers import write_baichuan2_tokenizer

HIDDEN, HEADS, LAYERS, INTERMEDIATE = 40, 5, 3, 64
# Stands in for the checkpoint's remote code: importing or running it would fail the test.
REMOTE_CODE = 'raise RuntimeError("pipellm ran the checkpoint\'s remote code")\n'


def baichuan_config(position: str | None = None, vocab_size: int = 97) -> dict:
    """config.json as Baichuan2 ships it (remote code), sized down."""
    config = {"architectures": ["BaichuanForCausalLM"], "auto_map": {
        "AutoConfig": "configuration_baichuan.BaichuanConfig",
        "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"},
        "model_type": "baichuan", "vocab_size": vocab_size, "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "hidden_act": "silu", "rms_norm_eps": 1e-6,
        "model_max_length": 64, "initializer_range": 0.02, "tie_word_embeddings": False, "z_loss_weight": 0,
        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}
    if position:
        config["pipellm_position_embedding"] = position
    return config


def write_checkpoint(path, config: dict, state_dict: dict, rope_buffers: bool = False):
    """A Baichuan2 directory: sharded ``pytorch_model-*.bin`` with an index, as released, plus its remote code."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    for name in ("configuration_baichuan.py", "modeling_baichuan.py"):
        (path / name).write_text(REMOTE_CODE)
    state_dict = dict(state_dict)
    if rope_buffers:  # the 7b files carry each layer's inv_freq buffer, which pipellm regenerates
        inv_freq = 1.0 / 10000 ** (torch.arange(0, HIDDEN // HEADS, 2).float() / (HIDDEN // HEADS))
        state_dict.update({f"model.layers.{i}.self_attn.rotary_emb.inv_freq": inv_freq for i in range(LAYERS)})
    keys = sorted(state_dict)
    shards = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    for name, shard_keys in shards.items():
        torch.save({k: state_dict[k] for k in shard_keys}, path / name)
    weight_map = {k: name for name, shard_keys in shards.items() for k in shard_keys}
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def llama_reference(vocab_size: int = 97) -> LlamaForCausalLM:
    """Baichuan2-7b as transformers' Llama: same blocks, rotary theta 10000, and NormHead on the head."""
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                         num_hidden_layers=LAYERS, num_attention_heads=HEADS, rms_norm_eps=1e-6, pad_token_id=0,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).float()
    parametrize.register_parametrization(model.lm_head, "weight", NormRows())
    return model


class NormRows(nn.Module):
    def forward(self, weight):
        return F.normalize(weight)


def llama_to_baichuan(named: dict) -> dict:
    """Llama names -> Baichuan2's: q/k/v stacked into W_pack, the raw (unnormalised) head weight as lm_head."""
    out = {}
    for name, tensor in named.items():
        name = name.replace("lm_head.parametrizations.weight.original", "lm_head.weight")
        if ".q_proj." in name:
            parts = [named[name.replace("q_proj", proj)] for proj in ("q_proj", "k_proj", "v_proj")]
            out[name.replace("q_proj", "W_pack")] = torch.cat(parts)
        elif ".k_proj." not in name and ".v_proj." not in name:
            out[name] = tensor
    return out


def interleave_slopes(n: int) -> list[float]:
    """Baichuan2-13b's ``_get_interleave``, as its remote code computes the ALiBi slopes."""
    def power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]
    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + interleave_slopes(2 * closest)[0::2][: n - closest]


class RMSNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(HIDDEN))

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class AlibiLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(), RMSNorm()
        self.self_attn = nn.Module()
        self.self_attn.W_pack = nn.Linear(HIDDEN, 3 * HIDDEN, bias=False)
        self.self_attn.o_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.mlp = nn.Module()
        self.mlp.gate_proj, self.mlp.up_proj = (nn.Linear(HIDDEN, INTERMEDIATE, bias=False) for _ in range(2))
        self.mlp.down_proj = nn.Linear(INTERMEDIATE, HIDDEN, bias=False)

    def forward(self, x, mask):
        batch, seq, _ = x.shape
        q, k, v = (t.view(batch, seq, HEADS, -1).transpose(1, 2)
                   for t in self.self_attn.W_pack(self.input_layernorm(x)).chunk(3, dim=-1))
        scores = q @ k.transpose(-1, -2) / math.sqrt(HIDDEN // HEADS) + mask
        attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, seq, HIDDEN)
        x = x + self.self_attn.o_proj(attn)
        h = self.post_attention_layernorm(x)
        return x + self.mlp.down_proj(F.silu(self.mlp.gate_proj(h)) * self.mlp.up_proj(h))


class AlibiReference(nn.Module):
    """Baichuan2-13b: Baichuan2-7b's blocks with ALiBi (Baichuan's own mask: slope * key position, -inf above the
    diagonal) instead of RoPE, parameter names as in its checkpoints."""

    def __init__(self, vocab_size: int = 97):
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(vocab_size, HIDDEN)
        self.model.layers = nn.ModuleList(AlibiLayer() for _ in range(LAYERS))
        self.model.norm = RMSNorm()
        self.lm_head = nn.Linear(HIDDEN, vocab_size, bias=False)

    def forward(self, input_ids, labels):
        seq = input_ids.shape[1]
        slopes = torch.tensor(interleave_slopes(HEADS))
        mask = slopes[:, None, None] * torch.arange(seq) + torch.full((seq, seq), float("-inf")).triu(1)
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, mask)
        logits = F.linear(self.model.norm(x), F.normalize(self.lm_head.weight))
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)


def reference_case(position: str, tmp_path, gas: int, replicas: int = 1):
    """``(pipeline case, reference loss, reference grads by checkpoint key)`` for ``position`` rope or alibi."""
    torch.manual_seed(0)
    batch = make_batch(MICRO_BATCH * gas * replicas, torch.Generator().manual_seed(1))
    input_ids, attention_mask, labels = batch
    if position == "rope":
        reference = llama_reference()
        with torch.no_grad():
            for name, p in reference.named_parameters():
                if "norm" in name:
                    p.add_(0.1 * torch.randn_like(p))
        loss = reference(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    else:
        reference = AlibiReference()
        loss = reference(input_ids, labels)
    loss.backward()
    state_dict = llama_to_baichuan({n: p.detach().clone() for n, p in reference.named_parameters()})
    grads = llama_to_baichuan({n: p.grad for n, p in reference.named_parameters()})
    # The 7b case relies on detection from the config (no key), the 13b case on the explicit key.
    model_dir = tmp_path / position
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(baichuan_config("alibi" if position == "alibi" else None)))
    config, _ = load_model_config(model_dir)
    assert position_embedding(config) == position
    return (config, state_dict, batch), loss, grads


@pytest.mark.parametrize("dims,gas", [([1, 1], 2), ([2, 1], 1)], ids=["1stage", "2stage"])
def test_loss_and_grads_match_reference(dims, gas, tmp_path):
    """Both variants in one distributed run per stage count (one spawn of the process group for both)."""
    cases = [reference_case(position, tmp_path, gas) for position in ("rope", "alibi")]
    # Each with the whole micro batch's logits at once, and with loss_chunk_tokens' chunks.
    runs = [(case + extra, loss, grads) for case, loss, grads in cases for extra in ((), (CHUNK_TOKENS,))]
    results = run_pipelines("baichuan", [case for case, _, _ in runs], dims, gas, tmp_path)
    for case_results, (_, loss, grads) in zip(results, runs, strict=True):
        assert_matches_reference(case_results, loss, grads, set(grads))


def test_position_embedding_detection_and_override(tmp_path):
    def decide(**keys):
        return position_embedding(PretrainedConfig.from_dict({"model_type": "baichuan", **keys}))

    assert decide(hidden_size=4096) == "rope"  # baichuan2-7b
    assert decide(hidden_size=5120) == "alibi"  # baichuan2-13b
    assert decide(hidden_size=5120, rope_theta=10000.0) == "rope"
    assert decide(hidden_size=4096, pipellm_position_embedding="alibi") == "alibi"
    assert decide(hidden_size=5120, pipellm_position_embedding="rope") == "rope"
    (tmp_path / "config.json").write_text(json.dumps(baichuan_config("rotary")))
    with pytest.raises(PipellmError, match='config.json: pipellm_position_embedding "rotary" is not supported by '
                                           'pipellm\'s baichuan; supported: "rope" or "alibi" or null'):
        load_model_config(tmp_path)


def test_round_trip_bit_exact_and_llama_export(tmp_path, capsys):
    torch.manual_seed(0)
    reference = llama_reference().eval()
    state_dict = llama_to_baichuan({n: p.detach() for n, p in reference.named_parameters()})
    hf = write_checkpoint(tmp_path / "hf", baichuan_config(), state_dict, rope_buffers=True)
    pp = hg_to_pp(hf, tmp_path / "pp")
    assert sorted(p.name for p in pp.glob("layer_*")) == [layer_file_name(i) for i in range(LAYERS + 3)]
    assert "self_attn.W_pack.weight" in torch.load(pp / layer_file_name(1), weights_only=True)

    back = load_file(pp_to_hg(pp, tmp_path / "back") / "model.safetensors")
    assert back.keys() == state_dict.keys()
    assert all(torch.equal(back[k], state_dict[k]) for k in state_dict)

    convert_main(["pp_to_hg", "--input-path", str(pp), "--save-path", str(tmp_path / "llama"),
                  "--export-as", "llama"])
    exported = LlamaForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch.float32).eval()
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-6)

    (tmp_path / "pp" / "config.json").write_text(json.dumps(baichuan_config("alibi")))
    with pytest.raises(PipellmError, match="uses ALiBi"):
        pp_to_hg(pp, tmp_path / "llama13b", export_as="llama")
    with pytest.raises(SystemExit):
        convert_main(["pp_to_hg", "--input-path", str(pp), "--save-path", str(tmp_path / "x"), "--export-as", "gpt2"])
    assert "exports are: llama" in capsys.readouterr().err


def test_two_stage_training_learns(tmp_path):
    """Baichuan2-7b shape, trained on 2 stages, exported as native llama: its loss on the data fell."""
    torch.manual_seed(0)
    state_dict = llama_to_baichuan({n: p.detach() for n, p in llama_reference(1024).named_parameters()})
    hf = write_checkpoint(tmp_path / "hf", baichuan_config(vocab_size=1024), state_dict)
    write_baichuan2_tokenizer(hf)  # as Baichuan2 ships it: remote code, built from tokenizer.model instead
    pp = hg_to_pp(hf, tmp_path / "pp")
    save, records = train_two_stages(tmp_path, pp, parts=[3, 2], n_epochs=1)
    first, last = sum(r["loss"] for r in records[:3]) / 3, sum(r["loss"] for r in records[-3:]) / 3
    assert last < first - 1.0, (first, last)
    before = mean_token_loss(pp_to_hg(pp, tmp_path / "init_llama", export_as="llama"), [LAUNCHER_DATA], 64)
    trained = pp_to_hg(save, tmp_path / "trained_llama", export_as="llama")
    after = mean_token_loss(trained, [LAUNCHER_DATA], 64)
    assert after < before - 1.0, (before, after)
    # The tokenizer files travel unchanged through conversion, training and export, its remote code included.
    for name in ("tokenizer.model", "tokenizer_config.json", "tokenization_baichuan.py"):
        assert (trained / name).read_bytes() == (hf / name).read_bytes(), name
