"""DPO (``objective: dpo``): the pipeline's loss and gradients equal a reference computed here with transformers'
LlamaForCausalLM on the same pairs (fp32; 1 and 2 stages; each loss type; whole-batch and chunked loss; one pair
per two rows and, packed, one pair per row); the micro batches' pair labels; the reference pass and its cache."""
from __future__ import annotations

import math
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import REPO
from distributed import run_distributed
from equivalence import CHUNK_TOKENS, GradCapture, load_reference_weights

SEQ = 24
LOSSES = ("sigmoid", "ipo", "hinge")
BETA, SMOOTHING = 0.5, 0.1


def tiny_config() -> LlamaConfig:
    return LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=False, pad_token_id=0)


class Store:
    """``SampleStore``'s members the batches read; ``margins``: each pair's record margin (default: none)."""

    def __init__(self, samples, margins=None):
        self.samples = samples
        self.lengths = np.array([len(ids) for ids, _ in samples])
        self.margins = np.repeat(np.asarray(margins if margins is not None else [np.nan] * (len(samples) // 2),
                                            dtype=np.float32), 2)

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


def dpo_rank(rank, config, state_dict, samples, reference, micro, cases, out_dir):
    import deepspeed
    from deepspeed.runtime.pipe.topology import ProcessTopology

    from pipellm.config.schema import DPO as DPOConfig
    from pipellm.data.batches import materialize
    from pipellm.models import get_family
    from pipellm.pipeline.preference import DPO
    from pipellm.pipeline.stages import build_pipeline
    from pipellm.training.reference import PairBatches

    family, results = get_family("llama"), []
    store = Store(samples)
    for dims, packed, kind, chunk in cases:
        objective = DPO(DPOConfig(BETA, kind, SMOOTHING if kind == "sigmoid" else 0.0), chunk)
        model = build_pipeline(family, config, ProcessTopology(axes=["pipe", "data"], dims=dims), "uniform",
                               packed=packed, loss_chunk_tokens=chunk, objective=objective)
        names = load_reference_weights(model, family, config, state_dict)
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
        results.append({"loss": loss.detach().clone(),
                        "figures": objective.figures(float(loss), "train"),
                        "grads": {names[k]: g for k, g in optimizer.grads.items() if k in names}})
    torch.save(results, f"{out_dir}/rank{rank}.pt")


# (dims, packed, loss, loss_chunk_tokens): each loss type on 2 stages and on 1 stage x 2 replicas, packed and not,
# whole-batch and chunked; all in one spawn of 2 processes (each case builds its own process grid).
CASES = [([2, 1], False, "sigmoid", None), ([2, 1], True, "ipo", CHUNK_TOKENS), ([2, 1], False, "hinge", CHUNK_TOKENS),
         ([1, 2], True, "sigmoid", CHUNK_TOKENS), ([1, 2], False, "ipo", None), ([1, 2], True, "hinge", None)]


def test_dpo_loss_and_grads_match_transformers(tmp_path):
    torch.manual_seed(0)
    config = tiny_config()
    model = LlamaForCausalLM(config).float()
    samples = make_pairs(4, torch.Generator().manual_seed(1))
    reference = torch.randn(len(samples), generator=torch.Generator().manual_seed(2)) - 10
    state_dict = {k: v.clone() for k, v in model.state_dict().items()}
    run_distributed(2, dpo_rank, config, state_dict, samples, reference, 2, CASES, str(tmp_path))
    per_rank = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for case_index, case in enumerate(CASES):
        kind = case[2]
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
            torch.testing.assert_close(figures["logps/rejected"], float(policy.detach()[1::2].mean()), rtol=1e-5,
                                       atol=1e-6)
        assert seen == set(grads), case


# ----- training on the shipped preference data -----

PREFERENCE_DATA = Path(__file__).resolve().parent.parent / "pipellm" / "assets" / "data" / "preference.jsonl"


def dpo_config(tmp_path: Path, model_path: Path) -> dict:
    return {"model_path": str(model_path), "save_path": str(tmp_path / "save"), "data_path": str(PREFERENCE_DATA),
            "objective": "dpo", "dpo": {"beta": 0.1}, "eval_ratio": 0.2, "max_seq_len": 128, "n_epochs": 2,
            "log_steps": 1, "seed": 3, "use_tensorboard": False, "template": "builtin",
            "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}},
            "train_batch_size": 16, "train_micro_batch_size_per_gpu": 4,
            "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.0}},
            "gradient_clipping": 1.0, "data_cache_dir": str(tmp_path / "data_cache")}


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, tiny_pp_model):
    """DPO on 2 stages, two ranks spawned in-process (the launcher is tested elsewhere)."""
    from equivalence import spawn_training

    tmp_path = tmp_path_factory.mktemp("dpo_run")
    config = dpo_config(tmp_path, tiny_pp_model[1])
    return config, spawn_training(config, tmp_path / "config.yml"), tmp_path


def test_dpo_learns_the_preference(dpo_run):
    """Step 1 starts at log 2 exactly (policy = reference); the rewards' accuracy rises well above 0.5; the
    exported model gives the chosen answers of held-out pairs the higher log-prob."""
    from transformers import AutoTokenizer

    from pipellm.convert.converters import pp_to_hg
    from pipellm.data.batches import SampleStore, split_eval
    from pipellm.data.cache import tokenize_file
    from pipellm.data.samples import DataOptions

    config, records, tmp_path = dpo_run
    first, last = records[0], records[-1]
    assert first["loss"] == float(torch.tensor(math.log(2), dtype=torch.float32))
    assert first["rewards/margins"] == 0.0 and first["rewards/accuracies"] == 0.0
    assert {"rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"} <= set(first)
    assert last["eval_rewards/accuracies"] >= 0.9 and last["eval_loss"] < 0.6
    assert np.mean([r["rewards/accuracies"] for r in records[-3:]]) >= 0.9

    exported = pp_to_hg(Path(config["save_path"]), tmp_path / "hf_out")
    model = LlamaForCausalLM.from_pretrained(exported).float().eval()
    tokenizer = AutoTokenizer.from_pretrained(exported)
    options = DataOptions(config["max_seq_len"], "builtin", pairs=True)
    store = SampleStore([tokenize_file(PREFERENCE_DATA, tokenizer, options, cache_dir=tmp_path / "data_cache",
                                       show_progress=False)])
    _, held_out = split_eval(store, config["eval_ratio"], config["seed"], group=2)
    samples = [store.sample(int(s)) for u in held_out for s in (2 * u, 2 * u + 1)]
    with torch.no_grad():
        logps = reference_logps(model, [(ids, trained.astype(bool)) for ids, trained in samples])
    assert len(held_out) == 12 and bool((logps[0::2] > logps[1::2]).all())


def test_reference_cache_is_keyed_by_weights_data_and_layout(dpo_run, tiny_pp_model):
    """The run cached its reference log-probs under the key a rerun computes; other weights, data, layout or
    kernels give other keys."""
    import copy
    import dataclasses
    import os

    from pipellm.config import load_config
    from pipellm.data.batches import expand, load_training_data
    from pipellm.data.tokenizer import load_tokenizer
    from pipellm.training.reference import cache_key

    config, _, tmp_path = dpo_run
    cfg = load_config(tmp_path / "config.yml")
    data = load_training_data(cfg, load_tokenizer(cfg.model_path), show_progress=False, pairs=True)
    key = cache_key(cfg, data)
    stored = np.load(Path(cfg.save_path) / "reference_logps" / f"{key}.npz")
    trained = expand(np.concatenate(data.plan.train_ids), 2)
    held_out = np.concatenate(data.eval_rows)
    assert len(stored["train"]) == len(stored["eval"]) == len(data.store) == len(trained) + len(held_out)
    assert (stored["train"][trained] < 0).all() and (stored["eval"][held_out] < 0).all()
    changed = copy.deepcopy(cfg)
    changed.seed += 1
    assert cache_key(changed, data) != key
    changed = copy.deepcopy(cfg)
    changed.dpo.reference = str(tmp_path / "save")  # the trained weights
    assert cache_key(changed, data) != key
    for kernels in ({"compile_layers": True}, {"attention_backend": "flex"}):  # other arithmetic
        assert cache_key(dataclasses.replace(cfg, **kernels), data) != key, kernels
    changed = copy.deepcopy(cfg)
    changed.speed.liger_kernels = True
    assert cache_key(changed, data) != key
    layer = next(Path(cfg.model_path).glob("layer_01-*"))
    stat = layer.stat()
    os.utime(layer, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    try:
        assert cache_key(cfg, data) != key
    finally:
        os.utime(layer, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    data.store.files[0].meta["cache_key"] = "other data"
    assert cache_key(cfg, data) != key


# ----- preference records -----

BAD_RECORDS = [
    ({"type": "preference", "rounds": [["ask", "Hi?"]], "rejected": "No."}, "chosen", "missing"),
    ({"type": "preference", "rounds": [["ask", "Hi?"]], "chosen": "Hello."}, "rejected", "missing"),
    ({"type": "preference", "rounds": [["ask", "Hi?"]], "chosen": "Hello.", "rejected": " Hello."}, "rejected",
     "same text"),
    ({"type": "preference", "rounds": [["ask", "Hi?"], ["ans", "Hello."]], "chosen": "A", "rejected": "B"},
     "rounds[1]", "must be an ask"),
    ({"type": "preference", "rounds": [["ask", "Hi?"]], "chosen": "", "rejected": "B"}, "chosen", "empty"),
    ({"type": "preference", "rounds": [["ask", "Hi?"]], "chosen": "A", "rejected": 3}, "rejected",
     "must be a string"),
    ({"type": "preference", "rounds": [["ask", "word " * 40]], "chosen": "A", "rejected": "B"}, "chosen",
     "nothing left to train on"),
    ({"type": "conversation", "rounds": [["ask", "Hi?"], ["ans", "Hello."]]}, "type", "preference records only"),
    ({"type": "preference", "rounds": [["ask", "Hi?"]], "chosen": "A", "rejected": "B", "margin": "1"}, "margin",
     "must be a number >= 0"),
    ({"type": "preference", "rounds": [["ask", "Hi?"]], "chosen": "A", "rejected": "B", "margin": -0.5}, "margin",
     "must be a number >= 0"),
]


@pytest.mark.parametrize("index", range(len(BAD_RECORDS)))
def test_bad_preference_record_named_by_file_line_and_field(index, tmp_path):
    import json

    from pipellm.data.samples import DataOptions, tokenize_chunk
    from pipellm.data.templates import Encoder
    from pipellm.data.tokenizer import load_tokenizer
    from pipellm.errors import PipellmError

    record, field, problem = BAD_RECORDS[index]
    good = {"type": "preference", "rounds": [["ask", "Hi?"]], "chosen": "Hello.", "rejected": "Go away."}
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    from pipellm.data.samples import chunks

    tokenizer = load_tokenizer(REPO / "pipellm" / "assets" / "tiny_llama")
    encoder = Encoder(tokenizer, "builtin")
    with pytest.raises(PipellmError) as error:
        for chunk in chunks(path, lambda n: None):
            tokenize_chunk(encoder, chunk, DataOptions(24, "builtin", pairs=True))
    assert f"{path} line 2: field \"{field}\"" in str(error.value) and problem in str(error.value)


def test_preference_records_need_a_pairwise_objective(tmp_path):
    from pipellm.data.cache import build_dataset
    from pipellm.data.tokenizer import load_tokenizer
    from pipellm.errors import PipellmError

    with pytest.raises(PipellmError, match=r"preference\.jsonl line 1: field \"type\": preference records train "
                                           r"with `objective: dpo`"):
        build_dataset(PREFERENCE_DATA, load_tokenizer(REPO / "pipellm" / "assets" / "tiny_llama"), 64)


@pytest.mark.parametrize("template", ["builtin", "chat"])
def test_pair_samples_train_only_the_final_answer(template):
    """Chosen and rejected share the prompt tokens; only each final answer (+ EOS / end of turn) is trained."""
    from pipellm.data.preference import answer_records, final_answer_only
    from pipellm.data.templates import Encoder

    tokenizer = chat_tokenizer() if template == "chat" else None
    if tokenizer is None:
        from pipellm.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(REPO / "pipellm" / "assets" / "tiny_llama")
    encoder = Encoder(tokenizer, template)
    record = {"type": "preference", "rounds": [("ask", "Hi"), ("ans", "Hello! How can I help?"), ("ask", "2+2?")],
              "chosen": "It is 4.", "rejected": "No idea."}
    for rendered, answer in zip(answer_records(record), ("It is 4.", "No idea.")):
        ids, trained = encoder.encode_many([rendered])[0]
        trained = final_answer_only(trained)
        text = tokenizer.decode(ids[trained])
        assert text.startswith(answer) and "Hello" not in text
        prompt = tokenizer.decode(ids[:np.flatnonzero(trained)[0]])
        assert "2+2?" in prompt and "Hello! How can I help?" in prompt


def chat_tokenizer():
    from pipellm.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(REPO / "pipellm" / "assets" / "tiny_llama")
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    return tokenizer


BAD_DPO_CONFIGS = {
    "beta": (dict(objective="dpo", dpo={"beta": 0}), ["`dpo.beta` must be > 0, got 0"]),
    "loss": (dict(objective="dpo", dpo={"loss": "logistic"}), ["`dpo.loss` must be one of sigmoid, ipo, hinge"]),
    "smoothing range": (dict(objective="dpo", dpo={"label_smoothing": 0.5}), ["`dpo.label_smoothing` must be in"]),
    "smoothing loss": (dict(objective="dpo", dpo={"loss": "ipo", "label_smoothing": 0.1}),
                       ["`dpo.label_smoothing` applies to `dpo.loss: sigmoid` only"]),
    "odd micro batch": (dict(objective="dpo", train_batch_size=3, train_micro_batch_size_per_gpu=3),
                        ["`train_micro_batch_size_per_gpu` must be even, got 3"]),
    "reference path": (dict(objective="dpo", dpo={"reference": "/nonexistent/ref"}),
                       ["`dpo.reference` /nonexistent/ref is not a directory"]),
}


@pytest.mark.parametrize("case", list(BAD_DPO_CONFIGS))
def test_bad_dpo_config_fails_with_one_line(case, tmp_path, tiny_pp_model, capsys, monkeypatch):
    from test_config import assert_fails, write_config

    overrides, expected = BAD_DPO_CONFIGS[case]
    overrides = dict(overrides, data_path=str(PREFERENCE_DATA))
    assert_fails(capsys, monkeypatch, tmp_path, write_config(tmp_path, tiny_pp_model, **overrides), *expected)


def test_zero3_baseline_trains_the_same_dpo_objective(dpo_run, tiny_pp_model):
    """train_ds_zero.py on the Hugging Face weights: its first step is the pipeline's (log 2, same gradient norm)."""
    from equivalence import spawn_training

    config, records, tmp_path = dpo_run
    zero = dict(config, model_path=str(tiny_pp_model[0]), save_path=str(tmp_path / "zero"), max_steps=1,
                save_final=False, model_topo={"process_topology": {"axes": ["pipe", "data"], "dims": [1, 2]}})
    zero_records = spawn_training(zero, tmp_path / "zero.yml", script="train_ds_zero.py")
    assert zero_records[0]["loss"] == records[0]["loss"] == float(torch.tensor(math.log(2), dtype=torch.float32))
    assert zero_records[0]["grad_norm"] == pytest.approx(records[0]["grad_norm"], rel=1e-5)
    assert zero_records[0]["rewards/accuracies"] == 0.0


@pytest.mark.parametrize("packing", [False, True])
def test_epoch_plan_keeps_each_pair_in_one_micro_batch(packing):
    """Without packing a pair is two adjacent rows at an even offset (so in one micro batch of an even size);
    packed, both samples of a pair share a row. Every pair is trained once per epoch."""
    from pipellm.data.batches import EpochPlan

    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 30, size=40)
    plan = EpochPlan(lengths, [np.arange(12), np.arange(12, 20)], [1.0, 1.5], seed=5, max_seq_len=64,
                     packing=packing, global_batch_size=6, group=2)
    offsets, flat = plan.rows(0)
    rows = [flat[offsets[r]:offsets[r + 1]] for r in range(len(offsets) - 1)]
    if packing:
        for row in rows:
            assert len(row) % 2 == 0 and (row[0::2] % 2 == 0).all() and (row[1::2] == row[0::2] + 1).all()
            assert lengths[row].sum() <= 64
    else:
        assert all(len(row) == 1 for row in rows)
        assert (flat[0::2] % 2 == 0).all() and (flat[1::2] == flat[0::2] + 1).all()
    assert sorted(flat[0::2] // 2)[:12] == list(range(12)) and len(flat) == 2 * (12 + 8 + 4)


def test_dpo_benchmark_writes_the_same_rows_for_both_objectives(tmp_path):
    """``benchmarks/dpo_vs_sft.py`` (its ``--smoke`` mode runs both launches on CPU; not repeated here to keep CI
    short): the SFT data holds exactly the pairs' samples, each objective's config trains them, and the reference
    pass time is read from the log line the trainer writes."""
    import json
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    import dpo_vs_sft
    import harness

    pairs, sft = dpo_vs_sft.write_pairs(tmp_path, 3, 16)
    records = [json.loads(line) for line in pairs.read_text().splitlines()]
    conversations = [json.loads(line) for line in sft.read_text().splitlines()]
    assert [c["rounds"] for c in conversations] == [
        [*r["rounds"], ["ans", r[answer]]] for r in records for answer in ("chosen", "rejected")]
    point = harness.Point("pipeline", 16, 4, 2, 1, 2, extra=dpo_vs_sft.point_keys("dpo"))
    config = point.config(tmp_path, pairs, tmp_path / "save")
    assert config["objective"] == "dpo" and config["train_micro_batch_size_per_gpu"] == 2
    line = "pipellm: reference log-probs of 12 samples computed in 3.5s"
    assert dpo_vs_sft.REFERENCE_LINE.search(line).group(2) == "3.5"