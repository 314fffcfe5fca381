"""LoRA (``lora:``): the pipeline's loss and every adapter gradient equal peft's LoRA on the transformers model
with the same weights and adapters (fp32; 2 stages, and 1 stage with 2 data-parallel replicas), for every family.
Through the launcher: a stage with nothing to train, the checkpoint's contents, exact resume after SIGKILL and the
exports; the planner's LoRA memory model and the LoRA MFU formula; bad LoRA settings are one line.

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

import dataclasses
import importlib.util

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


def case(family, config, state_dict, loss, grads, targets, batch, gas, dims, **extra):
    return dict(family=family, config=config, state_dict=state_dict, batch=batch, gas=gas, dims=dims,
                lora=Lora(r=RANK, alpha=ALPHA, target_modules=targets), expected=(loss, grads), **extra)


def llama_cases(dims, tmp_path):
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
        cases.append(case("llama", config, state, loss, grads, targets, batch, gas=2, dims=dims))
    cases.append(dict(cases[-1], loss_chunk_tokens=5))  # tied, and the loss a chunk of tokens at a time
    # Tied, the shared embedding trained too (``modules_to_save``): on 2 stages both copies hold the summed gradient.
    torch.manual_seed(0)
    reference = with_adapters(LlamaForCausalLM(config), targets)
    reference.model.embed_tokens.weight.requires_grad_(True)
    loss, grads, state = run_reference(reference, batch)
    cases.append(dict(case("llama", config, state, loss, grads, targets, batch, gas=2, dims=dims),
                      lora=Lora(r=RANK, alpha=ALPHA, target_modules=targets, modules_to_save=["embed", "head"])))
    return cases


def bloom_case(dims, tmp_path):
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    config = BloomConfig(vocab_size=97, hidden_size=40, n_layer=3, n_head=5, pad_token_id=0)
    targets = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
    batch = make_batch(MICRO_BATCH * dims[1], torch.Generator().manual_seed(1))
    loss, grads, state = run_reference(with_adapters(BloomForCausalLM(config), targets), batch)
    return case("bloom", config, state, loss, grads, targets, batch, gas=1, dims=dims)


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
    config, _ = load_model_config(write_checkpoint(tmp_path / "baichuan", baichuan_config(), base))
    return case("baichuan", config, state, loss, grads, ["W_pack", "o_proj", "down_proj"], batch, gas=1,
                dims=dims)


def chatglm_case(dims, tmp_path):
    from transformers import GlmForCausalLM

    from test_chatglm import tiny_glm, to_chatglm, write_chatglm_checkpoint
    from pipellm.models import load_model_config

    torch.manual_seed(0)
    glm = GlmForCausalLM(tiny_glm())
    write_chatglm_checkpoint(glm, tmp_path / "chatglm")
    config, _ = load_model_config(tmp_path / "chatglm")
    reference = with_adapters(glm, QKV + ["o_proj", "gate_up_proj", "down_proj"], shared_a=tuple(QKV))
    batch = make_batch(MICRO_BATCH * dims[1], torch.Generator().manual_seed(1))
    loss, grads, state = run_reference(reference, batch)
    fused = "self_attention.query_key_value"
    state = to_chatglm(fuse_adapters(state, [f"self_attn.{p}" for p in QKV], fused, gradients=False))
    grads = to_chatglm(fuse_adapters(grads, [f"self_attn.{p}" for p in QKV], fused, gradients=True))
    return case("chatglm", config, state, loss, grads, ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
                batch, gas=1, dims=dims)


def mixtral_case(dims, tmp_path):
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
    # Several micro batches: the documented convention, the mean of each micro batch's load-balancing term
    # (tests/test_mixtral.py); one: transformers' loss itself.
    loss = reference(input_ids=input_ids, labels=labels, output_router_logits=dims[1] == 1).loss
    if dims[1] > 1:
        aux = [reference(input_ids=rows, output_router_logits=True).aux_loss for rows in input_ids.split(MICRO_BATCH)]
        loss = loss + config.router_aux_loss_coef * torch.stack(aux).mean()
    loss.backward()
    grads = to_file_layout({name: p.grad for name, p in reference.named_parameters() if p.requires_grad})
    state = {k: v for k, v in to_file_layout(reference.state_dict()).items() if ".experts." not in k}
    for name, (a, b) in experts.items():
        module = name.removesuffix(".weight")
        state.update({f"{module}.base_layer.weight": base[name], f"{module}.lora_A.default.weight": a,
                      f"{module}.lora_B.default.weight": b})
        merged_grad = grads.pop(name)
        grads.update({f"{module}.lora_A.default.weight": SCALE * b.T @ merged_grad,
                      f"{module}.lora_B.default.weight": SCALE * merged_grad @ a.T})
    return case("mixtral", config, state, loss, grads, QKV + ["o_proj", "w1", "w2", "w3"], batch, gas=1, dims=dims)


def test_every_family_matches_peft(tmp_path):
    """Every family on 2 stages, and on 1 stage with 2 data-parallel replicas (each rank the whole model and half
    the global batch), in one spawn of the process group."""
    cases = []
    for dims in ([2, 1], [1, 2]):
        (tmp_path / f"{dims[0]}x{dims[1]}").mkdir()
        cases += [family_case(dims, tmp_path / f"{dims[0]}x{dims[1]}")
                  for family_case in (llama_cases, bloom_case, baichuan_case, chatglm_case, mixtral_case)]
    cases = [c for group in cases for c in (group if isinstance(group, list) else [group])]
    results = run_cases([{k: v for k, v in c.items() if k != "expected"} for c in cases], tmp_path)
    for c, case_results in zip(cases, results, strict=True):
        loss, grads = c["expected"]
        assert_matches_reference(case_results, loss, grads, set(grads))


BAD_LORA = {
    "unknown target": (dict(lora={"target_modules": ["q_proj", "query_key_value"]}),
                       ["`lora.target_modules` ['query_key_value'] are not linear modules of llama's decoder layers; "
                        "they are: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"]),
    "rank": (dict(lora={"r": 0}), ["`lora.r` 0 is not valid: give a positive rank"]),
    "dropout": (dict(lora={"dropout": 1.0}), ["`lora.dropout` 1.0 is not valid"]),
    "misspelt": (dict(lora={"alpah": 8}), ["unknown key `lora.alpah`; did you mean `alpha`?"]),
    "nf4 without lora": (dict(quantize_base="nf4"), ["`quantize_base: nf4` quantizes the frozen base of a LoRA run"]),
    "nf4 without bitsandbytes": (dict(lora={"r": 8}, quantize_base="nf4"),
                                 ["`quantize_base: nf4` needs bitsandbytes' 4-bit kernels, and this machine lacks "]),
    "quantize type": (dict(lora={"r": 8}, quantize_base="int8"), ["`quantize_base` must be one of nf4"]),
}


@pytest.mark.parametrize("case", list(BAD_LORA))
def test_bad_lora_settings_fail_with_one_line(case, tmp_path, tiny_pp_model, capsys, monkeypatch):
    from test_config import assert_fails, write_config

    overrides, expected = BAD_LORA[case]
    assert_fails(capsys, monkeypatch, tmp_path, write_config(tmp_path, tiny_pp_model, **overrides), *expected)


# --- Through the launcher: a stage with nothing to train, the checkpoint's contents, exact resume, exports ---

TARGETS = ["q_proj", "v_proj", "down_proj"]


def launcher_config(tmp, pp_model, save) -> dict:
    """The tiny llama on 2 stages, the first holding only the (frozen) embedding: it trains nothing. 10 steps,
    a save every 3; bf16 with ZeRO-1 (DeepSpeed's optimizer wrapper, which needs a gradient on every stage)."""
    from test_resume import run_config

    config = run_config(tmp, pp_model, save, n_epochs=2, eval_steps=0, eval_ratio=0.0, keep_last_n=None,
                        early_stopping={"patience": 0, "min_delta": 0.0}, save_steps=3, use_grad_ckpt=True,
                        lora={"r": 4, "alpha": 8.0, "dropout": 0.1, "target_modules": TARGETS},
                        bf16={"enabled": True}, zero_optimization={"stage": 1})
    config["model_topo"]["parts"] = [1, 5]
    return config


def kill_after_a_step_past_a_checkpoint(launch, save) -> tuple[int, list[dict]]:
    """SIGKILL the run at a moment when it has logged a step after its latest checkpoint (the process group is
    stopped while that is checked, so the files cannot move on); ``(checkpoint step, records logged)``."""
    import os
    import signal
    import time

    from test_resume import metrics

    deadline = time.time() + 300
    while time.time() < deadline:
        assert launch.poll() is None, launch.communicate()[0][-3000:]
        os.killpg(launch.pid, signal.SIGSTOP)
        latest = save / "latest"
        try:
            checkpoint = int(latest.read_text().removeprefix("global_step")) if latest.is_file() else 0
            records = metrics(save)
        except (FileNotFoundError, ValueError):  # not written yet / a line half-written
            records = []
        if checkpoint and records and records[-1]["step"] > checkpoint:
            os.killpg(launch.pid, signal.SIGKILL)
            launch.wait()
            return checkpoint, records
        os.killpg(launch.pid, signal.SIGCONT)
        time.sleep(0.05)
    raise AssertionError("the run never logged a step past a checkpoint")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_pp_model):
    """A LoRA run SIGKILLed after a step past a checkpoint, then resumed (``resume: auto``) to its end:
    ``(save dir, checkpoint step at the kill, the killed run's records)``."""
    from test_resume import finish, start

    tmp = tmp_path_factory.mktemp("lora")
    save = tmp / "save"
    config = launcher_config(tmp, tiny_pp_model[1], save)
    checkpoint, killed = kill_after_a_step_past_a_checkpoint(start(tmp, "killed", config), save)
    config["resume"] = "auto"
    code, output = finish(start(tmp, "resumed", config))
    assert code == 0, output[-3000:]
    assert f"resumed from {save}/global_step{checkpoint} at step {checkpoint}" in output, output[-3000:]
    return save, checkpoint, killed


def test_frozen_stage_trains_and_resume_after_sigkill_is_exact(lora_run):
    from test_resume import exact, metrics

    save, checkpoint, killed = lora_run
    records = metrics(save)
    assert [r["step"] for r in records] == list(range(1, 11))
    # The steps the killed run logged after its checkpoint, replayed exactly by the resumed run.
    assert exact(records[checkpoint:len(killed)]) == exact(killed[checkpoint:])
    assert exact(records[:checkpoint]) == exact(killed[:checkpoint])
    assert records[-1]["loss"] < records[0]["loss"]


def test_checkpoint_holds_only_adapters_and_their_optimizer_state(lora_run, tiny_pp_model):
    import json

    from pipellm.pipeline.layer_files import layer_file_name, optimizer_file_name

    save, _, _ = lora_run
    ckpt = save / "global_step10"
    assert json.loads((ckpt / "lora.json").read_text())["base_model_path"] == str(tiny_pp_model[1].resolve())
    assert torch.load(ckpt / layer_file_name(0), weights_only=True) == {}  # the frozen embedding: nothing
    adapters = {}
    for index in range(1, 5):
        layer = torch.load(ckpt / layer_file_name(index), weights_only=True)
        assert sorted(layer) == sorted(f"{module}.lora_{ab}.default.weight" for module in
                                       ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj") for ab in "AB")
        adapters.update({f"{index}.{k}": v for k, v in layer.items()})
    for index in (5, 6):  # the final norm and the head: frozen, nothing saved
        assert torch.load(ckpt / layer_file_name(index), weights_only=True) == {}
    # The optimizer state, per layer file and by checkpoint name (pipellm.training.stage_checkpoint), covers
    # exactly the adapters: their fp32 masters (bf16 run; the layer file holds them rounded), AdamW's moments and
    # step. The frozen layers have none, and neither has stage 0's placeholder (it trains nothing).
    for index in range(7):
        path = ckpt / optimizer_file_name(index)
        if index in (0, 5, 6):
            assert not path.exists(), path
            continue
        states = torch.load(path, weights_only=True)
        assert sorted(states) == sorted(f"model.layers.{index - 1}.{key}" for key in adapters_of(adapters, index))
        for name, state in states.items():
            weight = adapters[f"{index}.{name.removeprefix(f'model.layers.{index - 1}.')}"]
            assert sorted(state) == ["exp_avg", "exp_avg_sq", "master", "step"] and state["step"] == 10
            assert state["master"].dtype == torch.float32 and torch.equal(state["master"].to(weight.dtype), weight)
            assert state["exp_avg"].shape == state["exp_avg_sq"].shape == weight.shape


def adapters_of(adapters: dict, index: int) -> list[str]:
    return [key.removeprefix(f"{index}.") for key in adapters if key.startswith(f"{index}.")]


def test_exports_merge_like_peft_and_load_as_a_peft_adapter(lora_run, tiny_pp_model, tmp_path):
    """The merged export equals peft's ``merge_and_unload()`` of the adapter export, bit for bit (fp32); the
    adapter export holds the checkpoint's adapters under peft's names and loads with ``PeftModel``."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from pipellm.convert.converters import main as convert_main
    from pipellm.pipeline.layer_files import layer_file_name

    save, _, _ = lora_run
    convert_main(["pp_to_hg", "--input-path", str(save), "--save-path", str(tmp_path / "merged")])
    convert_main(["pp_to_hg", "--input-path", str(save), "--save-path", str(tmp_path / "adapter"),
                  "--lora-export", "adapter"])
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json",
                                                                        "adapter_model.safetensors"]
    exported = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    layer = torch.load(save / "global_step10" / layer_file_name(2), weights_only=True)  # decoder 1
    for key, tensor in layer.items():
        assert torch.equal(exported[f"base_model.model.model.layers.1.{key.replace('.default.', '.')}"], tensor)
    assert len(exported) == 4 * len(layer)

    hf_base = tiny_pp_model[0]
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_base), tmp_path / "adapter")
    ids = torch.randint(0, 1017, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        peft_logits = peft_model.eval()(ids).logits
        by_peft = peft_model.merge_and_unload().state_dict()
        merged_model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        torch.testing.assert_close(merged_model(ids).logits, peft_logits, rtol=1e-5, atol=1e-5)
    ours = load_file(tmp_path / "merged" / "model.safetensors")
    assert ours.keys() == load_file(hf_base / "model.safetensors").keys()
    for key, tensor in ours.items():
        assert torch.equal(tensor, by_peft[key]), key
    changed = [key for key, tensor in ours.items() if not torch.equal(tensor, load_file(hf_base / "model.safetensors")[key])]
    assert sorted(changed) == sorted(f"model.layers.{i}.{m}.weight" for i in range(4)
                                     for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"))


def test_tied_embedding_frozen_or_trained_under_bf16_optimizer(tmp_path, tied_pp_model):
    """The tiny llama with its head tied to the embedding on 2 stages (the embedding on the first, its copy for
    the head on the last), under DeepSpeed's bf16 optimizer: bf16 alone, and ZeRO-1 with fp32 gradient
    accumulation. Frozen (LoRA's default), the tied weight has no fp32 gradient there, so the stages' tied-gradient
    all-reduce leaves it out (it crashed on it); named by ``modules_to_save`` it trains, its optimizer state saved
    once. Two ranks run the two configs in turn (spawned in-process: cheaper than the launcher)."""
    import json

    import yaml

    from distributed import run_distributed
    from pipellm.pipeline.layer_files import layer_file_name, optimizer_file_name
    from test_resume import metrics, run_config, train_in_turn

    lora = {"r": 4, "alpha": 8.0, "target_modules": TARGETS}
    runs = {"frozen": dict(lora=lora, bf16={"enabled": True}),
            "trained": dict(lora={**lora, "modules_to_save": ["embed"]}, bf16={"enabled": True},
                            zero_optimization={"stage": 1}, data_types={"grad_accum_dtype": "fp32"})}
    paths = []
    for name, keys in runs.items():
        paths.append(tmp_path / f"{name}.yml")
        paths[-1].write_text(yaml.safe_dump(run_config(
            tmp_path, tied_pp_model, tmp_path / name, n_epochs=1, eval_steps=0, eval_ratio=0.0, keep_last_n=None,
            early_stopping={"patience": 0, "min_delta": 0.0}, save_steps=1000, **keys)))
    run_distributed(2, train_in_turn, [str(path) for path in paths], str(tmp_path))
    for rank in range(2):
        for name, result in zip(runs, json.loads((tmp_path / f"rank{rank}.json").read_text())):
            assert result["exit_code"] == 0, (name, rank, result["stderr"][-3000:])

    base = torch.load(tied_pp_model / layer_file_name(0), weights_only=True)["weight"].to(torch.bfloat16)
    for name in runs:
        assert [r["step"] for r in metrics(tmp_path / name)] == [1, 2, 3, 4, 5], name
        checkpoint = tmp_path / name / "global_step5"
        embedding = torch.load(checkpoint / layer_file_name(0), weights_only=True)
        if name == "frozen":  # nothing of the embedding trains: nothing saved
            assert embedding == {} and not (checkpoint / optimizer_file_name(0)).exists()
            continue
        assert embedding["weight"].dtype == torch.bfloat16 and not torch.equal(embedding["weight"], base)
        state = torch.load(checkpoint / optimizer_file_name(0), weights_only=True)["model.embed_tokens.weight"]
        assert state["step"] == 5 and torch.equal(state["master"].to(torch.bfloat16), embedding["weight"])


def test_plan_memory_model_of_lora_equals_hand_calculation():
    """The tiny llama (hidden 64, 2 key/value heads of 16, MLP 172), LoRA r=8 on q_proj, v_proj, down_proj."""
    from test_plan import DECODER_PARAMS, EMBED_PARAMS, HEAD_PARAMS, TINY
    from pipellm.models import load_model_config
    from pipellm.plan.lora_memory import with_lora
    from pipellm.plan.memory import estimate_stage, state_bytes
    from pipellm.plan.profile import LayerCost, Profile
    from pipellm.pipeline.partition import PipelineLayers

    hf_config, family = load_model_config(TINY)

    def cost(params):
        return LayerCost(seconds=1.0, held_bytes=0, working_bytes=0, input_bytes=0, params=params)
    profile = Profile(device="test", embed=cost(EMBED_PARAMS), decoder=cost(DECODER_PARAMS), head=cost(HEAD_PARAMS),
                      layers=PipelineLayers.of(family, hf_config), tied_params=0)
    adapters = 8 * (64 + 64) + 8 * (64 + 32) + 8 * (172 + 64)  # r * (in + out) of q_proj, v_proj, down_proj
    linear_weights = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 172  # q, o; k, v; gate, up, down
    assert DECODER_PARAMS == linear_weights + 2 * 64  # and the two norms
    # 2 + 2 + 12 B per trained parameter, step 4 (bf16 gradients freed once in the bf16 accumulation buffer)
    bf16 = state_bytes({"bf16": {"enabled": True}}, data_degree=1)
    lora = Lora(r=8, target_modules=["q_proj", "v_proj", "down_proj"])

    plain = with_lora(profile, lora, None, family, hf_config, torch.bfloat16)
    last = estimate_stage(plain, bf16, 1, 3, 6, num_stages=2, micro_batches=4, allowance=0)
    assert last.weights == (2 * DECODER_PARAMS + HEAD_PARAMS) * 2 + 2 * adapters * 2
    assert (last.grads, last.optimizer, last.step) == (2 * adapters * 2, 2 * adapters * 12, 2 * adapters * 4)
    first = estimate_stage(plain, bf16, 0, 0, 1, num_stages=2, micro_batches=4, allowance=0)
    assert (first.weights, first.grads, first.optimizer) == (EMBED_PARAMS * 2, 0, 0)  # the frozen embedding

    # QLoRA: the decoder's linear weights in NF4 (4 bits + an fp32 scale per 64); modules_to_save trains the head.
    qlora = with_lora(profile, dataclasses.replace(lora, modules_to_save=["head"]), "nf4", family, hf_config,
                      torch.bfloat16)
    last = estimate_stage(qlora, bf16, 1, 3, 6, num_stages=2, micro_batches=4, allowance=0)
    trained = 2 * adapters + HEAD_PARAMS
    assert last.weights == 2 * (linear_weights * (0.5 + 4 / 64) + 2 * 64 * 2) + trained * 2
    assert (last.grads, last.optimizer) == (trained * 2, trained * 12)


def test_mfu_counts_frozen_parameters_without_weight_gradients():
    """4 FLOPs per token for a frozen base parameter, 6 for a trained one (the embedding a lookup)."""
    from types import SimpleNamespace

    from pipellm.observe.metrics import ModelFlops

    config = SimpleNamespace(num_hidden_layers=2, hidden_size=8)
    total, embedding, adapters = 10_000, 800, 300
    assert ModelFlops.of(config, total, embedding).per_token == 6 * (total - embedding)
    frozen = total - adapters
    lora = ModelFlops.of(config, total, embedding, frozen_params=frozen)
    assert (lora.per_token, lora.per_pair) == (4 * (frozen - embedding) + 6 * adapters, 12 * 2 * 8)


# --- QLoRA: the 4-bit base needs bitsandbytes' CUDA kernels; CPU machines (CI) skip its tests ---

NEEDS_QLORA = pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None,
                                 reason="QLoRA needs a CUDA GPU and bitsandbytes")


@NEEDS_QLORA
def test_qlora_trains_on_an_nf4_base_and_exports_merged_bf16(tmp_path, tiny_pp_model):
    """One GPU, one process (``python train_ds.py`` with ``dims: [1, 1]``): the run's decoder layers are
    bitsandbytes NF4 layers under peft's adapters, the loss falls, and the merged export is a bf16 checkpoint that
    transformers loads and that scores the data better than the base."""
    import json
    import subprocess
    import sys

    import bitsandbytes as bnb
    import yaml
    from transformers import AutoModelForCausalLM

    from pipellm.config.load import load_config
    from pipellm.convert.converters import pp_to_hg
    from pipellm.models import load_model_config
    from pipellm.models.attention import AttentionOptions
    from pipellm.quickstart import mean_token_loss
    from pipellm.training.lora import LoraParameters
    from test_resume import REPO, metrics, run_config

    hf_base, pp_base = tiny_pp_model
    save = tmp_path / "save"
    config = run_config(tmp_path, pp_base, save, n_epochs=8, eval_steps=0, eval_ratio=0.0, keep_last_n=None,
                        early_stopping={"patience": 0, "min_delta": 0.0}, save_steps=1000, bf16={"enabled": True},
                        lora={"r": 8, "alpha": 16.0, "target_modules": TARGETS}, quantize_base="nf4")
    config["model_topo"] = {"process_topology": {"axes": ["pipe", "data"], "dims": [1, 1]}, "parts": [6]}
    config["optimizer"]["params"]["lr"] = 1e-2
    path = tmp_path / "qlora.yml"
    path.write_text(yaml.safe_dump(config))

    # What the run builds: each decoder's linear modules become NF4 layers that peft wraps with adapters.
    hf_config, family = load_model_config(pp_base)
    with torch.device("cuda"):
        decoder = family.decoder(hf_config, AttentionOptions())
    LoraParameters.of(load_config(path)).prepare_layer(decoder, "decoder", 1)
    quantized = [name for name, module in decoder.named_modules() if isinstance(module, bnb.nn.Linear4bit)]
    assert len(quantized) == 7, quantized  # every linear module, adapted or not

    done = subprocess.run([sys.executable, "train_ds.py", "--config", str(path)], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    records = metrics(save)
    assert records[-1]["loss"] < records[0]["loss"] - 0.5, [r["loss"] for r in records]
    latest = save / (save / "latest").read_text().strip()
    assert json.loads((latest / "lora.json").read_text())["quantize_base"] == "nf4"
    exported = pp_to_hg(save, tmp_path / "merged")
    assert AutoModelForCausalLM.from_pretrained(exported).dtype == torch.bfloat16
    data = [str(tmp_path / "data40.jsonl")]
    assert mean_token_loss(exported, data, 64) < mean_token_loss(hf_base, data, 64) - 0.5
