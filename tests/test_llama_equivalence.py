"""The pipeline's loss and every parameter gradient equal transformers' LlamaForCausalLM on the same batch (fp32).

Cases cover 1 and 2 stages, 2 data-parallel replicas with gradient accumulation, tied and untied embeddings,
grouped-query attention, right padding, and a rope scaling type.
"""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from distributed import run_distributed

MICRO_BATCH = 2
SEQ = 12


def tiny_config(tied: bool, kv_heads: int, rope_parameters=None) -> LlamaConfig:
    return LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
                       tie_word_embeddings=tied, rope_parameters=rope_parameters, pad_token_id=0)


def make_batch(global_batch: int, generator: torch.Generator):
    """Right-padded rows of different lengths; the first tokens of some rows are an untrained prompt."""
    input_ids = torch.randint(1, 97, (global_batch, SEQ), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    labels = input_ids.clone()
    for row in range(global_batch):
        length = SEQ - (row * 3) % 7
        input_ids[row, length:] = 0
        attention_mask[row, length:] = 0
        labels[row, length:] = -100
        labels[row, : row % 3] = -100
    return input_ids, attention_mask, labels


class GradCapture(torch.optim.Optimizer):
    """Records gradients instead of stepping."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.0})
        self.grads = None

    def step(self, closure=None):
        self.grads = {id(p): p.grad.detach().clone() for g in self.param_groups for p in g["params"]
                      if p.grad is not None}


def pipeline_rank(rank, config, state_dict, batch, dims, gas, out_dir):
    import deepspeed
    from deepspeed.runtime.pipe.topology import ProcessTopology

    from pipellm.batches import micro_batches
    from pipellm.models import get_family
    from pipellm.pipeline import _layer_module, build_pipeline

    family = get_family("llama")
    topology = ProcessTopology(axes=["pipe", "data"], dims=dims)
    model = build_pipeline(family, config, topology, "uniform", seed=0)
    # Load this rank's layers straight from the reference state dict through the family's key map.
    names = {}
    for index, layer in zip(model.local_layer_indices, model.forward_funcs):
        module = _layer_module(layer)
        kind, decoder_index = family.layer_kind(index, config)
        if kind == "head" and family.is_tied(config):
            kind = "embed"
        keys = {k: family.key_map.hf_key(kind, decoder_index, k) for k in module.state_dict()}
        module.load_state_dict({k: state_dict[hf] for k, hf in keys.items()})
        names.update({id(p): keys[n] for n, p in module.named_parameters()})
    optimizer = GradCapture(model.parameters())
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config={
        "train_micro_batch_size_per_gpu": MICRO_BATCH, "gradient_accumulation_steps": gas,
        "train_batch_size": MICRO_BATCH * gas * dims[1], "steps_per_print": 10**9,
        "gradient_clipping": 0.0})  # DeepSpeed clips at 1.0 unless told otherwise
    input_ids, _, labels = batch
    data_rank = model._grid.data_parallel_id
    loss = engine.train_batch(iter(micro_batches(input_ids, labels, MICRO_BATCH, data_rank, dims[1])))
    grads = {names[key]: grad for key, grad in optimizer.grads.items()}
    torch.save({"loss": loss.detach().clone(), "grads": grads}, f"{out_dir}/rank{rank}.pt")


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

    world = spec["dims"][0] * spec["dims"][1]
    run_distributed(world, pipeline_rank, config, state_dict, batch, spec["dims"], spec["gas"], str(tmp_path))

    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    seen = set()
    for result in results:
        torch.testing.assert_close(result["loss"], ref_loss.detach(), rtol=1e-5, atol=1e-6)
        for name, grad in result["grads"].items():
            torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
            seen.add(name)
    # Every parameter of the reference got a gradient from some stage.
    assert seen == set(ref_grads) - ({"lm_head.weight"} if spec["tied"] else set())


def test_compiled_layers_match_eager():
    """``compile_layers`` changes kernels, not maths: same loss and gradients as eager (with checkpointing)."""
    from pipellm.attention import AttentionOptions
    from pipellm.batches import micro_batches
    from pipellm.models import get_family
    from pipellm.pipeline import layer_specs, token_mean_loss

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
