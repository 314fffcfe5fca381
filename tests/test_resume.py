"""Resuming through the real launcher: a run SIGKILLed after a checkpoint (with a half-written save left behind)
and one stopped by SIGTERM both resume into exactly the uninterrupted run's metrics (fp32 CPU: ==); evals log
perplexity, early stopping stops and keeps the best checkpoint, ``keep_last_n`` prunes, and a changed stage
layout resumes only weights-only. bf16 and ZeRO-1 + CPU offload resume exactly too (two ranks spawned in-process),
and a bf16 checkpoint exports. The pure rules (early stopping, which checkpoint resumes, RNG states, config
keys) are tested in-process."""
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
from pipellm.training.checkpointer import STATE_FILE, ResumePoint
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


def start(tmp, name: str, config: dict) -> subprocess.Popen:
    path = tmp / f"{name}.yml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.Popen([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                             str(free_port()), "train_ds.py", "--config", str(path)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


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


def test_a_changed_layout_resumes_weights_only(reference, tiny_pp_model):
    tmp, reference_save, _ = reference
    checkpoint = ResumePoint(reference_save / "global_step3", weights_only=False)
    new_layout = {"stage_boundaries": [0, 2, 7], "axes": ["pipe", "data"], "dims": [2, 1]}
    with pytest.raises(PipellmError, match=r"saved with stage boundaries \[0, 3, 7\] on \['pipe', 'data'\] \[2, 1\], "
                                           r"this run has \[0, 2, 7\] .* set `resume_weights_only: true`"):
        checkpoint.check_layout(new_layout)
    ResumePoint(reference_save / "global_step3", weights_only=True).check_layout(new_layout)

    save = tmp / "weights_only"
    config = run_config(tmp, tiny_pp_model[1], save, resume=str(reference_save / "global_step3"),
                        resume_weights_only=True, max_steps=5,
                        model_topo={"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}, "parts": [2, 4]})
    code, output = finish(start(tmp, "weights_only", config))
    assert code == 0, output[-3000:]
    assert "at step 3 (weights only, fresh optimizer state)" in output, output[-3000:]
    records, reference_records = metrics(save), metrics(reference_save)
    assert [r["step"] for r in records] == [4, 5]
    # Step 4's loss comes from step 3's weights, so it is the reference's, and it trains at the reference's lr.
    assert (records[0]["loss"], records[0]["lr"]) == (reference_records[3]["loss"], reference_records[3]["lr"])


# Per precision: its DeepSpeed keys, and the optimizer state files its checkpoints hold (proof it ran that way).
PRECISIONS = {"bf16": ({"bf16": {"enabled": True}}, "bf16_zero_pp_rank_*_optim_states.pt"),
              "zero1-offload": ({"zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}}},
                                "zero_pp_rank_*_optim_states.pt")}


def train_in_turn(rank: int, config_paths: list[str], out_dir: str) -> None:
    """``train_ds.py --config`` for each config on this rank, one after the other (one spawn for all runs)."""
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps([train_main(path) for path in config_paths]))


def test_bf16_and_zero1_offload_resume_exactly(tmp_path, tiny_pp_model):
    """Per precision, one epoch (5 steps; evals at 3 and 5; saves at 3 (best), 4 and 5), then a run resumed
    from its global_step3 into another save directory: steps 4 and 5 log exactly the uninterrupted run's
    figures. bf16 restores DeepSpeed's bf16 optimizer from its bf16_zero_* files, ZeRO-1 its partitioned fp32
    weights and moments; without them step 5 differs."""
    runs = []
    for name, (keys, _) in PRECISIONS.items():
        full, resumed = tmp_path / f"{name}-full", tmp_path / f"{name}-resumed"
        for save, resume in ((full, {}), (resumed, {"resume": str(full / "global_step3")})):
            path = tmp_path / f"{save.name}.yml"
            path.write_text(yaml.safe_dump(run_config(tmp_path, tiny_pp_model[1], save, n_epochs=1, **keys,
                                                      **resume)))
            runs.append(str(path))
    run_distributed(2, train_in_turn, runs, str(tmp_path))
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    for run, *on_ranks in zip(runs, *results):
        assert [r["exit_code"] for r in on_ranks] == [0, 0], (run, on_ranks[0]["stderr"][-3000:])
        # Each run trains to step 5. One that stopped early exits 0 too, and its last line says why: once, on a
        # crowded machine, "stopped by SIGTERM at step 4" (a SIGTERM from outside the test ends a run after
        # the step it is in, as preemption should), which the metrics comparison below only showed as a
        # missing step 5.
        assert "pipellm: done, 5 steps in " in on_ranks[0]["stderr"], (run, on_ranks[0]["stderr"][-1500:])

    for index, (name, (_, optimizer_files)) in enumerate(PRECISIONS.items()):
        full, resumed = tmp_path / f"{name}-full", tmp_path / f"{name}-resumed"
        assert len(list((full / "global_step3").glob(optimizer_files))) == 2, name  # one per stage
        printed = results[0][2 * index + 1]["stderr"]
        assert f"pipellm: resumed from {full}/global_step3 at step 3 (weights, optimizer, LR scheduler, RNG " \
               f"states)" in printed, printed[-3000:]
        reference = metrics(full)
        assert [r["step"] for r in reference] == [1, 2, 3, 4, 5] and "eval_loss" in reference[4], name
        assert exact(metrics(resumed)) == exact(reference[3:]), name

    # pp_to_hg exports the bf16 layer files as they are: converted back, every tensor is the same bf16 tensor.
    checkpoint = tmp_path / "bf16-full" / "global_step5"
    back = hg_to_pp(pp_to_hg(checkpoint, tmp_path / "bf16_hf"), tmp_path / "bf16_pp")
    for layer in sorted(checkpoint.glob("layer_*-model_states.pt")):
        saved, exported = (torch.load(d / layer.name, weights_only=True) for d in (checkpoint, back))
        assert saved.keys() == exported.keys() and all(
            t.dtype == torch.bfloat16 and torch.equal(t, exported[k]) for k, t in saved.items()), layer.name


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
    for tag, step in (("global_step4", 4), ("global_step8", 8), ("global_step12.tmp", 12)):
        (save / tag).mkdir(parents=True)
        torch.save({"step": step}, save / tag / STATE_FILE)
    # Killed after renaming global_step8 but before moving `latest`, and again in the middle of a save.
    (save / "latest").write_text("global_step4")
    cfg = load_config(write_yaml(tmp_path, save_path=str(save), resume="auto"))
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


def test_deepspeed_checkpoint_reads_accept_only_the_allowed_records(tmp_path):
    """fp16 cannot run on CPU, so its optimizer file is not produced here: check that the dynamic loss scaler it
    holds loads through pipellm's weights-only reader, and that any other object is still refused."""
    import types

    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
    from pipellm.pipeline.deepspeed_compat import read_checkpoints_weights_only

    engine = types.SimpleNamespace(checkpoint_engine=types.SimpleNamespace())
    read_checkpoints_weights_only(engine)
    scaler = DynamicLossScaler(init_scale=2.0**16, scale_window=500, min_scale=1, delayed_shift=2,
                               consecutive_hysteresis=False)
    torch.save({"loss_scaler": scaler, "step": torch.tensor(3)}, tmp_path / "fp16_optim.pt")
    loaded = engine.checkpoint_engine.load(tmp_path / "fp16_optim.pt")
    assert vars(loaded["loss_scaler"]) == vars(scaler) and loaded["step"] == 3
    torch.save({"other": Path("x")}, tmp_path / "other.pt")
    with pytest.raises(Exception, match="weights_only"):
        engine.checkpoint_engine.load(tmp_path / "other.pt")
