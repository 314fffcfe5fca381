"""Resuming through the real launcher: a run SIGKILLed after a checkpoint (with a half-written save left behind)
and one stopped by SIGTERM both resume into exactly the uninterrupted run's metrics (fp32 CPU: ==); evals log
perplexity, early stopping stops and keeps the best checkpoint, ``keep_last_n`` prunes. Elastic resume: the
reference run (2 stages x 1 replica) resumes its full state on 2 stages x 2 replicas with ``parts: auto`` (4
processes, launcher), on one stage with ZeRO-1 turned on and on other parts (two ranks spawned in-process, with
the bf16, ZeRO-1 + CPU offload and bf16 LoRA runs, which resume exactly on their own layout and elastically on one
stage of two replicas and with ZeRO-1 off or other parts); a changed batch size, precision or optimizer is
refused and weights-only resumes start anew; a bf16 checkpoint exports. The pure rules (early stopping, which
checkpoint resumes, RNG states, the schedule's per-group state, fp16's loss scale, config keys) are tested
in-process."""
from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import yaml

from conftest import REPO
from distributed import free_port, run_distributed
from pipellm.config import load_config
from pipellm.convert.converters import hg_to_pp, pp_to_hg
from pipellm.errors import PipellmError
from pipellm.training.checkpointer import OPTIMIZER_STATE_FORMAT, STATE_FILE, ResumePoint
from pipellm.training.early_stopping import EarlyStoppingState
from pipellm.training.rng import capture_rng, restore_rng, rng_file
from test_optim import train_main

SAMPLES = REPO / "pipellm" / "assets" / "data" / "sample.jsonl"
# Compared between runs: everything but the timings.
EXACT_KEYS = ("step", "epoch", "loss", "lr", "grad_norm", "tokens", "eval_loss", "eval_ppl")


def run_config(tmp, pp_model, save, **overrides) -> dict:
    """40 records (36 train, 4 eval) in batches of 8: 5 steps per epoch, so the runs cross epoch boundaries.
    Evals at steps 3, 6, 9; min_delta 100 makes only the first improve, so patience 2 stops the run at step 9
    with `best` = global_step3. Saves at 3 (best), 4, 8 and 9; keep_last_n 2 leaves 3, 8, 9."""
    data = tmp / "data40.jsonl"
    if not data.exists():
        data.write_text("".join(SAMPLES.read_text().splitlines(keepends=True)[:40]))
    config = {"model_path": str(pp_model), "save_path": str(save), "data_path": str(data),
              "data_cache_dir": str(tmp / "cache"), "max_seq_len": 64, "n_epochs": 3, "log_steps": 1,
              "save_steps": 4, "eval_steps": 3, "eval_ratio": 0.1, "keep_last_n": 2,
              "early_stopping": {"patience": 2, "min_delta": 100.0}, "seed": 3,
              "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}, "parts": [3, 3]},
              "train_batch_size": 8, "train_micro_batch_size_per_gpu": 2,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}},
              "lr_schedule": {"warmup_steps": 3, "decay": "cosine", "min_lr_ratio": 0.1},
              "gradient_clipping": 1.0}
    config.update(overrides)
    return config


def start(tmp, name: str, config: dict, processes: int = 2) -> subprocess.Popen:
    path = tmp / f"{name}.yml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.Popen([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(processes),
                             "--master_port", str(free_port()), "train_ds.py", "--config", str(path)], cwd=REPO,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def finish(launch: subprocess.Popen) -> tuple[int, str]:
    try:
        output, _ = launch.communicate(timeout=600)
    finally:
        if launch.poll() is None:
            os.killpg(launch.pid, signal.SIGKILL)
    return launch.returncode, output


def metrics(save) -> list[dict]:
    return [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]


def exact(records) -> list[tuple]:
    return [tuple(r.get(k) for k in EXACT_KEYS) for r in records]


def wait_for_step(launch, save, step: int, metrics_inode=None) -> None:
    """Until ``save/metrics.jsonl`` (a new file, when ``metrics_inode`` is the old one's) records ``step``."""
    path = save / "metrics.jsonl"
    deadline = time.time() + 300
    while True:
        assert launch.poll() is None, launch.communicate()[0][-3000:]
        assert time.time() < deadline, "the run did not reach step %d" % step
        try:
            if path.stat().st_ino != metrics_inode and any(r["step"] >= step for r in metrics(save)):
                return
        except (FileNotFoundError, json.JSONDecodeError):  # not created yet / a line half-written
            pass
        time.sleep(0.02)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_pp_model):
    """The uninterrupted run: (tmp dir, save dir, launcher output)."""
    tmp = tmp_path_factory.mktemp("resume")
    save = tmp / "reference"
    code, output = finish(start(tmp, "reference", run_config(tmp, tiny_pp_model[1], save)))
    assert code == 0, output[-3000:]
    return tmp, save, output


def test_evals_log_perplexity_stop_early_and_keep_the_best(reference):
    _, save, output = reference
    records = metrics(save)
    assert [r["step"] for r in records] == list(range(1, 10))
    assert [r["epoch"] for r in records] == [0] * 5 + [1] * 4
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6, 9]
    assert all(r["eval_ppl"] == math.exp(r["eval_loss"]) for r in evals)
    assert f"pipellm: early stopping at step 9: eval_loss has not improved by min_delta=100 for 2 evals; " \
           f"checkpoint {save}/global_step9; best eval_loss {evals[0]['eval_loss']:.4f} at step 3: " \
           f"{save}/global_step3" in output, output[-3000:]
    assert (save / "best").read_text() == "global_step3"
    assert (save / "latest").read_text() == "global_step9"
    # keep_last_n 2 deleted global_step4 once global_step9 was saved, never the best checkpoint.
    assert sorted(p.name for p in save.iterdir() if p.name.startswith("global_step")) == \
        ["global_step3", "global_step8", "global_step9"]
    # The documented export of the best checkpoint: pp_to_hg --input-path SAVE/$(cat SAVE/best).
    exported = pp_to_hg(save / (save / "best").read_text(), save.parent / "best_hf")
    assert (exported / "config.json").is_file() and any(exported.glob("*.safetensors"))


def test_killed_and_preempted_runs_resume_into_the_uninterrupted_run(reference, tiny_pp_model):
    tmp, reference_save, _ = reference
    save = tmp / "interrupted"
    config = run_config(tmp, tiny_pp_model[1], save)

    # SIGKILL the whole launcher after step 5 (global_step4 saved; the next save is global_step8).
    launch = start(tmp, "killed", config)
    wait_for_step(launch, save, 5)
    os.killpg(launch.pid, signal.SIGKILL)
    launch.wait()
    assert (save / "latest").read_text() == "global_step4"
    killed_records = metrics(save)
    assert killed_records[-1]["step"] >= 5  # records of lost steps: resuming must drop them
    # What a kill in the middle of saving global_step8 leaves: a partial temporary directory.
    partial = save / "global_step8.tmp"
    partial.mkdir()
    (partial / "layer_00-model_states.pt").write_bytes(b"PK\x03\x04 cut short")

    # Resume; SIGTERM one rank mid-run: both ranks finish the same step, save, and exit 0.
    config["resume"] = "auto"
    launch = start(tmp, "resumed", config)
    wait_for_step(launch, save, 5, metrics_inode=(save / "metrics.jsonl").stat().st_ino)
    rank1 = next(p for p in psutil.Process(launch.pid).children(recursive=True)
                 if "--local_rank=1" in " ".join(p.cmdline()))
    rank1.send_signal(signal.SIGTERM)
    code, output = finish(launch)
    assert code == 0, output[-3000:]
    assert f"pipellm: resumed from {save}/global_step4 at step 4" in output, output[-3000:]
    stopped = re.search(r"pipellm: stopped by SIGTERM at step (\d+); checkpoint (\S+) \(resume with resume: auto\)",
                        output)
    assert stopped, output[-3000:]
    step = int(stopped.group(1))
    assert 5 <= step < 9 and stopped.group(2) == f"{save}/global_step{step}"
    assert (save / "latest").read_text() == f"global_step{step}"
    assert [r["step"] for r in metrics(save)] == list(range(1, step + 1))
    assert not partial.exists()  # the resumed run removed it at its start

    code, output = finish(start(tmp, "finished", config))
    assert code == 0, output[-3000:]
    assert exact(metrics(save)) == exact(metrics(reference_save))
    for name in ("best", "latest"):
        assert (save / name).read_text() == (reference_save / name).read_text()
    assert sorted(p.name for p in save.iterdir() if p.name.startswith("global_step")) == \
        ["global_step3", "global_step8", "global_step9"]


def test_weights_only_starts_anew_and_a_full_resume_refuses_what_its_state_cannot_follow(reference, tiny_pp_model):
    tmp, reference_save, _ = reference
    checkpoint = reference_save / "global_step3"
    for keys, message in [
        ({"train_batch_size": 16}, r"`train_batch_size` 16 differs from the 8 .*global_step3 was trained with: the "
                                   r"step counts global batches of 8 .* keep 8 with any `dims` and micro batch size"),
        ({"bf16": {"enabled": True}}, r"global_step3 was trained in fp32 and this run is bf16"),
        ({"optimizer": {"type": "Lion", "params": {"lr": 1e-4}}},
         r"global_step3 was trained with AdamW, this run's `optimizer.type` is Lion"),
    ]:
        config = run_config(tmp, tiny_pp_model[1], tmp / "refused", resume=str(checkpoint), **keys)
        (tmp / "refused.yml").write_text(yaml.safe_dump(config))
        with pytest.raises(PipellmError, match=message + r".*`resume_weights_only: true`") as error:
            ResumePoint.find(load_config(tmp / "refused.yml"))
        assert "\n" not in str(error.value)
        (tmp / "refused.yml").write_text(yaml.safe_dump(dict(config, resume_weights_only=True)))
        assert ResumePoint.find(load_config(tmp / "refused.yml")).weights_only  # a new run: nothing to keep

    save = tmp / "weights_only"
    config = run_config(tmp, tiny_pp_model[1], save, resume=str(checkpoint), resume_weights_only=True, max_steps=5,
                        model_topo=OTHER_PARTS)
    code, output = finish(start(tmp, "weights_only", config))
    assert code == 0, output[-3000:]
    assert "at step 3 (weights only, fresh optimizer state)" in output, output[-3000:]
    records, reference_records = metrics(save), metrics(reference_save)
    assert [r["step"] for r in records] == [4, 5]
    # Step 4's loss comes from step 3's weights, so it is the reference's, and it trains at the reference's lr.
    assert (records[0]["loss"], records[0]["lr"]) == (reference_records[3]["loss"], reference_records[3]["lr"])


# ---------------------------------------------------------------------------------------------------------------
# Elastic resume: the full state on another layout

def topology(dims: list[int], parts) -> dict:
    return {"process_topology": {"axes": ["pipe", "data"], "dims": dims}, "parts": parts}


OTHER_PARTS = topology([2, 1], [2, 4])
ONE_STAGE_TWO_REPLICAS = topology([1, 2], [6])
FIGURE_ULPS = 2
TENSOR_ULPS_PER_STEP = 4
"""How far a run resumed on another layout may drift from the uninterrupted one, in units in the last place: a
logged figure (loss, gradient norm, eval loss) by ``FIGURE_ULPS``, the final checkpoint's tensors (of each
tensor's largest element) by ``TENSOR_ULPS_PER_STEP`` per step run. Its forward and backward compute each layer
alike, but some sums are rounded in another order: the global gradient norm (summed per stage, then over the
stages, so another split rounds it differently, and clipping scales every gradient by it), the data-parallel mean
of the gradients and of the loss (other replica counts), and ZeRO's norm against pipellm's (ZeRO on or off). Each
step's update then differs in its last bits, and later steps carry that on. Measured on these runs: figures at
most 1 ulp apart, tensors at most 14 ulps after 6 steps and 6 after 2 (3 per step); the same layout is bit-exact
(asserted with ==), and so are ZeRO-1 + offload turned off and LoRA on other parts, on one replica here. A
missing optimizer state changes the next update by far more (a fresh AdamW's first step moves every weight by the
learning rate, thousands of ulps); a missing fp32 master of a bf16 run does not (one rounded from the bf16 weight
is within half a bf16 ulp), which only an exact comparison shows (LoRA on other parts)."""


def ulp(value: float, dtype: torch.dtype) -> float:
    """The spacing of ``dtype``'s numbers at ``value`` (their largest, for a tensor)."""
    mantissa, exponent = math.frexp(abs(value))
    return torch.finfo(dtype).eps * 2.0 ** (exponent - 1) if value else torch.finfo(dtype).tiny


def ulps_apart(got, expected, precision: torch.dtype = torch.float32) -> float:
    """How far apart, in units in the last place of ``precision`` or of a tensor's own dtype if coarser."""
    if isinstance(expected, float):
        return abs(got - expected) / ulp(expected, precision)
    scale = max(expected.abs().max().item(), got.abs().max().item())
    coarser = max((precision, expected.dtype), key=lambda dtype: torch.finfo(dtype).eps)
    return (got.double() - expected.double()).abs().max().item() / ulp(scale, coarser)


def checkpoint_tensors(checkpoint: Path) -> dict:
    """Every tensor of a checkpoint's layer files (weights) and optimizer files (moments, step, fp32 masters)."""
    tensors = {}
    for path in sorted(checkpoint.glob("layer_*.pt")):
        for key, value in torch.load(path, weights_only=True).items():
            entries = value.items() if isinstance(value, dict) else [(None, value)]
            tensors.update({(path.name, key, part): tensor for part, tensor in entries})
    return tensors


def assert_continues(save: Path, reference_save: Path, start: int, same_data_parallel: bool,
                     precision: torch.dtype = torch.float32) -> None:
    """The run resumed at step ``start`` into ``save`` ran the reference's remaining steps (until its early stop)
    with the same epochs, learning rates, token counts and evals, and logged the same losses, gradient norms and
    eval losses and saved the same final weights, fp32 masters and optimizer moments, up to ``FIGURE_ULPS`` and
    ``TENSOR_ULPS_PER_STEP`` per step run, in units of ``precision``: the dtype the model computes in, and in
    which bf16 accumulates and averages its gradients (so a bf16 run's fp32 moments and masters differ at bf16's
    resolution). The first step's loss is computed from the checkpoint's weights exactly: with the same replica
    count (the loss is averaged over the replicas) it is the reference's bit for bit."""
    records, expected = metrics(save), {r["step"]: r for r in metrics(reference_save)}
    last = max(expected)
    assert [r["step"] for r in records] == list(range(start + 1, last + 1))
    for record in records:
        reference_record = expected[record["step"]]
        assert [record.get(k) for k in ("epoch", "lr", "tokens")] == \
            [reference_record.get(k) for k in ("epoch", "lr", "tokens")], record
        assert ("eval_loss" in record) == ("eval_loss" in reference_record), record
        for key in ("loss", "grad_norm", "eval_loss"):
            if key in reference_record:
                assert ulps_apart(record[key], reference_record[key], precision) <= FIGURE_ULPS, \
                    (key, record, reference_record)
    if same_data_parallel:
        assert records[0]["loss"] == expected[start + 1]["loss"]
    final, reference_final = (checkpoint_tensors(s / f"global_step{last}") for s in (save, reference_save))
    assert final.keys() == reference_final.keys() and any(part == "exp_avg_sq" for _, _, part in final)
    assert sorted(p.name for p in (save / f"global_step{last}").glob("layer_*")) == \
        sorted(p.name for p in (reference_save / f"global_step{last}").glob("layer_*"))
    worst = max(ulps_apart(final[k], reference_final[k], precision) for k in final)
    assert worst <= TENSOR_ULPS_PER_STEP * (last - start), worst


def test_a_run_resumes_its_full_state_on_two_stages_of_two_replicas(reference, tiny_pp_model):
    """Saved on 2 stages x 1 replica at step 3, resumed on 2 x 2 with `parts: auto` (4 processes): the early
    stop at step 9 comes as in the reference (early-stopping state) with its metrics and final state."""
    tmp, reference_save, _ = reference
    save = tmp / "two_by_two"
    config = run_config(tmp, tiny_pp_model[1], save, resume=str(reference_save / "global_step3"),
                        model_topo=topology([2, 2], "auto"))
    code, output = finish(start(tmp, "two_by_two", config, processes=4))
    assert code == 0, output[-3000:]
    assert re.search(rf"pipellm: resumed from {save.parent}/reference/global_step3 at step 3 \(weights, optimizer, "
                     rf"LR scheduler states; layout pipe 2 x data 1, stage boundaries \[0, 3, 7\] -> pipe 2 x data 2, "
                     rf"stage boundaries \[0, \d, 7\], RNG states reseeded\)", output), output[-3000:]
    assert "pipellm: early stopping at step 9" in output, output[-3000:]
    assert_continues(save, reference_save, 3, same_data_parallel=False)


ZERO1_OFFLOAD = {"zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}}}
LORA = {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}
PRECISIONS = {"bf16": {"bf16": {"enabled": True}}, "zero1-offload": ZERO1_OFFLOAD,
              "lora": {"bf16": {"enabled": True}, "lora": LORA}}
# Resumed from a precision's (or the fp32 reference's) global_step3 on another layout: name -> (source, keys).
ELASTIC = {"bf16-one-stage": ("bf16", dict(PRECISIONS["bf16"], model_topo=ONE_STAGE_TWO_REPLICAS)),
           "zero1-offload-one-stage": ("zero1-offload", dict(ZERO1_OFFLOAD, model_topo=ONE_STAGE_TWO_REPLICAS)),
           "zero1-offload-to-plain": ("zero1-offload", {"model_topo": OTHER_PARTS}),
           "lora-one-stage": ("lora", dict(PRECISIONS["lora"], model_topo=ONE_STAGE_TWO_REPLICAS)),
           "lora-frozen-first-stage": ("lora", dict(PRECISIONS["lora"], model_topo=topology([2, 1], [1, 5]))),
           "fp32-other-parts": ("reference", {"model_topo": OTHER_PARTS}),
           "fp32-one-stage-zero1": ("reference", {"zero_optimization": {"stage": 1},
                                                  "model_topo": ONE_STAGE_TWO_REPLICAS})}


def train_in_turn(rank: int, config_paths: list[str], out_dir: str) -> None:
    """``train_ds.py --config`` for each config on this rank, one after the other (one spawn for all runs)."""
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps([train_main(path) for path in config_paths]))


def test_precisions_zero1_and_changed_layouts_resume(reference, tiny_pp_model, tied_pp_model):
    """Two ranks run in turn (spawned in-process: cheaper than the launcher). Per precision, one epoch (5 steps;
    evals at 3 and 5; saves at 3 (best), 4 and 5), then a run resumed from its global_step3 on the same layout
    into another save directory: steps 4 and 5 log exactly the uninterrupted run's figures and save its state bit
    for bit (bf16: DeepSpeed's bf16 optimizer, its fp32 masters and moments partitioned; ZeRO-1 + offload its
    partitioned fp32 weights and moments). Then the elastic resumes of ``ELASTIC``: one stage of two replicas
    (bf16 and ZeRO-1 + offload re-partition every parameter over 2 replicas; fp32 from the per-parameter
    optimizer of the reference turns ZeRO-1 on), ZeRO-1 turned off, other parts. The precisions train the tiny
    llama with a tied head: on 2 stages its pipeline-replicated copy trains on stage 1, on 1 stage it is the
    embedding itself; the fp32 reference's is untied. LoRA (bf16) trains only adapters, the tied embedding frozen:
    its layer files' optimizer state goes to one stage of two replicas, and to parts [1, 5] (a first stage that
    trains nothing, holding only its placeholder), where it continues bit for bit."""
    tmp, reference_save, _ = reference
    saves = {"reference": reference_save}
    runs = []

    def add(name: str, keys: dict, source: str | None = None, n_epochs: int = 1) -> None:
        saves[name] = tmp / name
        resume = {"resume": str(saves[source] / "global_step3")} if source else {}
        model = tiny_pp_model[1] if "reference" in (name, source) else tied_pp_model
        path = tmp / f"{name}.yml"
        path.write_text(yaml.safe_dump(run_config(tmp, model, saves[name], n_epochs=n_epochs, **keys, **resume)))
        runs.append(str(path))

    for name, keys in PRECISIONS.items():
        add(f"{name}-full", keys)
        add(f"{name}-resumed", keys, f"{name}-full")
    for name, (source, keys) in ELASTIC.items():
        add(name, keys, source if source == "reference" else f"{source}-full", 3 if source == "reference" else 1)
    run_distributed(2, train_in_turn, runs, str(tmp))
    results = [json.loads((tmp / f"rank{rank}.json").read_text()) for rank in range(2)]
    printed = dict(zip((Path(run).stem for run in runs), (result["stderr"] for result in results[0])))
    for run, *on_ranks in zip(runs, *results):
        assert [r["exit_code"] for r in on_ranks] == [0, 0], (run, on_ranks[0]["stderr"][-3000:])
        # Each run trains to step 5 (the reference's continuations stop early at step 9). One that stopped
        # otherwise exits 0 too, and its last line says why: once, on a crowded machine, "stopped by SIGTERM at
        # step 4" (a SIGTERM from outside the test ends a run after the step it is in, as preemption should),
        # which the metrics comparison below only showed as a missing step 5.
        continues_the_reference = ELASTIC.get(Path(run).stem, ("",))[0] == "reference"
        ending = "early stopping at step 9" if continues_the_reference else "done, 5 steps in "
        assert f"pipellm: {ending}" in on_ranks[0]["stderr"], (run, on_ranks[0]["stderr"][-1500:])

    for name in PRECISIONS:
        full, resumed = saves[f"{name}-full"], saves[f"{name}-resumed"]
        assert f"pipellm: resumed from {full}/global_step3 at step 3 (weights, optimizer, LR scheduler, RNG " \
               f"states)" in printed[f"{name}-resumed"], printed[f"{name}-resumed"][-3000:]
        reference_records = metrics(full)
        assert [r["step"] for r in reference_records] == [1, 2, 3, 4, 5] and "eval_loss" in reference_records[4]
        assert exact(metrics(resumed)) == exact(reference_records[3:]), name
        saved, expected = (checkpoint_tensors(s / "global_step5") for s in (resumed, full))
        assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved), name
        # bf16 checkpoints hold each parameter's fp32 master; in fp32 the layer file's weight is the master. The
        # tied head's weight is the embedding's, saved once (layer file 0; the tied model has no head file).
        parameters = [key for (_, key, part) in saved if part == "exp_avg"]
        masters = [tensor for (_, _, part), tensor in saved.items() if part == "master"]
        assert (len(masters), {t.dtype for t in masters}) == ((len(parameters), {torch.float32})
                                                               if "bf16" in PRECISIONS[name] else (0, set())), name
        trained_files = range(6)
        if "lora" in PRECISIONS[name]:  # only the decoders' adapters (layer files 1-4) train and have a state
            assert sorted(parameters) == sorted(f"model.layers.{i}.{module}.lora_{ab}.default.weight" for i in range(4)
                                                for module in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
                                                for ab in "AB")
            trained_files = range(1, 5)
        else:
            assert parameters.count("model.embed_tokens.weight") == 1 and "lm_head.weight" not in parameters
        # Every layer file is written (a frozen one empty), an optimizer file only for a layer that trains.
        assert sorted(path.name for path in (full / "global_step5").glob("layer_*")) == \
            sorted([f"layer_{i:02d}-model_states.pt" for i in range(6)] +
                   [f"layer_{i:02d}-optim_states.pt" for i in trained_files]), name
        assert {path for path, _, _ in saved} == {f"layer_{i:02d}-{kind}_states.pt" for i in trained_files
                                                  for kind in ("model", "optim")}, name

    # pp_to_hg exports the bf16 layer files as they are: converted back, every tensor is the same bf16 tensor.
    checkpoint = saves["bf16-full"] / "global_step5"
    back = hg_to_pp(pp_to_hg(checkpoint, tmp / "bf16_hf"), tmp / "bf16_pp")
    for layer in sorted(checkpoint.glob("layer_*-model_states.pt")):
        saved, exported = (torch.load(d / layer.name, weights_only=True) for d in (checkpoint, back))
        assert saved.keys() == exported.keys() and all(
            t.dtype == torch.bfloat16 and torch.equal(t, exported[k]) for k, t in saved.items()), layer.name

    for name, layout in [("bf16-one-stage", r"pipe 1 x data 2, stage boundaries \[0, 7\]"),
                         ("lora-one-stage", r"pipe 1 x data 2, stage boundaries \[0, 7\]"),
                         ("lora-frozen-first-stage", r"pipe 2 x data 1, stage boundaries \[0, 1, 7\]")]:
        assert re.search(r"at step 3 \(weights, optimizer, LR scheduler states; layout pipe 2 x data 1, stage "
                         rf"boundaries \[0, 3, 7\] -> {layout}, RNG states reseeded\)", printed[name]), \
            printed[name][-3000:]
    for name, (source, keys) in ELASTIC.items():
        source_save = saves[source if source == "reference" else f"{source}-full"]
        assert_continues(saves[name], source_save, 3, same_data_parallel=keys["model_topo"] != ONE_STAGE_TWO_REPLICAS,
                         precision=torch.bfloat16 if "bf16" in keys else torch.float32)
    # LoRA into other parts on one replica (the first stage trains nothing): no gradient is averaged otherwise and
    # steps 4 and 5's norms stay under `gradient_clipping` (so the norm's other summation order scales nothing):
    # every update is the uninterrupted run's, bit for bit. This also proves the fp32 masters were restored: one
    # rounded from the bf16 weight is within half a bf16 ulp, which the ULP bounds cannot tell.
    lora_full = metrics(saves["lora-full"])
    assert all(r["grad_norm"] < 1.0 for r in lora_full[3:]) and exact(metrics(saves["lora-frozen-first-stage"])) == \
        exact(lora_full[3:])
    saved, expected = (checkpoint_tensors(s / "global_step5") for s in (saves["lora-frozen-first-stage"],
                                                                          saves["lora-full"]))
    assert all(torch.equal(saved[k], expected[k]) for k in expected)


def test_early_stopping_rule():
    state = EarlyStoppingState(patience=2, min_delta=0.1)
    improved = [state.update(loss, step) for step, loss in enumerate([3.0, 2.95, 2.85, 2.8, 2.76, 2.75], 1)]
    # Only 2.85 beats the best (3.0) by more than min_delta; after it the patience counter runs up again.
    assert improved == [True, False, True, False, False, False]
    assert (state.best_loss, state.best_step, state.evals_without_improvement) == (2.85, 3, 3)
    assert state.should_stop
    restored = EarlyStoppingState(patience=2, min_delta=0.1)
    restored.load_state_dict(state.state_dict())
    assert restored == state
    never = EarlyStoppingState(patience=0, min_delta=0.0)
    assert [never.update(4.0, step) for step in range(1, 20)][1:] == [False] * 18 and not never.should_stop


def test_resume_auto_takes_what_latest_names(tmp_path):
    save = tmp_path / "save"
    cfg = load_config(write_yaml(tmp_path, save_path=str(save), resume="auto"))
    resumable = {"optimizer_state": OPTIMIZER_STATE_FORMAT, "global_batch_size": cfg.global_batch_size,
                 "precision": "fp32", "optimizer": "AdamW"}
    for tag, step in (("global_step4", 4), ("global_step8", 8), ("global_step12.tmp", 12)):
        (save / tag).mkdir(parents=True)
        torch.save({"step": step, **resumable}, save / tag / STATE_FILE)
    # Killed after renaming global_step8 but before moving `latest`, and again in the middle of a save.
    (save / "latest").write_text("global_step4")
    assert ResumePoint.find(cfg).path == save / "global_step4"
    (save / "latest").write_text("global_step8")
    assert ResumePoint.find(cfg).step == 8
    (save / "latest").unlink()
    assert ResumePoint.find(cfg) is None  # nothing complete: start fresh
    cfg = load_config(write_yaml(tmp_path, save_path=str(save), resume=str(save / "global_step12.tmp")))
    (save / "global_step12.tmp" / STATE_FILE).unlink()
    with pytest.raises(PipellmError, match="is not a resumable checkpoint"):
        ResumePoint.find(cfg)
    cfg = load_config(write_yaml(tmp_path, save_path=str(save), resume=str(tmp_path / "nowhere")))
    with pytest.raises(PipellmError, match="does not exist"):
        ResumePoint.find(cfg)
    # An earlier pipellm's checkpoint (DeepSpeed's per-stage optimizer files): weights only.
    torch.save({"step": 4}, save / "global_step4" / STATE_FILE)
    cfg = load_config(write_yaml(tmp_path, save_path=str(save), resume=str(save / "global_step4")))
    with pytest.raises(PipellmError, match=r"was saved by an earlier pipellm, with DeepSpeed's per-stage optimizer "
                                           r"files, .* set `resume_weights_only: true`"):
        ResumePoint.find(cfg)


def test_rng_states_round_trip_through_weights_only_files(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    torch.save(capture_rng(), tmp_path / rng_file(0))
    before = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng(torch.load(tmp_path / rng_file(0), weights_only=True))
    after = (random.random(), np.random.rand(), torch.rand(3))
    assert before[:2] == after[:2] and torch.equal(before[2], after[2])


def write_yaml(tmp_path, **keys):
    config = {"model_path": "m", "save_path": str(tmp_path / "s"), "data_path": "d.jsonl",
              "train_micro_batch_size_per_gpu": 1, **keys}
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("keys, message", [
    (dict(keep_last_n=0), "`keep_last_n` must be >= 1"),
    (dict(resume=""), "`resume` is empty"),
    (dict(resume_weights_only=True), "`resume_weights_only: true` needs `resume`"),
    (dict(early_stopping={"patience": -1}), "`early_stopping.patience` must be >= 0"),
    (dict(early_stopping={"min_delta": -0.5}), "`early_stopping.min_delta` must be >= 0"),
    (dict(early_stopping={"patience": 2}, eval_ratio=0.1), "`early_stopping.patience` needs evals during training"),
    (dict(early_stopping={"patience": 2, "min_detla": 0.1}), "unknown key `early_stopping.min_detla`; did you mean"),
])
def test_bad_checkpoint_keys_fail_with_one_line(tmp_path, keys, message):
    with pytest.raises(PipellmError, match=re.escape(message)) as error:
        load_config(write_yaml(tmp_path, **keys))
    assert "\n" not in str(error.value)


def test_fp16_loss_scale_state_round_trips_through_a_weights_only_file(tmp_path):
    """fp16 cannot run on CPU: the dynamic loss scale of both of DeepSpeed's holders (ZeRO's ``loss_scaler``, the
    fp16 optimizer's ``loss_scale_config``), moved on by overflows, is saved as plain data into a
    file read with ``weights_only=True`` and restored into fresh holders; static scales (fp32, bf16) save none."""
    import types

    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaleConfig, LossScaler
    from pipellm.pipeline.deepspeed_compat import loss_scale_state, restore_loss_scale_state

    def zero():
        return types.SimpleNamespace(loss_scaler=DynamicLossScaler(init_scale=2.0**16, scale_window=2,
                                                                   min_scale=1, delayed_shift=2,
                                                                   consecutive_hysteresis=False))

    def fp16():
        return types.SimpleNamespace(loss_scale_config=LossScaleConfig(torch.float16, True, 1.0, None))

    trained = [zero(), fp16()]
    # Where 5 steps with overflows at the first and the last leave them.
    vars(trained[0].loss_scaler).update(cur_scale=2.0**14, cur_iter=5, last_overflow_iter=4, cur_hysteresis=1)
    vars(trained[1].loss_scale_config).update(cur_scale=2.0**14, cur_iter=5, last_overflow_iter=4)
    for holder, fresh in zip(trained, (zero(), fp16())):
        torch.save({"loss_scale": loss_scale_state(holder)}, tmp_path / "state.pt")
        restore_loss_scale_state(fresh, torch.load(tmp_path / "state.pt", weights_only=True)["loss_scale"])
        assert vars(vars(fresh).popitem()[1]) == vars(vars(holder).popitem()[1])
    assert loss_scale_state(types.SimpleNamespace(loss_scaler=LossScaler(1.0))) is None
    assert loss_scale_state(types.SimpleNamespace()) is None


def test_the_schedule_state_follows_a_stage_with_another_number_of_parameter_groups():
    """A stage holding only the embedding has one parameter group (no undecayed parameters), others two: the
    scheduler's per-group lists (one value repeated: every group has the same peak and schedule) are resized."""
    from pipellm.training.stage_checkpoint import per_group

    saved = {"base_lrs": [1e-3, 1e-3], "_last_lr": [5e-4, 5e-4], "last_epoch": 3, "lr_lambdas": [{}, {}]}
    assert per_group(saved, 1) == {"base_lrs": [1e-3], "_last_lr": [5e-4], "last_epoch": 3, "lr_lambdas": [{}]}
    assert per_group({"lrs": [5e-4]}, 2) == {"lrs": [5e-4, 5e-4]} and per_group(saved, 2) == saved
    with pytest.raises(PipellmError, match=r"different `base_lrs` per parameter group \(\[0.001, 0.002\]\)"):
        per_group({"base_lrs": [1e-3, 2e-3]}, 1)


def test_fp16_masters_and_moments_round_trip_per_parameter(monkeypatch):
    """fp16 without ZeRO (DeepSpeed's unfused fp16 optimizer keeps one fp32 master per parameter; fp16 cannot
    train on CPU, but its optimizer steps here): each parameter's master, moments and step are gathered, scattered
    into a fresh optimizer over the fp16 weights, and gathered again unchanged; the next step is the same."""
    import types

    from deepspeed.runtime.fp16.loss_scaler import LossScaleConfig, LossScaleProfile
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from pipellm.training.distributed import close_process_group, init_process_group
    from pipellm.training.parameter_states import ParameterStates

    def fp16_engine(weights):
        params = [torch.nn.Parameter(weight.detach().clone()) for weight in weights]
        base = torch.optim.AdamW(params, lr=1e-2, fused=True)
        scale = LossScaleConfig(torch.float16, True, 1.0, None, profile=LossScaleProfile.UNFUSED)
        optimizer = FP16_UnfusedOptimizer(base, deepspeed=None, loss_scale_config=scale,
                                          low_precision_dtype=torch.float16, mpu=None, clip_grad=0.0)
        return params, types.SimpleNamespace(optimizer=optimizer, basic_optimizer=base)

    def step(params, engine, seed):
        generator = torch.Generator().manual_seed(seed)
        for param in params:
            param.grad = torch.randn(param.shape, generator=generator).half()
        engine.optimizer.step()

    for name, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(name, value)
    init_process_group(60)
    try:
        generator = torch.Generator().manual_seed(0)
        trained = fp16_engine([torch.randn(shape, generator=generator).half() for shape in ((3, 4), (5,))])
        for seed in (1, 2):
            step(*trained, seed)
        saved = [ParameterStates.of(trained[1]).gather(param) for param in trained[0]]
        master = saved[0]["master"]
        assert set(saved[0]) == {"step", "exp_avg", "exp_avg_sq", "master"} and master.dtype == torch.float32
        assert not torch.equal(master.half().float(), master)  # more than the fp16 weight holds
        resumed = fp16_engine(trained[0])
        ParameterStates.of(resumed[1]).scatter(zip(resumed[0], saved))
        again = [ParameterStates.of(resumed[1]).gather(param) for param in resumed[0]]
        assert all(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(saved, again))
        step(*trained, 3)
        step(*resumed, 3)
        assert all(torch.equal(a, b) for a, b in zip(trained[0], resumed[0]))
    finally:
        close_process_group()
