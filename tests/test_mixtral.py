"""Mixtral: the pipeline's loss (cross entropy + router load-balancing term) and every parameter gradient equal
transformers' MixtralForCausalLM(output_router_logits=True) (fp32, 1 and 2 stages, 8 experts, top-2); with several
micro batches they equal the documented convention built from the same reference. The converters round-trip the
per-expert checkpoint layout bit for bit, and a 2-stage CPU training (two ranks spawned in-process) learns."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import MixtralConfig, MixtralForCausalLM

from equivalence import (MICRO_BATCH, assert_matches_reference, copy_tiny_tokenizer, make_batch,
                         run_pipeline_both_losses, train_two_stages)
from pipellm.pipeline.layer_files import layer_file_name
from pipellm.convert.converters import hg_to_pp, pp_to_hg
from pipellm.errors import PipellmError
from pipellm.observe.metrics import flops_per_token
from pipellm.models import load_model_config

EXPERTS = 8


def tiny_config(vocab_size: int = 97) -> MixtralConfig:
    # No pad_token_id: the reference's embedding would then zero the pad row's gradient (padding_idx), while
    # padded positions do reach the load-balancing term (see pipellm.models.mixtral). Weights 10x the usual
    # init, so attention and routing are far from uniform.
    return MixtralConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         initializer_range=0.2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         num_local_experts=EXPERTS, num_experts_per_tok=2, router_aux_loss_coef=0.1,
                         pad_token_id=None)


def to_file_layout(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5's in-memory names and fused experts -> the checkpoint files' per-expert keys."""
    out = {}
    for name, tensor in tensors.items():
        prefix, sep, last = name.rpartition(".mlp.")
        if not sep:
            out[name] = tensor
        elif last == "gate.weight":
            out[f"{prefix}.block_sparse_moe.gate.weight"] = tensor
        elif last == "experts.gate_up_proj":
            for e, (w1, w3) in enumerate(t.chunk(2, dim=0) for t in tensor):
                out[f"{prefix}.block_sparse_moe.experts.{e}.w1.weight"] = w1
                out[f"{prefix}.block_sparse_moe.experts.{e}.w3.weight"] = w3
        else:
            assert last == "experts.down_proj", name
            out.update({f"{prefix}.block_sparse_moe.experts.{e}.w2.weight": w2 for e, w2 in enumerate(tensor)})
    return out


def saved_checkpoint(model: MixtralForCausalLM, path) -> dict[str, torch.Tensor]:
    """``save_pretrained``'s file: transformers 5 writes Mixtral's per-expert layout, as released checkpoints have."""
    model.save_pretrained(path)
    tensors = load_file(path / "model.safetensors")
    assert "model.layers.0.block_sparse_moe.experts.7.w2.weight" in tensors
    assert not any("gate_up_proj" in k or ".mlp." in k for k in tensors)
    return tensors


# (dims, gas). With one micro batch per step the step's loss is transformers' own on the global batch (2 stages,
# the statistics crossing the stage boundary); with two it is the documented per-micro-batch convention.
CASES = {"2stage-1micro": ([2, 1], 1), "1stage-2micro": ([1, 1], 2)}


@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_grads_match_transformers(case, tmp_path):
    dims, gas = CASES[case]
    torch.manual_seed(0)
    config = tiny_config()
    reference = MixtralForCausalLM(config).float()
    state_dict = saved_checkpoint(reference, tmp_path / "hf")
    # The mapping used for the gradients below reproduces transformers' own save conversion.
    mapped = to_file_layout(reference.state_dict())
    assert mapped.keys() == state_dict.keys() and all(torch.equal(mapped[k], state_dict[k]) for k in mapped)

    n_micro = gas * dims[1]
    batch = make_batch(MICRO_BATCH * n_micro, torch.Generator().manual_seed(1))
    input_ids, _, labels = batch
    # No attention mask: pipellm's load-balancing term counts every position, padding included (right padding
    # keeps the labelled tokens' logits the same either way).
    if n_micro == 1:
        out = reference(input_ids=input_ids, labels=labels, output_router_logits=True)
        assert out.aux_loss > 0
        ref_loss = out.loss
    else:
        # The documented convention: cross entropy over the global batch plus the mean over micro batches of
        # each micro batch's coefficient-weighted load-balancing loss, each computed by transformers.
        ce = reference(input_ids=input_ids, labels=labels, output_router_logits=False).loss
        aux = [reference(input_ids=rows, output_router_logits=True).aux_loss for rows in input_ids.split(MICRO_BATCH)]
        ref_loss = ce + config.router_aux_loss_coef * torch.stack(aux).mean()
    ref_loss.backward()
    ref_grads = to_file_layout({name: p.grad for name, p in reference.named_parameters()})

    # The whole micro batch's logits at once, and loss_chunk_tokens' chunks.
    for results in run_pipeline_both_losses("mixtral", config, state_dict, batch, dims, gas, tmp_path):
        assert_matches_reference(results, ref_loss, ref_grads, set(ref_grads))


def test_per_expert_layout_round_trips_bit_exact(tmp_path):
    """hg_to_pp reads the per-expert files; pp_to_hg writes them back bit for bit, and transformers 5 loads
    that output (fusing the experts on load) into the same parameters."""
    torch.manual_seed(0)
    model = MixtralForCausalLM(tiny_config()).to(torch.bfloat16)
    original = saved_checkpoint(model, tmp_path / "hf")
    pp = hg_to_pp(tmp_path / "hf", tmp_path / "pp")
    decoder = torch.load(pp / layer_file_name(1), weights_only=True)
    assert {f"block_sparse_moe.experts.{e}.w{i}.weight" for e in range(EXPERTS) for i in (1, 2, 3)} <= decoder.keys()

    back = load_file(pp_to_hg(pp, tmp_path / "back") / "model.safetensors")
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) and back[k].dtype == original[k].dtype for k in original)
    reloaded = MixtralForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.bfloat16).state_dict()
    expected = model.state_dict()
    assert reloaded.keys() == expected.keys() and all(torch.equal(reloaded[k], expected[k]) for k in expected)


def test_two_stage_training_learns(tmp_path):
    torch.manual_seed(0)
    hf = tmp_path / "hf"
    MixtralForCausalLM(tiny_config(vocab_size=1024)).save_pretrained(hf)
    copy_tiny_tokenizer(hf)
    save, records = train_two_stages(tmp_path, hg_to_pp(hf, tmp_path / "pp"), parts=[2, 3], n_epochs=1)
    first, last = sum(r["loss"] for r in records[:3]) / 3, sum(r["loss"] for r in records[-3:]) / 3
    assert last < first - 1.0, (first, last)
    # The trained checkpoint exports to files transformers loads (an evaluation pass of transformers' MoE on CPU
    # would cost more than the training; the round-trip test checks the exported tensors bit for bit).
    exported = MixtralForCausalLM.from_pretrained(pp_to_hg(save, tmp_path / "hf_out"))
    final = save / (save / "latest").read_text().strip()
    trained_head = torch.load(final / layer_file_name(5), weights_only=True)["weight"]
    assert torch.equal(exported.lm_head.weight, trained_head)


@pytest.mark.parametrize("key,value", [("sliding_window", 16), ("tie_word_embeddings", True),
                                       ("router_jitter_noise", 0.1)])
def test_unsupported_config_is_refused_at_load(key, value, tmp_path):
    config = tiny_config()
    setattr(config, key, value)
    config.save_pretrained(tmp_path)
    with pytest.raises(PipellmError, match=rf"config\.json: {key} "):
        load_model_config(tmp_path)


def test_mfu_counts_the_experts_a_token_passes_through():
    # 6 * active parameters: the non-expert ones (embedding excluded) and k of E experts' weights in every layer.
    config = tiny_config()
    model = MixtralForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.model.embed_tokens.weight.numel()
    experts = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    active = total - embedding - experts + experts * config.num_experts_per_tok // EXPERTS
    seq = 64
    expected = 6 * active + 12 * config.num_hidden_layers * config.hidden_size * seq
    assert flops_per_token(config, total, embedding, seq) == expected
