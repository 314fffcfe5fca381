"""Reward model (``objective: reward``): the pipeline's loss, figures and every gradient equal a reference computed
here with transformers' LlamaForSequenceClassification on the same pairs (fp32; 1 and 2 stages; packed and not;
whole-batch and chunked head; grad checkpointing; a margin); the pipeline's scores of converted llama and bloom
``*ForSequenceClassification`` checkpoints equal transformers' on the exported ones; ``--init-reward-head``; bad
configs."""
from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import (AutoModelForSequenceClassification, BloomConfig, BloomForSequenceClassification,
                          LlamaForSequenceClassification)

from distributed import run_distributed
from equivalence import CHUNK_TOKENS, GradCapture, load_reference_weights
from test_dpo import PREFERENCE_DATA, SEQ, Store, make_pairs, rows_of, tiny_config

MARGIN = 0.25


def reward_config():
    """The DPO tests' tiny llama as a one-label classifier; tied embeddings, which a reward model never ties."""
    config = tiny_config()
    config.num_labels, config.tie_word_embeddings = 1, True
    return config


def reference_scores(model, samples) -> torch.Tensor:
    """Each sample's score, each sample alone."""
    return torch.stack([model(input_ids=torch.tensor(ids, dtype=torch.long)[None]).logits[0, 0]
                        for ids, _ in samples])


def reward_rank(rank, config, state_dict, samples, cases, scored, out_dir):
    import deepspeed
    from deepspeed.runtime.pipe.topology import ProcessTopology

    from pipellm.config.schema import Reward
    from pipellm.data.batches import materialize
    from pipellm.models import get_family
    from pipellm.pipeline.reward import RewardModel
    from pipellm.pipeline.stages import build_pipeline
    from pipellm.training.reference import PairBatches

    family, results, store = get_family("llama").scoring(), [], Store(samples)
    for dims, packed, chunk, grad_ckpt, margin in cases:
        objective = RewardModel(Reward(margin))
        model = build_pipeline(family, config, ProcessTopology(axes=["pipe", "data"], dims=dims), "uniform",
                               packed=packed, loss_chunk_tokens=chunk, objective=objective, use_grad_ckpt=grad_ckpt)
        names = load_reference_weights(model, family, config, state_dict)
        optimizer = GradCapture(model.parameters())
        rows, micro = rows_of(len(samples) // 2, packed), 2
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config={
            "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": len(rows) // (micro * dims[1]),
            "train_batch_size": len(rows), "steps_per_print": 10**9, "gradient_clipping": 0.0})
        ids, labels, positions, _ = materialize(store, rows, SEQ, pad_id=0)
        batches = PairBatches(types.SimpleNamespace(store=store, eval_store=store), micro, model.data_parallel_rank,
                              dims[1])
        loss = engine.train_batch(iter(batches.micro_batches(rows, "train", ids, labels, positions)))
        results.append({"loss": loss.detach().clone(), "figures": objective.figures(float(loss), "train"),
                        "grads": {names[k]: g for k, g in optimizer.grads.items() if k in names}})
    results.append([pipeline_scores(pp_dir, input_ids) for pp_dir, input_ids in scored])
    torch.save(results, f"{out_dir}/rank{rank}.pt")


def pipeline_scores(pp_dir: str, input_ids: torch.Tensor) -> torch.Tensor:
    """The pipeline's score of each right-padded row's last non-pad token, one stage holding the converted model."""
    from deepspeed.runtime.pipe.topology import ProcessTopology

    from pipellm.models import load_model_config
    from pipellm.pipeline.stages import build_pipeline
    from pipellm.pipeline.weights import load_pipeline_weights

    hf_config, family = load_model_config(pp_dir)
    model = build_pipeline(family, hf_config, ProcessTopology(axes=["pipe", "data"], dims=[1, 2]), "uniform")
    load_pipeline_weights(model, family, hf_config, Path(pp_dir))
    positions = torch.arange(input_ids.shape[1]).expand_as(input_ids)
    with torch.no_grad():
        scores = model.eval()((input_ids, positions)).logits[..., 0]
    last = (input_ids != hf_config.pad_token_id).long().cumsum(1).argmax(1)
    return scores[torch.arange(len(input_ids)), last]


# (dims, packed, loss_chunk_tokens, use_grad_ckpt, margin): 2 stages and 1 stage x 2 replicas, one spawn of 2.
CASES = [([2, 1], False, None, False, 0.0), ([2, 1], True, CHUNK_TOKENS, True, MARGIN),
         ([1, 2], True, None, False, 0.0), ([1, 2], False, CHUNK_TOKENS, True, MARGIN)]


def classifier_checkpoints(root: Path) -> list[tuple[Path, torch.Tensor]]:
    """Tiny random llama and bloom ``*ForSequenceClassification`` checkpoints, each with right-padded rows."""
    from test_dpo import tiny_config as llama_config

    llama = llama_config()
    llama.num_labels = 1
    bloom = BloomConfig(vocab_size=97, hidden_size=32, n_layer=2, n_head=4, num_labels=1, pad_token_id=0)
    out, generator = [], torch.Generator().manual_seed(5)
    for name, model in (("llama", LlamaForSequenceClassification(llama)),
                        ("bloom", BloomForSequenceClassification(bloom))):
        model.save_pretrained(root / name)
        input_ids = torch.randint(1, 97, (3, 9), generator=generator)
        input_ids[0, 6:], input_ids[2, 4:] = 0, 0
        out.append((root / name, input_ids))
    return out


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    """One spawn of 2 processes: the loss cases, and the pipeline's scores of converted classifiers."""
    from pipellm.convert.converters import hg_to_pp

    tmp_path = tmp_path_factory.mktemp("reward")
    torch.manual_seed(0)
    config = reward_config()
    model = LlamaForSequenceClassification(config).float()
    samples = make_pairs(4, torch.Generator().manual_seed(1))
    state_dict = {k: v.clone() for k, v in model.state_dict().items()}
    checkpoints = classifier_checkpoints(tmp_path)
    scored = [(str(hg_to_pp(hf_dir, tmp_path / f"{hf_dir.name}_pp")), ids) for hf_dir, ids in checkpoints]
    run_distributed(2, reward_rank, config, state_dict, samples, CASES, scored, str(tmp_path))
    per_rank = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    return model, samples, per_rank, scored, tmp_path


@pytest.mark.parametrize("case_index", range(len(CASES)))
def test_reward_loss_figures_and_grads_match_transformers(pipeline_run, case_index):
    model, samples, per_rank, _, _ = pipeline_run
    margin = CASES[case_index][4]
    model.zero_grad()
    scores = reference_scores(model, samples)
    chosen, rejected = scores[0::2], scores[1::2]
    expected = (-F.logsigmoid(chosen - rejected - margin)).mean()
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
        chosen, rejected = chosen.detach(), rejected.detach()
        torch.testing.assert_close(figures["rewards/chosen"], float(chosen.mean()), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(figures["rewards/rejected"], float(rejected.mean()), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(figures["rewards/margin"], float((chosen - rejected).mean()), rtol=1e-5, atol=1e-6)
        assert figures["rewards/accuracy"] == float((chosen > rejected).float().mean())
    assert seen == set(grads) and "score.weight" in seen


def test_export_loads_in_transformers_with_the_pipelines_scores(pipeline_run):
    """llama and bloom classifiers: hg_to_pp then pp_to_hg gives back every tensor bit for bit, and
    ``AutoModelForSequenceClassification`` on the export scores each padded row as the pipeline did."""
    from safetensors.torch import load_file

    from pipellm.convert.converters import pp_to_hg

    _, _, per_rank, scored, tmp_path = pipeline_run
    for index, (pp_dir, input_ids) in enumerate(scored):
        original = load_file(tmp_path / Path(pp_dir).name.removesuffix("_pp") / "model.safetensors")
        exported = pp_to_hg(pp_dir, tmp_path / f"{Path(pp_dir).name}_hf")
        tensors = load_file(exported / "model.safetensors")
        assert set(tensors) == set(original) and "score.weight" in tensors
        assert all(torch.equal(tensors[k], original[k]) for k in original)
        config = json.loads((exported / "config.json").read_text())
        assert config["architectures"][0].endswith("ForSequenceClassification") and config["pad_token_id"] == 0
        model = AutoModelForSequenceClassification.from_pretrained(exported).float().eval()
        assert model.num_labels == 1
        with torch.no_grad():
            expected = model(input_ids=input_ids).logits[:, 0]
        for results in per_rank:
            torch.testing.assert_close(results[-1][index], expected, rtol=1e-5, atol=1e-6)


# ----- hg_to_pp --init-reward-head -----

@pytest.fixture(scope="module")
def tiny_reward_model(tmp_path_factory, tiny_pp_model):
    """The embedded tiny llama started as a reward model through the command line."""
    from pipellm.convert.converters import main

    out = tmp_path_factory.mktemp("tiny_reward") / "pp"
    main(["hg_to_pp", "--init-reward-head", "--input-path", str(tiny_pp_model[0]), "--save-path", str(out)])
    return out


def test_init_reward_head_round_trip(tiny_reward_model, tiny_pp_model, tmp_path):
    """The causal LM's layers unchanged, no output projection, a score head of N(0, initializer_range) drawn with
    seed 0; the export is a LlamaForSequenceClassification with exactly those tensors."""
    from safetensors.torch import load_file

    from pipellm.convert.converters import pp_to_hg
    from pipellm.convert.reward import SCORE_HEAD_SEED
    from pipellm.data.cache import pad_token_id
    from pipellm.data.tokenizer import load_tokenizer

    hf_dir = tiny_pp_model[0]
    causal = load_file(hf_dir / "model.safetensors")
    config = json.loads((hf_dir / "config.json").read_text())
    exported = pp_to_hg(tiny_reward_model, tmp_path / "hf")
    tensors = load_file(exported / "model.safetensors")
    assert set(tensors) == (set(causal) - {"lm_head.weight"}) | {"score.weight"}
    assert all(torch.equal(tensors[k], causal[k]) for k in causal if k != "lm_head.weight")
    expected = torch.empty(1, config["hidden_size"]).normal_(
        0.0, config["initializer_range"], generator=torch.Generator().manual_seed(SCORE_HEAD_SEED))
    assert torch.equal(tensors["score.weight"], expected.to(causal["lm_head.weight"].dtype))
    model = AutoModelForSequenceClassification.from_pretrained(exported)
    assert type(model) is LlamaForSequenceClassification and model.num_labels == 1
    assert model.config.pad_token_id == pad_token_id(load_tokenizer(hf_dir))
    assert not model.config.tie_word_embeddings


def test_init_reward_head_refuses_a_reward_model(tiny_reward_model, tmp_path, capsys):
    from pipellm.convert.converters import main, pp_to_hg

    exported = pp_to_hg(tiny_reward_model, tmp_path / "hf")
    with pytest.raises(SystemExit) as exit_info:
        main(["hg_to_pp", "--init-reward-head", "--input-path", str(exported), "--save-path", str(tmp_path / "pp")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err and "is a reward model already" in err, err
    assert not (tmp_path / "pp").exists()


# ----- bad configs -----

BAD_REWARD_CONFIGS = {
    "dpo keys": (dict(objective="reward", dpo={"beta": 0.2}), "`dpo:` settings do not apply to `objective: reward`"),
    "reward keys": (dict(objective="dpo", reward={"margin": 1.0}),
                    "`reward:` settings do not apply to `objective: dpo`"),
    "margin": (dict(objective="reward", reward={"margin": -1.0}), "`reward.margin` must be >= 0"),
    "causal model": (dict(objective="reward", model="causal"), "`objective: reward` needs a reward model"),
    "reward model, other objective": (dict(objective="token_mean", data="sft"), "is a reward model"),
    "supervised data": (dict(objective="reward", data="sft"), "trains on preference records only"),
}


@pytest.mark.parametrize("case", list(BAD_REWARD_CONFIGS))
def test_bad_reward_config_fails_with_one_line(case, tmp_path, tiny_pp_model, tiny_reward_model, capsys,
                                               monkeypatch):
    from test_config import DATA, assert_fails, write_config

    overrides, expected = BAD_REWARD_CONFIGS[case]
    overrides = dict(overrides)
    model = tiny_pp_model if overrides.pop("model", None) else (tiny_pp_model[0], tiny_reward_model)
    data = DATA if overrides.pop("data", None) else str(PREFERENCE_DATA)
    config = write_config(tmp_path, model, data_path=data, data_cache_dir=str(tmp_path / "cache"), **overrides)
    assert_fails(capsys, monkeypatch, tmp_path, config, expected)
