"""DPO (``objective: dpo``): the pipeline's loss and gradients equal a reference computed here with transformers'
LlamaForCausalLM on the same pairs (fp32; 1 and 2 stages; each loss type; whole-batch and chunked loss; one pair
per two rows and, packed, one pair per row); the micro batches' pair labels; the reference pass and its cache."""
from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from distributed import run_distributed
from equivalence import CHUNK_TOKENS, GradCapture

SEQ = 24
LOSSES = ("sigmoid", "ipo", "hinge")
BETA, SMOOTHING = 0.5, 0.1


def tiny_config() -> LlamaConfig:
    return LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=False, pad_token_id=0)


class Store:
    """``SampleStore``'s two members the batches read."""

    def __init__(self, samples):
        self.samples = samples
        self.lengths = np.array([len(ids) for ids, _ in samples])

    def sample(self, index):
        return self.samples[index]


def make_pairs(n_pairs: int, generator: torch.Generator):
    """Samples ``2j`` (chosen) and ``2j + 1`` (rejected): a shared prompt, then different answers."""
    samples = []
    for j in range(n_pairs):
        prompt = torch.randint(1, 97, (3 + j % 3,), generator=generator).tolist()
        for k in range(2):
            answer = torch.randint(1, 97, (2 + (j + k) % 4,), generator=generator).tolist()
            ids = np.array(prompt + answer, dtype=np.int32)
            samples.append((ids, np.array([False] * len(prompt) + [True] * len(answer))))
    return samples


def reference_logps(model, samples) -> torch.Tensor:
    """Each sample's summed answer log-prob, each sample alone."""
    out = []
    for ids, trained in samples:
        ids_t = torch.tensor(ids, dtype=torch.long)[None]
        logps = F.log_softmax(model(input_ids=ids_t).logits[0, :-1].float(), -1)
        token = logps.gather(1, ids_t[0, 1:, None])[:, 0]
        out.append(token[torch.tensor(trained[1:])].sum())
    return torch.stack(out)


def reference_loss(policy: torch.Tensor, reference: torch.Tensor, kind: str) -> torch.Tensor:
    """TRL's formulas, the mean over pairs."""
    z = BETA * ((policy[0::2] - policy[1::2]) - (reference[0::2] - reference[1::2]))
    if kind == "sigmoid":
        losses = -F.logsigmoid(z) * (1 - SMOOTHING) - F.logsigmoid(-z) * SMOOTHING
    elif kind == "ipo":
        losses = (z / BETA - 1 / (2 * BETA)) ** 2
    else:
        losses = torch.relu(1 - z)
    return losses.mean()


def rows_of(n_pairs: int, packed: bool) -> list:
    return [np.array([2 * j, 2 * j + 1]) for j in range(n_pairs)] if packed else [np.array([s]) for s in
                                                                                    range(2 * n_pairs)]


def dpo_rank(rank, config, state_dict, samples, reference, dims, micro, cases, out_dir):
    import deepspeed
    from deepspeed.runtime.pipe.topology import ProcessTopology

    from pipellm.data.batches import materialize
    from pipellm.models import get_family
    from pipellm.pipeline.partition import PipelineLayers
    from pipellm.pipeline.preference import DPO, DPOSettings
    from pipellm.pipeline.stages import build_pipeline
    from pipellm.pipeline.weights import layer_module
    from pipellm.training.reference import PairBatches

    family, results = get_family("llama"), []
    store = Store(samples)
    for packed, kind, chunk in cases:
        objective = DPO(DPOSettings(BETA, kind, SMOOTHING if kind == "sigmoid" else 0.0), chunk)
        model = build_pipeline(family, config, ProcessTopology(axes=["pipe", "data"], dims=dims), "uniform",
                               packed=packed, loss_chunk_tokens=chunk, objective=objective)
        layers, names = PipelineLayers.of(family, config), {}
        for index, layer in zip(model.local_layer_indices, model.forward_funcs):
            module = layer_module(layer)
            kind_, decoder = layers.kind(layers.file_index(index))
            keys = {k: family.key_map.hf_key(kind_, decoder, k) for k in module.state_dict()}
            module.load_state_dict({k: state_dict[hf] for k, hf in keys.items()})
            names.update({id(p): keys[n] for n, p in module.named_parameters()})
        optimizer = GradCapture(model.parameters())
        rows = rows_of(len(samples) // 2, packed)
        gas = len(rows) // (micro * dims[1])
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config={
            "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": gas,
            "train_batch_size": len(rows), "steps_per_print": 10**9, "gradient_clipping": 0.0})
        ids, labels, positions, _ = materialize(store, rows, SEQ, pad_id=0)
        data = types.SimpleNamespace(store=store, eval_store=store)
        batches = PairBatches(data, micro, model.data_parallel_rank, dims[1], {"train": reference.numpy()})
        loss = engine.train_batch(iter(batches.micro_batches(rows, "train", ids, labels, positions)))
        results.append({"case": (packed, kind, chunk), "loss": loss.detach().clone(),
                        "figures": objective.figures(float(loss), "train"),
                        "grads": {names[k]: g for k, g in optimizer.grads.items() if k in names}})
    torch.save(results, f"{out_dir}/rank{rank}.pt")


# (packed, loss, loss_chunk_tokens): each loss type, packed and not, whole-batch and chunked, on each layout.
CASES = {"2stages": ([2, 1], [(False, "sigmoid", None), (True, "ipo", CHUNK_TOKENS), (False, "hinge", CHUNK_TOKENS)]),
         "1stage-2replicas": ([1, 2], [(True, "sigmoid", CHUNK_TOKENS), (False, "ipo", None), (True, "hinge", None)])}


@pytest.mark.parametrize("layout", list(CASES))
def test_dpo_loss_and_grads_match_transformers(layout, tmp_path):
    dims, cases = CASES[layout]
    torch.manual_seed(0)
    config = tiny_config()
    model = LlamaForCausalLM(config).float()
    samples = make_pairs(4, torch.Generator().manual_seed(1))
    reference = torch.randn(len(samples), generator=torch.Generator().manual_seed(2)) - 10
    state_dict = {k: v.clone() for k, v in model.state_dict().items()}
    run_distributed(dims[0] * dims[1], dpo_rank, config, state_dict, samples, reference, dims, 2, cases,
                    str(tmp_path))
    per_rank = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(dims[0] * dims[1])]
    for case_index, packed_kind_chunk in enumerate(r["case"] for r in per_rank[0]):
        kind = packed_kind_chunk[1]
        model.zero_grad()
        policy = reference_logps(model, samples)
        expected = reference_loss(policy, reference, kind)
        expected.backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        seen = set()
        for results in per_rank:
            result = results[case_index]
            torch.testing.assert_close(result["loss"], expected.detach(), rtol=1e-5, atol=1e-6)
            for name, grad in result["grads"].items():
                torch.testing.assert_close(grad, grads[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
                seen.add(name)
            figures = result["figures"]
            rewards = BETA * (policy.detach() - reference)
            torch.testing.assert_close(figures["rewards/chosen"], float(rewards[0::2].mean()), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(figures["rewards/margins"], float((rewards[0::2] - rewards[1::2]).mean()),
                                       rtol=1e-5, atol=1e-6)
            assert figures["rewards/accuracies"] == float((rewards[0::2] > rewards[1::2]).float().mean())
            torch.testing.assert_close(figures["logps/rejected"], float(policy.detach()[1::2].mean()), rtol=1e-5, atol=1e-6)
        assert seen == set(grads), packed_kind_chunk
