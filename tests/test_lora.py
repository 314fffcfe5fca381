"""LoRA (``lora:``): the pipeline's loss and every adapter gradient equal peft's LoRA on the transformers model
with the same weights and adapters (fp32, 1 and 2 stages), for every family; bad LoRA settings are one line.

The adapters' ``lora_B`` start random here (peft starts them at zero, which would leave ``lora_A`` without a
gradient and the check trivial). Where a family's checkpoint fuses modules that the transformers reference keeps
apart (baichuan's ``W_pack``, chatglm's ``query_key_value``: q, k and v stacked), the reference has the same
adapter on each part: one shared ``lora_A`` and ``lora_B`` split by rows is exactly a LoRA on the fused module,
whose ``lora_A`` gradient is the sum of the parts' and ``lora_B`` gradient their concatenation. transformers'
Mixtral fuses all experts into one tensor, so its expert adapters are checked through the chain rule instead: the
reference runs with each expert's weight merged (W + s B A) and the adapters' gradients are s Bᵀ G and s G Aᵀ of
that weight's gradient G.
"""
from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model

from equivalence import MICRO_BATCH, assert_matches_reference, make_batch, run_cases
from pipellm.config.schema import Lora

RANK, ALPHA = 4, 8.0
SCALE = ALPHA / RANK
QKV = ["q_proj", "k_proj", "v_proj"]


def with_adapters(reference: torch.nn.Module, targets: list[str], shared_a: tuple[str, ...] = ()) -> torch.nn.Module:
    """peft's LoRA layers on ``reference``, every ``lora_B`` random; the ``shared_a`` modules of a layer get the
    first one's ``lora_A`` (the parts of a fused module)."""
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=targets), reference)
    generator = torch.Generator().manual_seed(3)
    params = dict(reference.named_parameters())
    with torch.no_grad():
        for name, p in params.items():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
            if shared_a and f".{shared_a[0]}.lora_A." in name:
                for other in shared_a[1:]:
                    params[name.replace(f".{shared_a[0]}.", f".{other}.")].copy_(p)
    return reference


def fuse_adapters(named: dict, parts: list[str], fused: str, gradients: bool) -> dict:
    """The parts' adapters as the fused module's: ``lora_A`` shared (as gradients: summed), ``lora_B`` stacked."""
    out = {}
    for name, tensor in named.items():
        part = next((p for p in parts if f".{p}.lora_" in name), None)
        if part is None:
            out[name] = tensor
        elif part == parts[0]:
            siblings = [named[name.replace(f".{part}.", f".{p}.")] for p in parts]
            if ".lora_A." in name:
                out[name.replace(f".{part}.", f".{fused}.")] = sum(siblings) if gradients else siblings[0]
            else:
                out[name.replace(f".{part}.", f".{fused}.")] = torch.cat(siblings)
    return out


def run_reference(reference, batch, **kwargs):
    input_ids, attention_mask, labels = batch
    loss = reference(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs).loss
    loss.backward()
    grads = {name: p.grad for name, p in reference.named_parameters() if p.requires_grad}
    return loss, grads, {k: v.detach().clone() for k, v in reference.state_dict().items()}


def case(family, config, state_dict, loss, grads, targets, batch, gas, **extra):
    return dict(family=family, config=config, state_dict=state_dict, batch=batch, gas=gas,
                lora=Lora(r=RANK, alpha=ALPHA, target_modules=targets), expected=(loss, grads), **extra)


def llama_cases(dims):
    from transformers import LlamaConfig, LlamaForCausalLM

    targets = QKV + ["o_proj", "gate_proj", "up_proj", "down_proj"]
    cases = []
    for tied in (False, True):
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             tie_word_embeddings=tied, pad_token_id=0)
        batch = make_batch(MICRO_BATCH * 2 * dims[1], torch.Generator().manual_seed(1))
        loss, grads, state = run_reference(with_adapters(LlamaForCausalLM(config), targets), batch)
        cases.append(case("llama", config, state, loss, grads, targets, batch, gas=2))
    cases.append(dict(cases[-1], loss_chunk_tokens=5))  # tied, and the loss a chunk of tokens at a time
    return cases


def bloom_case(dims):
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    config = BloomConfig(vocab_size=97, hidden_size=40, n_layer=3, n_head=5, pad_token_id=0)
    targets = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
    batch = make_batch(MICRO_BATCH * dims[1], torch.Generator().manual_seed(1))
    loss, grads, state = run_reference(with_adapters(BloomForCausalLM(config), targets), batch)
    return case("bloom", config, state, loss, grads, targets, batch, gas=1)


def baichuan_case(dims, tmp_path):
    from test_baichuan import baichuan_config, llama_reference, llama_to_baichuan, write_checkpoint
    from pipellm.models import load_model_config

    torch.manual_seed(0)
    reference = with_adapters(llama_reference(), QKV + ["o_proj", "down_proj"], shared_a=tuple(QKV))
    batch = make_batch(MICRO_BATCH * dims[1], torch.Generator().manual_seed(1))
    loss, grads, state = run_reference(reference, batch)
    state = llama_to_baichuan(fuse_adapters(state, QKV, "W_pack", gradients=False))
    grads = llama_to_baichuan(fuse_adapters(grads, QKV, "W_pack", gradients=True))
    base = {k: v for k, v in state.items() if ".lora_" not in k}
    config, _ = load_model_config(write_checkpoint(tmp_path / f"baichuan{dims[0]}", baichuan_config(), base))
    return case("baichuan", config, state, loss, grads, ["W_pack", "o_proj", "down_proj"], batch, gas=1)


def chatglm_case(dims, tmp_path):
    from transformers import GlmForCausalLM

    from test_chatglm import tiny_glm, to_chatglm, write_chatglm_checkpoint
    from pipellm.models import load_model_config

    torch.manual_seed(0)
    glm = GlmForCausalLM(tiny_glm())
    write_chatglm_checkpoint(glm, tmp_path / f"chatglm{dims[0]}")
    config, _ = load_model_config(tmp_path / f"chatglm{dims[0]}")
    reference = with_adapters(glm, QKV + ["o_proj", "gate_up_proj", "down_proj"], shared_a=tuple(QKV))
    batch = make_batch(MICRO_BATCH * dims[1], torch.Generator().manual_seed(1))
    loss, grads, state = run_reference(reference, batch)
    fused = "self_attention.query_key_value"
    state = to_chatglm(fuse_adapters(state, [f"self_attn.{p}" for p in QKV], fused, gradients=False))
    grads = to_chatglm(fuse_adapters(grads, [f"self_attn.{p}" for p in QKV], fused, gradients=True))
    return case("chatglm", config, state, loss, grads, ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
                batch, gas=1)


def mixtral_case(dims):
    """Attention adapters by peft on transformers' Mixtral; expert adapters through the merged weights' gradient
    (module docstring). One micro batch: the loss, router term included, is transformers' own."""
    from transformers import MixtralForCausalLM

    from test_mixtral import tiny_config, to_file_layout

    torch.manual_seed(0)
    config = tiny_config()
    reference = with_adapters(MixtralForCausalLM(config), QKV + ["o_proj"])
    generator = torch.Generator().manual_seed(4)
    experts = {}  # file-layout name of an expert weight -> (lora_A, lora_B)
    for name, weight in to_file_layout({k: v for k, v in reference.state_dict().items() if ".experts." in k}).items():
        experts[name] = (torch.randn(RANK, weight.shape[1], generator=generator) * 0.2,
                         torch.randn(weight.shape[0], RANK, generator=generator) * 0.2)
    base = to_file_layout({k: v.detach().clone() for k, v in reference.state_dict().items()})
    with torch.no_grad():  # the reference computes with the merged expert weights
        merged = {name: base[name] + SCALE * b @ a for name, (a, b) in experts.items()}
        for layer in range(config.num_hidden_layers):
            mlp, prefix = reference.model.layers[layer].mlp, f"model.layers.{layer}.block_sparse_moe.experts"
            mlp.experts.gate_up_proj.copy_(torch.stack([torch.cat((merged[f"{prefix}.{e}.w1.weight"],
                                                                   merged[f"{prefix}.{e}.w3.weight"]))
                                                        for e in range(config.num_local_experts)]))
            mlp.experts.down_proj.copy_(torch.stack([merged[f"{prefix}.{e}.w2.weight"]
                                                     for e in range(config.num_local_experts)]))
            mlp.experts.gate_up_proj.requires_grad_(True)
            mlp.experts.down_proj.requires_grad_(True)
    batch = make_batch(MICRO_BATCH * dims[1], torch.Generator().manual_seed(1))
    input_ids, _, labels = batch
    loss, grads, _ = run_reference(reference, (input_ids, None, labels), output_router_logits=True)
    grads = to_file_layout(grads)
    state = {k: v for k, v in to_file_layout(reference.state_dict()).items() if ".experts." not in k}
    for name, (a, b) in experts.items():
        module = name.removesuffix(".weight")
        state.update({f"{module}.base_layer.weight": base[name], f"{module}.lora_A.default.weight": a,
                      f"{module}.lora_B.default.weight": b})
        merged_grad = grads.pop(name)
        grads.update({f"{module}.lora_A.default.weight": SCALE * b.T @ merged_grad,
                      f"{module}.lora_B.default.weight": SCALE * merged_grad @ a.T})
    return case("mixtral", config, state, loss, grads, QKV + ["o_proj", "w1", "w2", "w3"], batch, gas=1)


@pytest.mark.parametrize("dims", [[1, 1], [2, 1]], ids=["1stage", "2stage"])
def test_every_family_matches_peft(dims, tmp_path):
    """One spawn of the process group per stage count for every family's cases."""
    cases = [*llama_cases(dims), bloom_case(dims), baichuan_case(dims, tmp_path), chatglm_case(dims, tmp_path),
             mixtral_case(dims)]
    results = run_cases([{k: v for k, v in c.items() if k != "expected"} for c in cases], dims, tmp_path)
    for c, case_results in zip(cases, results, strict=True):
        loss, grads = c["expected"]
        assert_matches_reference(case_results, loss, grads, set(grads))
