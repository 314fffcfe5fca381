"""Bloom: the pipeline's loss and every parameter gradient equal transformers' BloomForCausalLM (fp32, 1 and 2
stages, tied embedding split across the end stages), the converters round-trip both checkpoint layouts bit for
bit, and a 2-stage CPU training (two ranks spawned in-process) learns."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import BloomConfig, BloomForCausalLM

from equivalence import (LAUNCHER_DATA, MICRO_BATCH, assert_matches_reference, copy_tiny_tokenizer, make_batch,
                         run_pipeline_both_losses, train_two_stages)
from pipellm.pipeline.layer_files import layer_file_name
from pipellm.convert.converters import hg_to_pp, pp_to_hg
from pipellm.quickstart import mean_token_loss


def tiny_config(vocab_size: int = 97) -> BloomConfig:
    # 5 heads: not a power of two, so the extra ALiBi slopes are exercised too.
    return BloomConfig(vocab_size=vocab_size, hidden_size=40, n_layer=3, n_head=5, pad_token_id=0)


@pytest.mark.parametrize("dims,gas", [([1, 1], 2), ([2, 1], 1)], ids=["1stage", "2stage"])
def test_loss_and_grads_match_transformers(dims, gas, tmp_path):
    torch.manual_seed(0)
    config = tiny_config()
    reference = BloomForCausalLM(config).float()
    with torch.no_grad():  # non-trivial norms and biases, so their gradients and roles are tested too
        for name, p in reference.named_parameters():
            if name.endswith("bias") or "layernorm" in name or "ln_f" in name:
                p.add_(torch.randn_like(p) * 0.1)
    batch = make_batch(MICRO_BATCH * gas * dims[1], torch.Generator().manual_seed(1))
    input_ids, attention_mask, labels = batch
    ref_loss = reference(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    ref_loss.backward()
    ref_grads = {name: p.grad for name, p in reference.named_parameters()}
    assert "lm_head.weight" not in ref_grads  # tied: the reference's one weight is the embedding's
    state_dict = {k: v.clone() for k, v in reference.state_dict().items()}

    # The whole micro batch's logits at once, and loss_chunk_tokens' chunks.
    for results in run_pipeline_both_losses("bloom", config, state_dict, batch, dims, gas, tmp_path):
        assert_matches_reference(results, ref_loss, ref_grads, set(ref_grads))


def test_both_layouts_round_trip_bit_exact(tmp_path):
    """BloomForCausalLM's ``transformer.`` layout and the bare BloomModel layout (original bigscience files)
    convert to the same layer files; pp_to_hg writes the former, bit for bit, and transformers loads it."""
    torch.manual_seed(0)
    model = BloomForCausalLM(tiny_config())
    model.save_pretrained(tmp_path / "hf")
    model.transformer.save_pretrained(tmp_path / "bare")
    original = load_file(tmp_path / "hf" / "model.safetensors")
    assert "transformer.word_embeddings.weight" in original
    assert "word_embeddings.weight" in load_file(tmp_path / "bare" / "model.safetensors")

    pp, pp_bare = hg_to_pp(tmp_path / "hf", tmp_path / "pp"), hg_to_pp(tmp_path / "bare", tmp_path / "pp_bare")
    assert sorted(p.name for p in pp.glob("layer_*")) == [layer_file_name(i) for i in range(5)]  # tied: no head
    assert set(torch.load(pp / layer_file_name(0), weights_only=True)) == {
        "word_embeddings.weight", "word_embeddings_layernorm.weight", "word_embeddings_layernorm.bias"}
    for i in range(5):
        ours = torch.load(pp / layer_file_name(i), weights_only=True)
        bare = torch.load(pp_bare / layer_file_name(i), weights_only=True)
        assert ours.keys() == bare.keys() and all(torch.equal(ours[k], bare[k]) for k in ours)

    for source in (pp, pp_bare):
        back = load_file(pp_to_hg(source, tmp_path / f"back_{source.name}") / "model.safetensors")
        assert back.keys() == original.keys()
        assert all(torch.equal(back[k], original[k]) and back[k].dtype == original[k].dtype for k in original)
    reloaded = BloomForCausalLM.from_pretrained(tmp_path / "back_pp_bare")
    ids = torch.randint(0, 97, (1, 7))
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_two_stage_training_learns(tmp_path):
    torch.manual_seed(0)
    hf = tmp_path / "hf"
    BloomForCausalLM(tiny_config(vocab_size=1024)).save_pretrained(hf)
    copy_tiny_tokenizer(hf)
    save, records = train_two_stages(tmp_path, hg_to_pp(hf, tmp_path / "pp"), parts=[2, 3], n_epochs=1)
    first, last = sum(r["loss"] for r in records[:3]) / 3, sum(r["loss"] for r in records[-3:]) / 3
    assert last < first - 1.0, (first, last)
    before = mean_token_loss(hf, [LAUNCHER_DATA], 64)
    after = mean_token_loss(pp_to_hg(save, tmp_path / "hf_out"), [LAUNCHER_DATA], 64)
    assert after < before - 1.0, (before, after)
