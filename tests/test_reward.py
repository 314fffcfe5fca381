"""Reward model (``objective: reward``): the pipeline's loss, figures and every gradient equal a reference computed
here with transformers' LlamaForSequenceClassification on the same pairs (fp32; 1 and 2 stages; packed and not;
whole-batch and chunked head; grad checkpointing; a margin); the pipeline's scores of converted llama, bloom and
mixtral ``*ForSequenceClassification`` checkpoints equal transformers' on the exported ones; ``--init-reward-head``; bad
configs."""
from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import (AutoModelForSequenceClassification, BloomConfig, BloomForSequenceClassification,
                          LlamaForSequenceClassification)

from distributed import run_distributed
from equivalence import CHUNK_TOKENS, GradCapture, add_lora, assert_matches_reference, load_reference_weights
from pipellm.config.schema import Lora
from test_dpo import PREFERENCE_DATA, SEQ, Store, make_pairs, rows_of, tiny_config

MARGIN = 0.25
LORA = Lora(r=4, alpha=8.0, target_modules=["q_proj", "v_proj", "down_proj"], modules_to_save=["head"])
"""The LoRA reward cases' settings: the score head trains fully, as a LoRA reward run must."""
PEFT_PREFIX = "base_model.model."
PEFT_SCORE = "score.modules_to_save.default.weight"
"""peft's name of the trained copy of the score head (``modules_to_save``)."""
STARTED = ("baichuan", "chatglm")
"""Families whose reward models the pipeline scores after ``--init-reward-head`` (no transformers classifier)."""


def reward_config():
    """The DPO tests' tiny llama as a one-label classifier; tied embeddings, which a reward model never ties."""
    config = tiny_config()
    config.num_labels, config.tie_word_embeddings = 1, True
    return config


def reference_scores(model, samples) -> torch.Tensor:
    """Each sample's score, each sample alone."""
    return torch.stack([model(input_ids=torch.tensor(ids, dtype=torch.long)[None]).logits[0, 0]
                        for ids, _ in samples])


def reward_rank(rank, config, state_dict, samples, cases, scored, lora_run, out_dir):
    from pipellm.models import get_family

    family = get_family("llama").scoring()
    results = {"cases": [train_batch(family, config, state_dict, samples, *case)[1] for case in cases],
               "scores": [pipeline_scores(pp_dir, input_ids) for pp_dir, input_ids in scored],
               "lora": lora_reward_cases(rank, samples, *lora_run, out_dir)}
    torch.save(results, f"{out_dir}/rank{rank}.pt")


def train_batch(family, config, state_dict, samples, dims, packed, chunk, grad_ckpt, margin, record_margins=None,
                lora=None):
    """One training batch of the pairs (``record_margins``: each pair's record ``margin``, NaN: none) on the
    reference's weights (LoRA: peft's names, ``add_lora``): the pipeline and its loss, figures and every gradient
    by checkpoint key."""
    import deepspeed
    from deepspeed.runtime.pipe.topology import ProcessTopology

    from pipellm.config.schema import Reward
    from pipellm.data.batches import materialize
    from pipellm.pipeline.reward import RewardModel
    from pipellm.pipeline.stages import build_pipeline
    from pipellm.training.reference import PairBatches

    store, objective = Store(samples, record_margins), RewardModel(Reward(margin))
    model = build_pipeline(family, config, ProcessTopology(axes=["pipe", "data"], dims=dims), "uniform",
                           packed=packed, loss_chunk_tokens=chunk, objective=objective, use_grad_ckpt=grad_ckpt)
    if lora is not None:
        add_lora(model, family, config, lora)
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
    return model, {"loss": loss.detach().clone(), "figures": objective.figures(float(loss), "train"),
                   "grads": {names[k]: g for k, g in optimizer.grads.items() if k in names}}


def lora_reward_cases(rank, samples, base_dir, state_dict, input_ids, out_dir) -> list[dict]:
    """LoRA on the llama classifier converted to ``base_dir``, with peft's weights ``state_dict``: one batch on 2
    stages and on 1 stage x 2 replicas; on the latter, each rank's scores of ``input_ids`` and rank 0 saves the
    stage as a LoRA checkpoint (``lora_ckpt``: its layer files as a training checkpoint writes them, ``lora.json``)
    for the exports."""
    from pipellm.models import load_model_config
    from pipellm.pipeline.layer_files import copy_model_files, layer_file_name
    from pipellm.pipeline.weights import layer_state, stage_modules
    from pipellm.training.lora import LoraParameters

    config, family = load_model_config(base_dir)
    results = []
    for dims in ([2, 1], [1, 2]):
        model, result = train_batch(family, config, state_dict, samples, dims, False, None, False, 0.0, lora=LORA)
        results.append(result)
    result["scores"] = scores_of(model, input_ids, config.pad_token_id)
    if rank == 0:
        ckpt = Path(out_dir) / "lora_ckpt"
        ckpt.mkdir()
        for index, module in stage_modules(model):  # one stage: every layer, none tied
            torch.save(layer_state(module, saves_frozen=False), ckpt / layer_file_name(index))
        LoraParameters(LORA, seed=0, key_map=family.key_map, base_model_path=base_dir).write_files(ckpt)
        copy_model_files(Path(base_dir), ckpt)
    return results


def pipeline_scores(pp_dir: str, input_ids: torch.Tensor) -> torch.Tensor:
    """The pipeline's score of each right-padded row's last non-pad token, one stage holding the converted model."""
    from deepspeed.runtime.pipe.topology import ProcessTopology

    from pipellm.models import load_model_config
    from pipellm.pipeline.stages import build_pipeline
    from pipellm.pipeline.weights import load_pipeline_weights

    hf_config, family = load_model_config(pp_dir)
    model = build_pipeline(family, hf_config, ProcessTopology(axes=["pipe", "data"], dims=[1, 2]), "uniform")
    load_pipeline_weights(model, family, hf_config, Path(pp_dir))
    return scores_of(model, input_ids, hf_config.pad_token_id)


def scores_of(model, input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """A one-stage pipeline's score of each right-padded row at its last non-pad token."""
    positions = torch.arange(input_ids.shape[1]).expand_as(input_ids)
    with torch.no_grad():
        scores = model.eval()((input_ids, positions)).logits[..., 0]
    last = (input_ids != pad_id).long().cumsum(1).argmax(1)
    return scores[torch.arange(len(input_ids)), last]


RECORD_MARGINS = (0.5, float("nan"), 0.0, 1.5)
"""The pairs' record ``margin`` (NaN: none given, ``reward.margin`` applies)."""
# (dims, packed, loss_chunk_tokens, use_grad_ckpt, margin, record margins): 2 stages and 1 stage x 2 replicas, one
# spawn of 2.
CASES = [([2, 1], False, None, False, 0.0, None), ([2, 1], True, CHUNK_TOKENS, True, MARGIN, None),
         ([1, 2], True, None, False, 0.0, RECORD_MARGINS), ([1, 2], False, CHUNK_TOKENS, True, MARGIN, None),
         ([2, 1], False, None, False, MARGIN, RECORD_MARGINS)]


def classifier_checkpoints(root: Path) -> list[tuple[Path, torch.Tensor]]:
    """Tiny random llama, bloom and mixtral ``*ForSequenceClassification`` checkpoints, each with right-padded
    rows."""
    from test_dpo import tiny_config as llama_config
    from test_mixtral import tiny_config as mixtral_config
    from transformers import MixtralForSequenceClassification

    llama, mixtral = llama_config(), mixtral_config()
    llama.num_labels, mixtral.num_labels, mixtral.pad_token_id = 1, 1, 0
    bloom = BloomConfig(vocab_size=97, hidden_size=32, n_layer=2, n_head=4, num_labels=1, pad_token_id=0)
    out, generator = [], torch.Generator().manual_seed(5)
    for name, model in (("llama", LlamaForSequenceClassification(llama)),
                        ("bloom", BloomForSequenceClassification(bloom)),
                        ("mixtral", MixtralForSequenceClassification(mixtral))):
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
    started = {}
    for family in STARTED:
        _, _, hidden_model = family_checkpoint(family, tmp_path / f"{family}_hf")
        pp_dir = hg_to_pp(tmp_path / f"{family}_hf", tmp_path / f"{family}_rm", init_reward_head=True)
        pad_id = json.loads((pp_dir / "config.json").read_text())["pad_token_id"]
        input_ids = torch.randint(pad_id + 1, 97, (3, 9), generator=torch.Generator().manual_seed(6))
        input_ids[1, 5:] = pad_id
        started[family] = (hidden_model, input_ids, pp_dir, pad_id)
        scored.append((str(pp_dir), input_ids))
    lora_base, lora_rows = checkpoints[0]  # the llama classifier: LoRA's base (scored[0] is its conversion)
    peft_model = peft_reward_model(lora_base)
    peft_state = {peft_name(k): v.detach().clone() for k, v in peft_model.state_dict().items()}
    run_distributed(2, reward_rank, config, state_dict, samples, CASES, scored,
                    (scored[0][0], peft_state, lora_rows), str(tmp_path))
    per_rank = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    return model, samples, per_rank, scored, tmp_path, started, (peft_model, lora_base, lora_rows)


def peft_name(name: str) -> str:
    """A peft parameter's name as the LoRA pipeline names it (the trained score head is ``score.weight``)."""
    return name.removeprefix(PEFT_PREFIX).replace(PEFT_SCORE, "score.weight")


def peft_reward_model(hf_dir: Path):
    """peft's LoRA on the llama classifier in ``hf_dir`` with ``LORA``'s adapters, ``score`` trained whole
    (``modules_to_save``); every ``lora_B`` and the trained score random, so that every adapter has a gradient
    and the trained model differs from the base."""
    from peft import LoraConfig, get_peft_model

    base = LlamaForSequenceClassification.from_pretrained(hf_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=LORA.r, lora_alpha=LORA.alpha, lora_dropout=0.0,
                                            target_modules=LORA.target_modules, modules_to_save=["score"]))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name or name.endswith(PEFT_SCORE):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return model


@pytest.mark.parametrize("case_index", range(len(CASES)))
def test_reward_loss_figures_and_grads_match_transformers(pipeline_run, case_index):
    model, samples, per_rank, *_ = pipeline_run
    margin, record_margins = CASES[case_index][4:]
    if record_margins is not None:
        margin = torch.tensor(record_margins).nan_to_num(margin)
    model.zero_grad()
    scores = reference_scores(model, samples)
    chosen, rejected = scores[0::2], scores[1::2]
    expected = (-F.logsigmoid(chosen - rejected - margin)).mean()
    expected.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert_matches_reference([results["cases"][case_index] for results in per_rank], expected, grads, set(grads))
    assert "score.weight" in grads
    chosen, rejected = chosen.detach(), rejected.detach()
    for results in per_rank:
        figures = results["cases"][case_index]["figures"]
        torch.testing.assert_close(figures["rewards/chosen"], float(chosen.mean()), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(figures["rewards/rejected"], float(rejected.mean()), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(figures["rewards/margin"], float((chosen - rejected).mean()), rtol=1e-5, atol=1e-6)
        assert figures["rewards/accuracy"] == float((chosen > rejected).float().mean())


def test_export_loads_in_transformers_with_the_pipelines_scores(pipeline_run):
    """llama, bloom and mixtral classifiers: hg_to_pp then pp_to_hg gives back every tensor bit for bit, and
    ``AutoModelForSequenceClassification`` on the export scores each padded row as the pipeline did."""
    from safetensors.torch import load_file

    from pipellm.convert.converters import pp_to_hg

    _, _, per_rank, scored, tmp_path, *_ = pipeline_run
    for index, (pp_dir, input_ids) in enumerate(scored[:len(scored) - len(STARTED)]):
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
            torch.testing.assert_close(results["scores"][index], expected, rtol=1e-5, atol=1e-6)


def test_lora_reward_model_matches_peft_on_1_and_2_stages(pipeline_run):
    """LoRA with the score head in ``modules_to_save``: the loss and every trainable gradient (adapters and head)
    equal peft's on LlamaForSequenceClassification, on 2 stages and on 1 stage x 2 replicas."""
    _, samples, per_rank, *_, (peft_model, _, _) = pipeline_run
    peft_model.zero_grad()
    scores = reference_scores(peft_model, samples)
    expected = (-F.logsigmoid(scores[0::2] - scores[1::2])).mean()
    expected.backward()
    grads = {peft_name(n): p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    assert "score.weight" in grads and len(grads) == 1 + 2 * 3 * 2  # head + A and B of 3 targets x 2 layers
    for index in range(2):
        assert_matches_reference([results["lora"][index] for results in per_rank], expected, grads, set(grads))


def test_lora_reward_exports_merged_and_as_a_peft_adapter(pipeline_run):
    """The LoRA checkpoint of the trained stage: ``pp_to_hg`` merged is a LlamaForSequenceClassification, and
    ``--lora-export adapter`` a peft SEQ_CLS adapter (``score`` saved whole) on the base classifier; both score
    padded rows as the pipeline and peft do."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from pipellm.convert.converters import pp_to_hg

    _, _, per_rank, _, tmp_path, _, (peft_model, base_hf, rows) = pipeline_run
    with torch.no_grad():
        expected = peft_model.eval()(input_ids=rows).logits[:, 0]
    for results in per_rank:
        torch.testing.assert_close(results["lora"][1]["scores"], expected, rtol=1e-5, atol=1e-6)
    merged = AutoModelForSequenceClassification.from_pretrained(pp_to_hg(tmp_path / "lora_ckpt",
                                                                         tmp_path / "lora_merged")).eval()
    assert type(merged) is LlamaForSequenceClassification and merged.num_labels == 1
    adapter = pp_to_hg(tmp_path / "lora_ckpt", tmp_path / "lora_adapter", lora_export="adapter")
    trained_head = peft_model.base_model.model.score.modules_to_save["default"].weight
    assert torch.equal(load_file(adapter / "adapter_model.safetensors")[f"{PEFT_PREFIX}score.weight"], trained_head)
    loaded = PeftModel.from_pretrained(LlamaForSequenceClassification.from_pretrained(base_hf), adapter).eval()
    with torch.no_grad():
        for model in (merged, loaded):
            torch.testing.assert_close(model(input_ids=rows).logits[:, 0], per_rank[0]["lora"][1]["scores"],
                                       rtol=1e-5, atol=1e-6)


def test_started_reward_models_of_baichuan_and_chatglm_score_their_final_hidden_state(pipeline_run):
    """Families transformers has no classifier for: the pipeline's score is ``score.weight`` on the final norm's
    output at the last non-pad token, the hidden state computed by the transformers model of the same weights."""
    _, _, per_rank, scored, _, started, _ = pipeline_run
    for offset, family in enumerate(STARTED):
        hidden_model, input_ids, pp_dir, pad_id = started[family]
        head_file = sorted(pp_dir.glob("layer_*-model_states.pt"))[-1]  # the last layer: the score head
        head = torch.load(head_file, weights_only=True)["weight"]
        assert head.shape == (1, hidden_model.config.hidden_size)
        with torch.no_grad():
            hidden = hidden_model(input_ids=input_ids).last_hidden_state
        last = (input_ids != pad_id).long().cumsum(1).argmax(1)
        expected = (hidden[torch.arange(len(input_ids)), last] @ head.T)[:, 0]
        for results in per_rank:
            torch.testing.assert_close(results["scores"][len(scored) - len(STARTED) + offset], expected,
                                       rtol=1e-5, atol=1e-6)


def test_record_margins_travel_from_the_data_to_the_labels(tmp_path):
    """A preference record's ``margin`` is cached with its two samples (NaN where none is given) and reaches each
    slot of the micro batch's ``PairLabels``; a run with a reference pass (DPO) refuses such data, naming the
    file."""
    import numpy as np

    from conftest import REPO
    from pipellm.data.batches import SampleStore, materialize
    from pipellm.data.cache import tokenize_file
    from pipellm.data.samples import DataOptions
    from pipellm.data.tokenizer import load_tokenizer
    from pipellm.errors import PipellmError
    from pipellm.training.reference import PairBatches, check_no_margins

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"type": "preference", "rounds": [["ask", f"Question {i}?"]], "chosen": "Yes.",
                                        "rejected": "No.", **extra}) + "\n"
                            for i, extra in enumerate([{"margin": 1.5}, {}, {"margin": 0}])))
    tokenized = tokenize_file(path, load_tokenizer(REPO / "pipellm" / "assets" / "tiny_llama"),
                              DataOptions(64, "builtin", pairs=True), cache_dir=tmp_path / "cache", show_progress=False)
    assert tokenized.meta["margins"] == 2
    store = SampleStore([tokenized])
    rows = [np.array([sample]) for sample in range(6)]
    ids, labels, positions, _ = materialize(store, rows, 64, pad_id=0)
    data = types.SimpleNamespace(store=store, eval_store=store)
    [(_, pair_labels)] = PairBatches(data, 6, 0, 1).micro_batches(rows, "train", ids, labels, positions)
    nan = float("nan")
    torch.testing.assert_close(pair_labels.margins, torch.tensor([1.5, 1.5, nan, nan, 0.0, 0.0]), equal_nan=True)
    with pytest.raises(PipellmError, match=f"{path}: 2 preference records give a `margin`, which only "):
        check_no_margins(data)


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

    from pipellm.chat import load_chat
    from pipellm.convert.converters import pp_to_hg
    from pipellm.convert.reward import SCORE_HEAD_SEED
    from pipellm.data.cache import pad_token_id
    from pipellm.data.tokenizer import load_tokenizer
    from pipellm.errors import PipellmError

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
    with pytest.raises(PipellmError, match="is a reward model: it scores answers and writes none"):
        load_chat(exported, "builtin", 8)


def test_init_reward_head_refuses_a_reward_model(tiny_reward_model, tmp_path, capsys):
    from pipellm.convert.converters import main, pp_to_hg

    exported = pp_to_hg(tiny_reward_model, tmp_path / "hf")
    with pytest.raises(SystemExit) as exit_info:
        main(["hg_to_pp", "--init-reward-head", "--input-path", str(exported), "--save-path", str(tmp_path / "pp")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err and "is a reward model already" in err, err
    assert not (tmp_path / "pp").exists()


def family_checkpoint(family: str, path: Path) -> tuple[dict, str, torch.nn.Module]:
    """A tiny random causal LM of ``family`` in its released layout (the other families' tests write them), with
    the tiny tokenizer: its tensors, the key of its output projection, and a transformers model of the same
    weights up to the final norm (the reference of the reward model's hidden states)."""
    from equivalence import copy_tiny_tokenizer

    torch.manual_seed(0)
    if family == "mixtral":
        from test_mixtral import saved_checkpoint, tiny_config as mixtral_config
        from transformers import MixtralForCausalLM

        model = MixtralForCausalLM(mixtral_config())
        out = saved_checkpoint(model, path), "lm_head.weight", model.model
    elif family == "baichuan":
        from test_baichuan import baichuan_config, llama_reference, llama_to_baichuan, write_checkpoint

        model = llama_reference()
        state_dict = llama_to_baichuan({n: p.detach() for n, p in model.named_parameters()})
        write_checkpoint(path, baichuan_config(), state_dict)
        out = state_dict, "lm_head.weight", model.model
    else:
        from test_chatglm import tiny_glm, write_chatglm_checkpoint
        from transformers import GlmForCausalLM

        model = GlmForCausalLM(tiny_glm())
        out = write_chatglm_checkpoint(model, path), "transformer.output_layer.weight", model.model
    copy_tiny_tokenizer(path)
    return out


@pytest.mark.parametrize("family", ["mixtral", "baichuan", "chatglm"])
def test_init_reward_head_of_the_other_families(family, tmp_path):
    """Each family's own layout with ``score.weight`` in place of the output projection, every other tensor bit
    for bit; a second hg_to_pp / pp_to_hg round trip changes nothing; mixtral's loads in transformers."""
    from safetensors.torch import load_file

    from pipellm.convert.converters import hg_to_pp, pp_to_hg

    original, head, _ = family_checkpoint(family, tmp_path / "hf")
    exported = pp_to_hg(hg_to_pp(tmp_path / "hf", tmp_path / "pp", init_reward_head=True), tmp_path / "out")
    tensors = load_file(exported / "model.safetensors")
    assert set(tensors) == (set(original) - {head}) | {"score.weight"}
    assert all(torch.equal(tensors[k], original[k]) for k in original if k != head)
    again = load_file(pp_to_hg(hg_to_pp(exported, tmp_path / "pp2"), tmp_path / "out2") / "model.safetensors")
    assert set(again) == set(tensors) and all(torch.equal(again[k], tensors[k]) for k in tensors)
    if family == "mixtral":
        model = AutoModelForSequenceClassification.from_pretrained(exported)
        assert type(model).__name__ == "MixtralForSequenceClassification" and model.num_labels == 1
        assert torch.equal(model.score.weight, tensors["score.weight"])


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


# ----- training on the shipped preference data -----

@pytest.fixture(scope="module")
def reward_run(tmp_path_factory, tiny_reward_model):
    """One epoch of the shipped pairs on 2 stages with grad checkpointing, saved at step 3; then a second run
    resumed from that checkpoint (each on two ranks spawned in-process: the launcher is tested elsewhere)."""
    from equivalence import spawn_training
    from test_dpo import dpo_config

    tmp_path = tmp_path_factory.mktemp("reward_run")
    config = dict(dpo_config(tmp_path, tiny_reward_model), objective="reward", reward={"margin": 0.1},
                  use_grad_ckpt=True, save_steps=3, n_epochs=1)
    del config["dpo"]
    records = spawn_training(config, tmp_path / "config.yml")
    resumed = dict(config, save_path=str(tmp_path / "resumed"), resume=str(Path(config["save_path"]) / "global_step3"))
    return config, records, spawn_training(resumed, tmp_path / "resumed.yml"), tmp_path


def test_reward_model_learns_and_resumes(reward_run):
    """The loss falls and the held-out accuracy is high; the exported LlamaForSequenceClassification scores the
    chosen answer of held-out pairs higher; the run resumed at step 3 logs exactly the same steps 4 to 6."""
    from pipellm.convert.converters import pp_to_hg
    from pipellm.data.batches import SampleStore, split_eval
    from pipellm.data.cache import tokenize_file
    from pipellm.data.samples import DataOptions
    from pipellm.data.tokenizer import load_tokenizer

    config, records, resumed, tmp_path = reward_run
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin"} <= set(records[0])
    assert len(records) == 6 and records[-1]["loss"] < 0.6 * records[0]["loss"]
    assert records[-1]["eval_rewards/accuracy"] >= 0.9
    assert [r["step"] for r in resumed] == [4, 5, 6]
    for ours, theirs in zip(resumed, records[3:]):
        assert ours["loss"] == theirs["loss"] and ours["rewards/margin"] == theirs["rewards/margin"]
    assert resumed[-1]["eval_loss"] == records[-1]["eval_loss"]
    exported = pp_to_hg(Path(config["save_path"]), tmp_path / "hf_out")
    model = AutoModelForSequenceClassification.from_pretrained(exported).float().eval()
    options = DataOptions(config["max_seq_len"], "builtin", pairs=True)
    store = SampleStore([tokenize_file(PREFERENCE_DATA, load_tokenizer(exported), options,
                                       cache_dir=tmp_path / "data_cache", show_progress=False)])
    _, held_out = split_eval(store, config["eval_ratio"], config["seed"], group=2)
    with torch.no_grad():
        scores = reference_scores(model, [store.sample(int(s)) for u in held_out for s in (2 * u, 2 * u + 1)])
    assert len(held_out) == 12 and float((scores[0::2] > scores[1::2]).float().mean()) >= 0.9


def test_shipped_reward_config_is_valid():
    from conftest import REPO
    from pipellm.config import load_config

    cfg = load_config(REPO / "configs" / "llama7b_reward.yml")
    assert cfg.objective == "reward" and cfg.reward.margin == 0.0 and len(cfg.model_topo.parts) == cfg.pipe_degree


def test_parts_auto_profiles_the_score_head():
    """``parts: auto`` times a reward model's head (final norm + score head) as it trains."""
    from conftest import REPO
    from pipellm.models import load_model_config
    from pipellm.plan.profile import RunShape, profile_layers

    hf_config, family = load_model_config(REPO / "pipellm" / "assets" / "tiny_llama")
    shape = RunShape(micro_batch=2, seq_len=16, dtype=torch.float32, grad_ckpt=False, flash_attn=False,
                     packed=False, compile_layers=False)
    profile = profile_layers(family.scoring(), hf_config, shape, torch.device("cpu"))
    assert profile.head.params == 2 * hf_config.hidden_size and profile.tied_params == 0
    assert profile.head.seconds > 0


def test_zero3_baseline_trains_the_same_reward_objective(reward_run, tiny_reward_model):
    """train_ds_zero.py on the exported LlamaForSequenceClassification (grad checkpointing, the margin): its first
    step is the pipeline's (loss, gradient norm, rewards figures)."""
    from equivalence import spawn_training
    from pipellm.convert.converters import pp_to_hg

    config, records, _, tmp_path = reward_run
    zero = dict(config, model_path=str(pp_to_hg(tiny_reward_model, tmp_path / "zero_hf")),
                save_path=str(tmp_path / "zero"), max_steps=1, save_final=False,
                model_topo={"process_topology": {"axes": ["pipe", "data"], "dims": [1, 2]}})
    first = spawn_training(zero, tmp_path / "zero.yml", script="train_ds_zero.py")[0]
    assert first["step"] == 1 and first["loss"] == pytest.approx(records[0]["loss"], rel=1e-5)
    assert first["grad_norm"] == pytest.approx(records[0]["grad_norm"], rel=1e-5)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margin"):
        assert first[name] == pytest.approx(records[0][name], rel=1e-5, abs=1e-7), name
    assert first["rewards/accuracy"] == records[0]["rewards/accuracy"]


def test_zero3_reward_objective_needs_a_classifier(tmp_path, tiny_pp_model, capsys, monkeypatch):
    from test_config import write_config

    from pipellm.training.zero import main

    config = write_config(tmp_path, (None, tiny_pp_model[0]), objective="reward", data_path=str(PREFERENCE_DATA),
                          model_topo={"process_topology": {"axes": ["pipe", "data"], "dims": [1, 2]}})
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(config)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err, err
    assert "`objective: reward` needs a reward model" in err and not (tmp_path / "save").exists()
