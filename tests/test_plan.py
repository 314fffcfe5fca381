"""``parts: auto`` and ``python -m pipellm.plan`` (``pipellm/plan/``): the partitioner is optimal (checked
against every contiguous split), the memory model adds up to a hand calculation on the tiny llama, a split that
cannot fit fails with what to change, the command prints a plan for the tiny model, and under a real process
group every rank trains the split rank 0 chose. (Training with ``parts: auto`` through the launcher:
``tests/test_train_launcher.py``.)"""
from __future__ import annotations

import dataclasses
import itertools
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from distributed import run_distributed
import pipellm.plan
from pipellm.pipeline.partition import PipelineLayers
from pipellm.plan import agree
from pipellm.plan.__main__ import main
from pipellm.plan.memory import estimate_stage, state_bytes
from pipellm.plan.partitioner import make_plan, min_max_partition
from pipellm.plan.profile import LayerCost, Profile, RunShape, profile_layers
from pipellm.config import load_config
from pipellm.errors import PipellmError
from pipellm.models import load_model_config

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "pipellm" / "assets" / "tiny_llama"
# The tiny llama (hidden 64, 4 heads of 16, 2 kv heads, intermediate 172, vocab 1017, 4 layers), by hand:
EMBED_PARAMS = 1017 * 64
DECODER_PARAMS = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 172 + 2 * 64  # q, k + v, o, gate/up/down, two norms
HEAD_PARAMS = 64 + 64 * 1017  # final norm + output projection


def write_config(tmp_path: Path, parts="auto", dims=(2, 1), name="config.yml", **extra) -> Path:
    config = {"model_path": str(TINY), "save_path": str(tmp_path / "save"), "data_path": str(tmp_path / "none.jsonl"),
              "from_scratch": True, "max_seq_len": 32,
              "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": list(dims)}, "parts": parts},
              "train_batch_size": 8, "train_micro_batch_size_per_gpu": 2, **extra}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


def brute_force(num_items, num_stages, cost, allowed):
    """The smallest largest stage cost over every contiguous split whose stages are all allowed (None: none)."""
    best = None
    for cuts in itertools.combinations(range(1, num_items), num_stages - 1):
        bounds = (0, *cuts, num_items)
        stages = list(enumerate(zip(bounds, bounds[1:])))
        if all(allowed(s, a, b) for s, (a, b) in stages):
            value = max(cost(s, a, b) for s, (a, b) in stages)
            best = value if best is None else min(best, value)
    return best


def test_partition_is_optimal_against_every_contiguous_split():
    rng = random.Random(8)
    infeasible = 0
    for _ in range(300):
        num_items = rng.randint(2, 9)
        num_stages = rng.randint(1, min(num_items, 4))
        times = [float(rng.randint(1, 20)) for _ in range(num_items)]  # integers: every sum is exact
        memory = [rng.randint(1, 10) for _ in range(num_items)]
        limit = rng.randint(5, 60)

        def cost(stage, start, stop):
            return sum(times[start:stop])

        def allowed(stage, start, stop):  # like in-flight micro batches, the weight of memory depends on the stage
            return sum(memory[start:stop]) * (num_stages - stage) <= limit

        expected = brute_force(num_items, num_stages, cost, allowed)
        found = min_max_partition(num_items, num_stages, cost, allowed)
        if expected is None:
            assert found is None
            infeasible += 1
            continue
        value, parts = found
        assert value == expected, (times, memory, limit, num_stages)
        assert len(parts) == num_stages and min(parts) >= 1 and sum(parts) == num_items
        bounds = list(itertools.accumulate([0] + parts))
        assert all(allowed(s, a, b) for s, (a, b) in enumerate(zip(bounds, bounds[1:])))
        assert max(cost(s, a, b) for s, (a, b) in enumerate(zip(bounds, bounds[1:]))) == value
        # Unconstrained, it is the plain min-max split.
        assert min_max_partition(num_items, num_stages, cost)[0] == \
            brute_force(num_items, num_stages, cost, lambda *_: True)
    assert 0 < infeasible < 300  # both outcomes were exercised


def test_memory_model_equals_hand_calculation():
    hf_config, family = load_model_config(TINY)
    shape = RunShape(micro_batch=2, seq_len=16, dtype=torch.float32, grad_ckpt=True, flash_attn=False,
                     packed=False, compile_layers=False)
    profile = profile_layers(family, hf_config, shape, torch.device("cpu"))
    hidden = 2 * 16 * 64 * 4  # one fp32 hidden state of the micro batch
    assert (profile.embed.params, profile.decoder.params, profile.head.params) == \
        (EMBED_PARAMS, DECODER_PARAMS, HEAD_PARAMS)
    # With checkpointing a decoder keeps only its output; the embedding keeps its output (the ids are its input).
    assert profile.embed.held_bytes == hidden and profile.decoder.held_bytes == hidden
    assert profile.embed.input_bytes == 2 * (2 * 16 * 8)  # input ids + position ids, int64
    assert profile.decoder.input_bytes == hidden + 2 * 16 * 8  # hidden + position ids
    assert profile.head.held_bytes > 2 * 16 * 1017 * 4  # at least the fp32 log-probabilities the loss keeps
    assert profile.decoder.working_bytes is None and profile.tied_params == 0

    fp32 = state_bytes({"optimizer": {"type": "AdamW"}}, data_degree=1)
    assert (fp32.weights, fp32.grads, fp32.optimizer, fp32.step) == (4, 4, 8, 0)
    allowance = 2 * 2**30
    first = estimate_stage(profile, fp32, 0, 0, 3, num_stages=2, micro_batches=4, allowance=allowance)
    params = EMBED_PARAMS + 2 * DECODER_PARAMS
    # 2 micro batches in flight on stage 0 of 2; each: received input + its clone, embedding and 2 decoders.
    activations = 2 * (2 * profile.embed.input_bytes + 3 * hidden)
    assert first.total == params * 4 + params * 4 + params * 8 + activations + allowance
    last = estimate_stage(profile, fp32, 1, 3, 6, num_stages=2, micro_batches=4, allowance=allowance)
    params = 2 * DECODER_PARAMS + HEAD_PARAMS
    activations = 1 * (2 * profile.decoder.input_bytes + 2 * hidden + profile.head.held_bytes)
    assert last.total == params * 16 + activations + allowance
    assert first.seconds == profile.embed.seconds + 2 * profile.decoder.seconds
    # ZB-H1 holds a micro batch from its forward to its W: 2 on both stages of 2 (the simulator's peak).
    zb_first, zb_last = (estimate_stage(profile, fp32, stage, start, stop, num_stages=2, micro_batches=4,
                                        allowance=allowance, schedule="zb-h1")
                         for stage, start, stop in ((0, 0, 3), (1, 3, 6)))
    assert zb_first.total == first.total and (zb_first.in_flight, zb_last.in_flight) == (2, 2)
    assert zb_last.total == last.total + activations

    # bf16 without ZeRO keeps an fp32 copy of the gradient shard only during the optimizer step, when no
    # activations are held: the stage's peak is the larger of the two.
    # Each bf16 gradient is freed once added to the bf16 accumulation buffer (pipellm's default), or kept as well.
    bf16 = state_bytes({"bf16": {"enabled": True}}, data_degree=2)
    assert (bf16.weights, bf16.grads, bf16.optimizer, bf16.step) == (2, 2, (4 + 8) / 2, 4 / 2)
    stage = estimate_stage(profile, bf16, 1, 3, 6, num_stages=2, micro_batches=4, allowance=0)
    assert stage.total == params * (2 + 2 + 6) + max(activations, params * 2)
    deferred = state_bytes({"bf16": {"enabled": True, "immediate_grad_update": False}}, data_degree=2)
    assert (deferred.weights, deferred.grads, deferred.optimizer, deferred.step) == (2, 4, (4 + 8) / 2, 4 / 2)
    # A tied head is a replica of the embedding on another stage, and the same module on a stage holding both.
    hf_config.tie_word_embeddings = True
    tied = profile_layers(family, hf_config, shape, torch.device("cpu"))
    assert tied.head.params == 64 + EMBED_PARAMS and tied.tied_params == EMBED_PARAMS
    whole = estimate_stage(tied, fp32, 0, 0, 6, num_stages=1, micro_batches=4, allowance=0)
    assert whole.weights == (EMBED_PARAMS + 4 * DECODER_PARAMS + 64) * 4


@pytest.mark.parametrize("ds_config, data_degree, expected", [
    ({"bf16": {"enabled": True}, "zero_optimization": {"stage": 1}, "data_types": {"grad_accum_dtype": "fp32"},
      "optimizer": {"type": "Lion"}}, 2, (2, 4, (4 + 4) / 2, 0)),  # each bf16 gradient freed once accumulated
    ({"bf16": {"enabled": True, "immediate_grad_update": False}, "zero_optimization": {"stage": 1},
      "data_types": {"grad_accum_dtype": "fp32"}}, 2, (2, 2 + 4, (4 + 8) / 2, 0)),
    ({"bf16": {"enabled": True}, "zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}}}, 4,
     (2, 2, 0, 0)),
    ({"bf16": {"enabled": True}, "zero_optimization": {"stage": 1}}, 4, (2, 2 + 4 / 4, (4 + 8) / 4, 0)),
    ({"zero_optimization": {"stage": 1}}, 2, (4, 4 + 4 / 2, (4 + 8) / 2, 0)),
    ({"fp16": {"enabled": True}}, 2, (2, 2, 4 + 8, 4)),
], ids=["bf16-zero1-fp32-accumulation-lion", "bf16-bf16-grads-kept", "offload", "bf16-zero1", "fp32-zero1", "fp16"])
def test_state_bytes_by_precision_optimizer_and_zero(ds_config, data_degree, expected):
    state = state_bytes(ds_config, data_degree)
    assert (state.weights, state.grads, state.optimizer, state.step) == expected


def synthetic_profile(decoder_held: int) -> Profile:
    def cost(seconds, held):
        return LayerCost(seconds=seconds, held_bytes=held, working_bytes=0, input_bytes=0, params=0)
    return Profile(device="test", embed=cost(1.0, 0), decoder=cost(2.0, decoder_held), head=cost(1.0, 0),
                   layers=PipelineLayers(num_decoders=4, tied=False), tied_params=0)


def test_memory_decides_the_split_and_nothing_fitting_says_what_to_change():
    profile, state = synthetic_profile(decoder_held=100), state_bytes({}, 1)
    # Fastest: [3, 3] (5 | 5). Stage 0 holds 2 micro batches of 100 per decoder, stage 1 one: with 300 bytes
    # stage 0 takes at most one decoder, stage 1 at most three.
    fastest = make_plan(profile, state, 2, 8, device_memory=1e9, allowance=0)
    assert fastest.parts == [3, 3] and fastest.fits and fastest.chosen
    fitting = make_plan(profile, state, 2, 8, device_memory=300, allowance=0)
    assert fitting.parts == [2, 4] and fitting.fits and [s.total for s in fitting.stages] == [200, 300]
    assert fitting.bubble == 1 / 9
    with pytest.raises(PipellmError) as error:
        make_plan(profile, state, 2, 8, device_memory=150, allowance=0, must_fit=True)
    message = str(error.value)
    assert "\n" not in message and "`model_topo.parts: auto`" in message
    for advice in ("more pipeline stages", "use_grad_ckpt: true", "train_micro_batch_size_per_gpu"):
        assert advice in message
    assert "least memory any split needs is" in message
    shown = make_plan(profile, state, 2, 8, device_memory=150, allowance=0)
    assert not shown.fits and shown.parts == [3, 3] and "more pipeline stages" in shown.problem
    evaluated = make_plan(profile, state, 2, 8, device_memory=300, parts=[3, 3], allowance=0)
    assert not evaluated.chosen and not evaluated.fits and "stage 0 needs" in evaluated.problem


def test_plan_command_prints_the_plan(tmp_path, capsys, monkeypatch):
    config = write_config(tmp_path)
    result = subprocess.run([sys.executable, "-m", "pipellm.plan", "--config", str(config)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    parts = [int(p) for p in re.search(r"^parts: \[([\d, ]+)\] \(auto", result.stdout, re.M).group(1).split(",")]
    assert len(parts) == 2 and min(parts) >= 1 and sum(parts) == 4 + 2
    spans = [(int(a), int(b or a)) for a, b in re.findall(r"^[01] +(\d+)(?:-(\d+))?: ", result.stdout, re.M)]
    assert spans == [(0, parts[0] - 1), (parts[0], 5)]
    assert "bubble (P - 1) / (m + P - 1) = 1 / 5 = 20.0%" in result.stdout
    assert re.search(r"^device memory .* per device: fits", result.stdout, re.M)

    # Explicit parts are evaluated, not chosen; --num-stages and --parts try other layouts.
    main(["--config", str(write_config(tmp_path, parts=[2, 4], name="explicit.yml"))])
    assert "parts: [2, 4] (evaluated: `parts: [2, 4]`)" in capsys.readouterr().out
    main(["--config", str(config), "--num-stages", "3", "--parts", "uniform"])
    assert "parts: [2, 2, 2] (evaluated: `parts: uniform`)" in capsys.readouterr().out
    main(["--config", str(config), "--device-memory-gib", "1"])
    out = capsys.readouterr().out
    assert "does not fit: no split of the 6 pipeline layers into 2 stages fits in 1.0 GiB" in out

    for argv, expected in ((["--num-stages", "7"], "fewer than the 7 stages"),
                           (["--parts", "2,2"], "sums to 4 but the model has 6"),
                           (["--parts", "2,2,2"], "has 3 entries for 2 stages"),
                           (["--parts", "two"], "--parts 'two'"),
                           (["--device-memory-gib", "0"], "--device-memory-gib must be > 0")):
        with pytest.raises(SystemExit) as exit_code:
            main(["--config", str(config), *argv])
        assert exit_code.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("error: ") and expected in err, (argv, err)

    # The layers are profiled with the run's speed levers: one that cannot run here is one line too.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_code:
        main(["--config", str(write_config(tmp_path, name="liger.yml", speed={"liger_kernels": True}))])
    assert exit_code.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "`speed.liger_kernels` runs Triton kernels on CUDA" in err


def test_config_accepts_auto(tmp_path):
    assert load_config(write_config(tmp_path)).model_topo.parts == "auto"
    with pytest.raises(PipellmError, match="`uniform`, `parameters` or `auto`, got 'automatic'"):
        load_config(write_config(tmp_path, parts="automatic", name="bad.yml"))


@dataclasses.dataclass
class SavedRun:
    """What ``agreed_auto_parts`` reads of a ``pipellm.training.checkpointer.ResumePoint``: the checkpoint's layout."""

    state: dict
    weights_only: bool = False


def auto_parts_on_rank(rank: int, config: str) -> None:
    """Every rank calls ``agreed_auto_parts``; all must end with the same split (or the same error)."""
    import deepspeed.comm as dist

    cfg = load_config(config)
    hf_config, family = load_model_config(cfg.model_path)
    # Replaced where they are looked up: plan_run's profiling, agreed_auto_parts' device memory.
    measure, device_memory = pipellm.plan.profile_layers, agree.device_memory_bytes
    # The checkpoint's split ([2, 4] in DeepSpeed's boundaries), kept without measuring anything.
    saved = SavedRun({"layout": {"stage_boundaries": [0, 2, 7], "axes": ["pipe", "data"], "dims": [2, 1]}})
    for case, resume in (("fits", None), ("nothing fits", None), ("resume", saved)):
        pipellm.plan.profile_layers = measure if rank == 0 and resume is None else None  # only rank 0 measures
        agree.device_memory_bytes = (lambda device, processes: 1.0) if case == "nothing fits" else device_memory
        try:
            outcome = agree.agreed_auto_parts(cfg, hf_config, family, resume)
        except PipellmError as err:
            outcome = str(err)
        everyone = [None, None]
        dist.all_gather_object(everyone, outcome)
        assert everyone[0] == everyone[1], (case, everyone)
        if case == "fits":
            assert len(outcome) == 2 and min(outcome) >= 1 and sum(outcome) == 6, outcome
        elif case == "resume":
            assert outcome == [2, 4]
        else:
            assert outcome.startswith("`model_topo.parts: auto`: no split of the 6 pipeline layers"), outcome


def test_every_rank_gets_rank_zeros_split(tmp_path):
    run_distributed(2, auto_parts_on_rank, str(write_config(tmp_path)))
