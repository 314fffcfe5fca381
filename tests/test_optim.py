"""Optimizers, weight-decay groups, the LR schedule, precisions, ZeRO-1 + CPU offload and non-finite steps.

Pure logic runs in this process; what needs DeepSpeed's pipeline engine runs once on two spawned ranks (two
stages: every family's weight-decay groups, and each precision/ZeRO mode with a NaN gradient on stage 1 only);
two ``train_ds.py`` runs on spawned ranks train with ZeRO-1 + CPU offload and stop a run of NaN steps after a
checkpoint.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from distributed import run_distributed
from equivalence import LAUNCHER_DATA, MICRO_BATCH, make_batch, spawn_training
from pipellm.config import LRSchedule, NO_WEIGHT_DECAY, load_config
from pipellm.errors import PipellmError
from pipellm.training.optim import (NonFiniteRun, build_lr_scheduler, build_optimizer, check_pipeline_settings, lr_factor,
                           parameter_groups)


def is_norm(module: torch.nn.Module) -> bool:
    """The reference for "norm weight": the module's class is a LayerNorm or an RMSNorm (by its class hierarchy,
    not by the parameter's name, which is what the default patterns look at)."""
    return any(c.__name__.endswith(("LayerNorm", "RMSNorm")) for c in type(module).__mro__)


def expected_no_decay(model: torch.nn.Module) -> set[int]:
    """Ids of the biases and of the parameters owned by norm modules."""
    return {id(p) for module in model.modules() for attr, p in module.named_parameters(recurse=False)
            if attr == "bias" or is_norm(module)}


def no_decay_ids(named) -> set[int]:
    groups = parameter_groups(named, 0.1, list(NO_WEIGHT_DECAY))
    return {id(p) for group in groups if group["weight_decay"] == 0.0 for p in group["params"]}


# ---------------------------------------------------------------------------------------------------------------
# The schedule

def reference_lr(step: int, total: int, warmup: int, decay: str, ratio: float, peak: float) -> float:
    """The documented schedule, written out: the s-th warmup step (1-based) at peak * s / warmup; then decay
    steps warmup .. total-1 with progress (s - warmup) / (total - 1 - warmup)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if decay == "constant":
        return peak
    decay_steps = total - 1 - warmup
    progress = (step - warmup) / decay_steps if decay_steps > 0 else 1.0
    if decay == "linear":
        return peak * (ratio + (1 - ratio) * (1 - progress))
    return peak * (ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@pytest.mark.parametrize("warmup,decay,ratio,total", [(3, "cosine", 0.1, 12), (4, "linear", 0.0, 9),
                                                      (2, "constant", 0.0, 5), (0, "cosine", 0.25, 7),
                                                      (4, "linear", 0.5, 5)])
def test_lr_schedule_follows_the_formula(warmup, decay, ratio, total):
    peak = 3e-4
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([param], lr=peak)
    scheduler = build_lr_scheduler(optimizer, total, LRSchedule(warmup_steps=warmup, decay=decay,
                                                               min_lr_ratio=ratio))
    seen = []
    for _ in range(total):  # as DeepSpeed runs it: read the lr, step, then step the scheduler
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [reference_lr(s, total, warmup, decay, ratio, peak) for s in range(total)]
    # The same real numbers computed in a different order: equal up to a few float64 roundings.
    assert seen == pytest.approx(expected, rel=1e-12, abs=0)
    if warmup:
        assert seen[0] == peak / warmup and seen[warmup - 1] == peak  # warmup starts at peak/W, ends at the peak
    if decay != "constant":
        assert seen[-1] == peak * ratio  # the last step trains at exactly the minimum
        assert all(a >= b for a, b in zip(seen[warmup:], seen[warmup + 1:]))


def test_lr_factor_edges():
    schedule = LRSchedule(warmup_steps=3, decay="cosine", min_lr_ratio=0.1)
    assert lr_factor(3, 4, schedule) == pytest.approx(0.1, abs=1e-15)  # one decay step: it is the last, at the min
    assert lr_factor(5, 4, schedule) == pytest.approx(0.1, abs=1e-15)  # past the run (never scheduled): the min
    assert [lr_factor(s, 2, schedule) for s in range(2)] == [1 / 3, 2 / 3]  # a run shorter than its warmup


# ---------------------------------------------------------------------------------------------------------------
# The optimizers' update rules

def two_group_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    named = [("model.layers.0.mlp.weight", model[0].weight), ("model.layers.0.mlp.bias", model[0].bias),
             ("model.layers.0.input_layernorm.weight", model[1].weight),
             ("model.layers.0.input_layernorm.bias", model[1].bias)]
    return model, named


def test_adamw_is_torch_fused_adamw_with_decay_on_matrices_only():
    model, named = two_group_model()
    start = [p.detach().clone() for p in model.parameters()]
    lr, wd, (b1, b2), eps = 1e-2, 0.1, (0.9, 0.95), 1e-8
    optimizer = build_optimizer(named, {"type": "AdamW", "params": {"lr": lr, "weight_decay": wd, "betas": [b1, b2],
                                                                     "eps": eps}}, list(NO_WEIGHT_DECAY))
    assert type(optimizer) is torch.optim.AdamW and all(g["fused"] for g in optimizer.param_groups)
    grads = [torch.randn_like(p) for p in model.parameters()]
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    optimizer.step()
    for i, (p, p0, g) in enumerate(zip(model.parameters(), start, grads)):
        decay = wd if i == 0 else 0.0  # only the Linear's weight matrix decays
        # First AdamW step: m_hat = g, v_hat = g^2 (bias corrections cancel).
        expected = p0 * (1 - lr * decay) - lr * g / (g.abs() + eps)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7)


def test_lion_update_rule_and_groups():
    model, named = two_group_model()
    start = [p.detach().clone() for p in model.parameters()]
    lr, wd, (b1, b2) = 1e-3, 0.5, (0.9, 0.99)
    optimizer = build_optimizer(named, {"type": "Lion", "params": {"lr": lr, "weight_decay": wd,
                                                                    "betas": [b1, b2]}}, list(NO_WEIGHT_DECAY))
    assert type(optimizer).__name__ == "Lion"
    grads = [[torch.randn_like(p) for p in model.parameters()] for _ in range(2)]
    momentum = [torch.zeros_like(p) for p in start]
    expected = [p.clone() for p in start]
    for step_grads in grads:
        for p, g in zip(model.parameters(), step_grads):
            p.grad = g.clone()
        optimizer.step()
        for i, g in enumerate(step_grads):
            decay = wd if i == 0 else 0.0
            # Lion: p <- p (1 - lr wd) - lr sign(b1 m + (1 - b1) g); m <- b2 m + (1 - b2) g
            expected[i] = expected[i] * (1 - lr * decay) - lr * torch.sign(b1 * momentum[i] + (1 - b1) * g)
            momentum[i] = b2 * momentum[i] + (1 - b2) * g
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-6, atol=1e-7)


# Causal-LM architectures of transformers (train_ds_zero.py takes any): the default patterns exempt exactly the
# biases and norm weights, named as their checkpoints name them.
ZERO_MODEL_TYPES = ["llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma3_text", "phi3", "bloom", "gpt2",
                    "gpt_neox", "falcon", "opt", "olmo2", "glm", "starcoder2"]


@pytest.mark.parametrize("model_type", ZERO_MODEL_TYPES)
def test_default_no_weight_decay_is_biases_and_norms_in_transformers_models(model_type):
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(CONFIG_MAPPING[model_type](num_hidden_layers=2))
    expected = expected_no_decay(model)
    assert expected and no_decay_ids(model.named_parameters()) == expected


# ---------------------------------------------------------------------------------------------------------------
# Non-finite steps, config errors

def test_nonfinite_run_counts_steps_in_a_row():
    run = NonFiniteRun(limit=3, loss_scaling=False)
    assert run.record(1, 2.0, skipped=False) is None
    assert "step 2: non-finite gradients, optimizer step skipped; 1 of" in run.record(2, 2.0, skipped=True)
    assert "step 3: non-finite loss" in run.record(3, math.nan, skipped=True)
    assert run.record(4, 1.9, skipped=False) is None and not run.exhausted  # a good step ends the run
    for step in (5, 6):
        run.record(step, math.inf, skipped=True)
    assert not run.exhausted
    assert "3 of max_nonfinite_steps=3" in run.record(7, 2.0, skipped=True) and run.exhausted
    message = run.stop_message("save/global_step7")
    assert message.startswith("steps 5-7: 3 steps in a row") and "save/global_step7" in message

    fp16 = NonFiniteRun(limit=2, loss_scaling=True)  # overflow skips are the loss scaler's business
    assert "fp16 gradient overflow" in fp16.record(1, 2.0, skipped=True)
    fp16.record(2, 2.0, skipped=True)
    assert not fp16.exhausted
    fp16.record(3, math.nan, skipped=True)
    fp16.record(4, math.nan, skipped=True)
    assert fp16.exhausted


def write_config(tmp_path, **overrides) -> Path:
    config = {"model_path": "unused", "save_path": str(tmp_path / "save"), "data_path": LAUNCHER_DATA,
              "train_batch_size": 4, "train_micro_batch_size_per_gpu": 2}
    config.update(overrides)
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(config))
    return path


BAD = {
    "both schedules": (dict(lr_schedule={"decay": "cosine"}, scheduler={"type": "WarmupLR"}),
                       "give pipellm's `lr_schedule` or DeepSpeed's `scheduler`, not both"),
    "decay": (dict(lr_schedule={"decay": "exp"}), "`lr_schedule.decay` must be one of constant, linear, cosine"),
    "warmup": (dict(lr_schedule={"warmup_steps": -1}), "`lr_schedule.warmup_steps` must be >= 0"),
    "ratio": (dict(lr_schedule={"decay": "linear", "min_lr_ratio": 1.5}), "`lr_schedule.min_lr_ratio` must be in"),
    "ratio without decay": (dict(lr_schedule={"min_lr_ratio": 0.1}), "no effect with `decay: constant`"),
    "regex": (dict(no_weight_decay=["norm(", "bias$"]), "`no_weight_decay` entry 'norm(' is not a valid regular"),
    "max_nonfinite_steps": (dict(max_nonfinite_steps=0), "`max_nonfinite_steps` must be >= 1"),
    "optimizer type": (dict(optimizer={"type": "SGD"}), "`optimizer.type` 'SGD' is not supported; use AdamW or Lion"),
    "adam l2": (dict(optimizer={"type": "Adam", "params": {"adam_w_mode": False}}), "`optimizer.params.adam_w_mode"),
    "two precisions": (dict(bf16={"enabled": True}, fp16={"enabled": True}), "`bf16` and `fp16` are both enabled"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_config_errors_name_the_key(tmp_path, case):
    overrides, message = BAD[case]
    with pytest.raises(PipellmError) as error:
        load_config(write_config(tmp_path, **overrides))
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("ds_config,message", [
    ({"zero_optimization": {"stage": 2}}, "works with ZeRO stage 0 or 1"),
    ({"zero_optimization": {"stage": 1, "offload_param": {"device": "cpu"}}}, "`zero_optimization.offload_param`"),
    ({"zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}}, "with ZeRO stage 1 only"),
    ({"zero_optimization": {"stage": 1, "offload_optimizer": {"device": "nvme"}}}, "'nvme' with stage 1"),
])
def test_pipeline_settings_are_checked_before_any_process_group(ds_config, message):
    with pytest.raises(PipellmError) as error:
        check_pipeline_settings(ds_config)
    assert message in str(error.value)
    check_pipeline_settings({"bf16": {"enabled": True},
                             "zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}}})


def test_fp16_needs_an_accelerator_with_fp16():
    """DeepSpeed's CPU accelerator has no fp16 (it would fail in deepspeed.initialize on every rank)."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().is_fp16_supported():
        check_pipeline_settings({"fp16": {"enabled": True}})
    else:
        with pytest.raises(PipellmError) as error:
            check_pipeline_settings({"fp16": {"enabled": True}})
        assert "`fp16.enabled`: DeepSpeed's cpu accelerator has no fp16 support" in str(error.value)


# ---------------------------------------------------------------------------------------------------------------
# Two pipeline stages on two spawned ranks

ENGINE_MODES = {
    "fp32": {},
    "zero1": {"zero_optimization": {"stage": 1}},
    "zero1-offload": {"zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}}},
    "bf16": {"bf16": {"enabled": True}},
}
OPTIMIZERS = {"AdamW": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.1}},
              "Lion": {"type": "Lion", "params": {"lr": 1e-4, "weight_decay": 0.1}}}
ENGINE_CASES = [("fp32", "AdamW"), ("zero1-offload", "AdamW"), ("bf16", "AdamW"), ("fp32", "Lion"), ("zero1", "Lion"),
                ("zero1-offload", "Lion")]
ENGINE_SCHEDULE = LRSchedule(warmup_steps=2, decay="cosine", min_lr_ratio=0.1)
ENGINE_STEPS, NAN_STEP = 3, 1  # the second step's gradients are NaN on stage 1 only
LAUNCH_BASE = {"data_path": LAUNCHER_DATA, "max_seq_len": 64, "log_steps": 1, "seed": 1, "train_batch_size": 16,
               "train_micro_batch_size_per_gpu": 4, "gradient_clipping": 1.0,
               "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.01}},
               "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}, "parts": [3, 3]}}


def family_groups(model_dir: str) -> dict:
    from deepspeed.runtime.pipe.topology import ProcessTopology

    from pipellm.models import load_model_config
    from pipellm.pipeline.stages import build_pipeline
    from pipellm.pipeline.weights import checkpoint_named_parameters

    hf_config, family = load_model_config(model_dir)
    model = build_pipeline(family, hf_config, ProcessTopology(axes=["pipe", "data"], dims=[2, 1]), "uniform")
    named = checkpoint_named_parameters(model, family, hf_config)
    no_decay, expected = no_decay_ids(named), expected_no_decay(model)
    return {"covers_stage": {id(p) for _, p in named} == {id(p) for p in model.parameters()},
            "names": [n for n, _ in named], "no_decay": [n for n, p in named if id(p) in no_decay],
            "expected": [n for n, p in named if id(p) in expected]}


def engine_steps(mode: str, optimizer_name: str) -> dict:
    """Three steps of a tiny llama on this rank's stage; stage 1's gradients are NaN in the second. Also the
    class of the optimizer DeepSpeed steps inside its wrappers."""
    import deepspeed
    from deepspeed.runtime.pipe.topology import ProcessTopology

    from pipellm.data.batches import micro_batches
    from pipellm.models import get_family
    from pipellm.training.optim import deepspeed_optimizer
    from pipellm.pipeline.stages import build_pipeline
    from pipellm.pipeline.weights import checkpoint_named_parameters
    from test_llama_equivalence import tiny_config

    config, family = tiny_config(tied=False, kv_heads=2), get_family("llama")
    model = build_pipeline(family, config, ProcessTopology(axes=["pipe", "data"], dims=[2, 1]), "uniform", seed=0)
    ds_config = {"train_micro_batch_size_per_gpu": MICRO_BATCH, "gradient_accumulation_steps": 2,
                 "train_batch_size": 2 * MICRO_BATCH, "steps_per_print": 10**9, "gradient_clipping": 1.0,
                 "optimizer": OPTIMIZERS[optimizer_name], **ENGINE_MODES[mode]}
    optimizer, lr_scheduler, ds_config = deepspeed_optimizer(
        model, checkpoint_named_parameters(model, family, config), ds_config, list(NO_WEIGHT_DECAY), ENGINE_SCHEDULE,
        total_steps=4)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                           config=ds_config)
    input_ids, _, labels = make_batch(2 * MICRO_BATCH, torch.Generator().manual_seed(1))
    steps = []
    for step in range(ENGINE_STEPS):
        hook = None
        if step == NAN_STEP and model.stage_id == 1:
            hook = next(model.parameters()).register_hook(lambda grad: grad * math.nan)
        before = [p.detach().clone() for p in model.parameters()]
        lr = engine.get_lr()[0]
        loss = float(engine.train_batch(iter(micro_batches(input_ids, labels, MICRO_BATCH, 0, 1))))
        steps.append({"loss": loss, "lr": lr, "grad_norm": float(engine.get_global_grad_norm()),
                      "skipped_steps": engine.skipped_steps,
                      "changed": any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))})
        if hook is not None:
            hook.remove()
    basic = type(engine.basic_optimizer)
    return {"steps": steps, "basic_optimizer": f"{basic.__module__}.{basic.__name__}"}


def train_main(config_path: str) -> dict:
    """``train_ds.py --config`` on this rank (the spawn set RANK/WORLD_SIZE as the launcher does): exit code and
    what it printed."""
    import contextlib
    import io

    from pipellm.training.train import main

    printed = io.StringIO()
    with contextlib.redirect_stderr(printed):
        try:
            main(["--config", config_path])
            code = 0
        except SystemExit as e:
            code = e.code
    return {"exit_code": code, "stderr": printed.getvalue()}


def two_stage_rank(rank: int, model_dirs: dict, nan_config: str, out_dir: str) -> None:
    results = {"families": {name: family_groups(path) for name, path in model_dirs.items()},
               "engines": {f"{mode}-{opt}": engine_steps(mode, opt) for mode, opt in ENGINE_CASES},
               "nan_run": train_main(nan_config)}
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results))


def write_family_configs(root: Path) -> dict[str, str]:
    """config.json of a tiny model of every family (remote-code layouts as their checkpoints ship them)."""
    import test_baichuan
    import test_bloom
    import test_chatglm
    import test_llama_equivalence
    import test_mixtral

    dirs = {}
    for name, config in (("llama", test_llama_equivalence.tiny_config(tied=True, kv_heads=2)),
                         ("bloom", test_bloom.tiny_config()), ("mixtral", test_mixtral.tiny_config()),
                         ("baichuan", test_baichuan.baichuan_config()),
                         ("baichuan13b", test_baichuan.baichuan_config("alibi")),
                         ("chatglm", test_chatglm.chatglm_config(test_chatglm.tiny_glm()))):
        path = root / name
        path.mkdir(parents=True)
        if isinstance(config, dict):
            (path / "config.json").write_text(json.dumps(config))
        else:
            config.save_pretrained(path)
        dirs[name] = str(path)
    return dirs


def write_nan_run(tmp_path: Path, pp_dir: Path) -> tuple[Path, Path]:
    """The tiny llama with a NaN in its final norm's weight (every step's loss and gradients are NaN), and a
    config that allows 2 such steps in a row. Returns the model and the config path."""
    from pipellm.pipeline.layer_files import layer_file_name

    broken = tmp_path / "broken"
    shutil.copytree(pp_dir, broken)
    final_norm = broken / layer_file_name(5)  # embedding, 4 decoders, then the final norm
    state = torch.load(final_norm, weights_only=True)
    state["weight"][0] = math.nan
    torch.save(state, final_norm)
    config = tmp_path / "nan.yml"
    config.write_text(yaml.safe_dump({**LAUNCH_BASE, "model_path": str(broken), "save_path": str(tmp_path / "save"),
                                      "max_steps": 5, "max_nonfinite_steps": 2,
                                      "data_cache_dir": str(tmp_path / "cache")}))
    return broken, config


def test_two_stages(tmp_path, tiny_pp_model):
    """One spawn of two pipeline stages for: every family's weight-decay groups; each precision / ZeRO mode with
    both optimizers, skipping a step whose gradients are NaN on stage 1 only; a training run whose steps are all
    NaN, which stops after a checkpoint."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipellm.pipeline.layer_files import layer_file_name

    model_dirs = write_family_configs(tmp_path / "families")
    broken, nan_config = write_nan_run(tmp_path, tiny_pp_model[1])
    run_distributed(2, two_stage_rank, model_dirs, str(nan_config), str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    for name, path in model_dirs.items():
        stages = [r["families"][name] for r in ranks]
        assert all(stage["covers_stage"] for stage in stages), name  # every parameter is in a group
        no_decay = set().union(*(stage["no_decay"] for stage in stages))
        assert no_decay and no_decay == set().union(*(stage["expected"] for stage in stages)), name
        if name in ("llama", "bloom"):  # the names are the checkpoint's (transformers 5 fuses mixtral's experts)
            config = AutoConfig.from_pretrained(path)
            with torch.device("meta"):
                keys = set(AutoModelForCausalLM.from_config(config).state_dict())
            if config.tie_word_embeddings:
                keys.discard("lm_head.weight")
            assert set().union(*(stage["names"] for stage in stages)) == keys, name

    engines = {case: run["steps"] for case, run in ranks[0]["engines"].items()}
    for case, steps in engines.items():
        assert ranks[1]["engines"][case]["steps"] == steps, case  # both stages: the same figures and decisions
        # torch's AdamW (fused kernel) or lion-pytorch's Lion, also under ZeRO-Offload: no DeepSpeed op to build.
        assert {r["engines"][case]["basic_optimizer"] for r in ranks} == \
            {"torch.optim.adamw.AdamW" if case.endswith("AdamW") else "lion_pytorch.lion_pytorch.Lion"}, case
        assert [s["skipped_steps"] for s in steps] == [0, 1, 1], case
        # Stage 0's own gradients were finite, yet it skipped too: the decision is global.
        assert [s["changed"] for s in steps] == [True, False, True], case
        assert not math.isfinite(steps[NAN_STEP]["grad_norm"]) and math.isfinite(steps[2]["grad_norm"]), case
        # Warmup at lr/2, then the peak; the skipped step did not move the schedule, so step 3 is at the peak too.
        peak = OPTIMIZERS[case.rsplit("-", 1)[1]]["params"]["lr"]
        assert [s["lr"] for s in steps] == [peak / 2, peak, peak], case
        assert steps[1]["loss"] == steps[2]["loss"], case  # the same weights on the same batch
    for case in [c for c in engines if c.startswith("zero1")]:
        fp32 = engines["fp32-" + case.rsplit("-", 1)[1]]
        # The same fp32 gradients and update rule; the norms (hence the clip coefficient) are summed in a
        # different order and precision by pipellm's guard and by ZeRO: a few float32 roundings.
        for a, b in zip(fp32, engines[case]):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=0), case
            if math.isfinite(a["grad_norm"]):
                assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-6, abs=0), case
    # bf16 weights and activations (8-bit mantissa) against fp32: the first step's loss and gradient norm agree
    # to bf16's precision (2^-8 relative per rounding, a few roundings deep).
    bf16, fp32 = engines["bf16-AdamW"], engines["fp32-AdamW"]
    assert bf16[0]["loss"] == pytest.approx(fp32[0]["loss"], rel=1e-2)
    assert bf16[0]["grad_norm"] == pytest.approx(fp32[0]["grad_norm"], rel=5e-2)

    # The NaN run: each step skipped with a warning; the second in a row saves a checkpoint and exits with 2.
    runs = [r["nan_run"] for r in ranks]
    assert [run["exit_code"] for run in runs] == [2, 2], runs[0]["stderr"][-3000:]
    printed = runs[0]["stderr"]
    errors = [line for line in printed.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: steps 1-2: 2 steps in a row with a non-finite loss"), \
        printed[-3000:]
    for step in (1, 2):
        assert (f"pipellm: warning: step {step}: non-finite loss, optimizer step skipped; {step} of "
                f"max_nonfinite_steps=2") in printed
    save = tmp_path / "save"
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(math.isnan(r["loss"]) for r in records)
    assert records[0]["lr"] == records[1]["lr"] == 3e-3  # the default schedule: constant
    assert (save / "latest").read_text().strip() == "global_step2"
    for index in range(7):  # nothing was updated: the checkpoint holds the starting weights
        saved = torch.load(save / "global_step2" / layer_file_name(index), weights_only=True)
        start = torch.load(broken / layer_file_name(index), weights_only=True)
        assert saved.keys() == start.keys()
        for key in saved:
            torch.testing.assert_close(saved[key], start[key], rtol=0, atol=0, equal_nan=True)


# ---------------------------------------------------------------------------------------------------------------
# train_ds.py on two spawned ranks

def first_step_reference(config_path: Path, hf_dir: Path) -> tuple[float, float]:
    """Loss and gradient norm of the run's first global batch on transformers' model with the initial weights:
    mean cross entropy over every labelled token, norm over all parameters' gradients."""
    from transformers import AutoModelForCausalLM

    from pipellm.data.batches import Schedule, load_training_data
    from pipellm.data.tokenizer import load_tokenizer

    cfg = load_config(config_path)
    data = load_training_data(cfg, load_tokenizer(hf_dir), show_progress=False)
    input_ids, labels, _, _ = data.rows_of(Schedule(data.plan, cfg.n_epochs, cfg.max_steps).batch(0))
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    logits = model(input_ids=input_ids).logits  # right padding: causal attention keeps it out of the real tokens
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                             ignore_index=-100)
    loss.backward()
    norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters() if p.grad is not None))
    return loss.item(), norm.item()


def test_zero1_cpu_offload_trains_and_starts_like_the_reference(tmp_path, tiny_pp_model):
    """``train_ds.py`` on two ranks (spawned in-process) with ZeRO-1 and the optimizer offloaded to the CPU: it
    follows the schedule, the loss falls, and its first step's loss and gradient norm are transformers' on that
    batch."""
    hf_dir, pp_dir = tiny_pp_model
    config = {**LAUNCH_BASE, "model_path": str(pp_dir), "save_path": str(tmp_path / "save"), "max_steps": 3,
              "save_final": False,
              "data_cache_dir": str(tmp_path / "cache"),
              "lr_schedule": {"warmup_steps": 1, "decay": "cosine", "min_lr_ratio": 0.1},
              "zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}}}
    config_path = tmp_path / "offload.yml"
    records = spawn_training(config, config_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [r["lr"] for r in records] == pytest.approx([3e-3, 3e-3, 3e-4], rel=1e-12, abs=0)
    assert records[-1]["loss"] < records[0]["loss"] - 0.2, [r["loss"] for r in records]
    loss, norm = first_step_reference(config_path, hf_dir)
    # The same fp32 objective computed by other kernels in another order (as in the equivalence tests).
    assert records[0]["loss"] == pytest.approx(loss, rel=1e-5)
    assert records[0]["grad_norm"] == pytest.approx(norm, rel=1e-4)
