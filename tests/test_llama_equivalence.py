"""The pipeline's loss and every parameter gradient equal transformers' LlamaForCausalLM on the same batch (fp32).

Cases cover 1 and 2 stages, 2 data-parallel replicas with gradient accumulation, tied and untied embeddings,
grouped-query attention, right padding, and a rope scaling type.
"""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from equivalence import MICRO_BATCH, assert_matches_reference, make_batch, run_pipeline_both_losses


def tiny_config(tied: bool, kv_heads: int, rope_parameters=None) -> LlamaConfig:
    return LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
                       tie_word_embeddings=tied, rope_parameters=rope_parameters, pad_token_id=0)


CASES = {
    "1stage-untied-gqa": dict(dims=[1, 1], gas=2, tied=False, kv_heads=2),
    "2stage-untied-gqa": dict(dims=[2, 1], gas=2, tied=False, kv_heads=2),
    "2stage-tied-mha": dict(dims=[2, 1], gas=1, tied=True, kv_heads=4),
    "1stage-tied-gqa-linear-rope": dict(dims=[1, 1], gas=1, tied=True, kv_heads=2,
                                        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
    "2stage-2replica-untied": dict(dims=[2, 2], gas=2, tied=False, kv_heads=2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_grads_match_transformers(case, tmp_path):
    spec = CASES[case]
    torch.manual_seed(0)
    config = tiny_config(spec["tied"], spec["kv_heads"], spec.get("rope_parameters"))
    reference = LlamaForCausalLM(config).float()
    global_batch = MICRO_BATCH * spec["gas"] * spec["dims"][1]
    batch = make_batch(global_batch, torch.Generator().manual_seed(1))
    input_ids, attention_mask, labels = batch
    ref_loss = reference(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    ref_loss.backward()
    ref_grads = {name: p.grad for name, p in reference.named_parameters()}
    state_dict = {k: v.clone() for k, v in reference.state_dict().items()}

    # The whole micro batch's logits at once, and loss_chunk_tokens' chunks.
    for results in run_pipeline_both_losses("llama", config, state_dict, batch, spec["dims"], spec["gas"], tmp_path):
        assert_matches_reference(results, ref_loss, ref_grads,
                                 set(ref_grads) - ({"lm_head.weight"} if spec["tied"] else set()))


def test_compiled_layers_match_eager():
    """``compile_layers`` changes kernels, not maths: same loss and gradients as eager (with checkpointing)."""
    from pipellm.models.attention import AttentionOptions
    from pipellm.data.batches import micro_batches
    from pipellm.models import get_family
    from pipellm.pipeline.loss import token_mean_loss
    from pipellm.pipeline.stages import layer_specs

    config = tiny_config(tied=False, kv_heads=2)
    batch = make_batch(4, torch.Generator().manual_seed(1))
    inputs, labels = micro_batches(batch[0], batch[2], 4, 0, 1)[0]
    results = []
    for compile_layers in (False, True):
        torch.manual_seed(0)
        layers = [spec.build() for spec in layer_specs(get_family("llama"), config, use_grad_ckpt=True,
                                                        attention=AttentionOptions(), compile_layers=compile_layers)]
        hidden = inputs
        for layer in layers:
            hidden = layer(hidden)
        loss = token_mean_loss(hidden, labels)
        loss.backward()
        results.append((loss.detach(), [p.grad for layer in layers for p in layer.parameters()]))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for compiled, eager in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-6)
