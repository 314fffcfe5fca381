"""What a run reports, in-process: the metrics record by its documented formulas; the one fan-out of a record to
metrics.jsonl, TensorBoard and W&B (a fake ``wandb`` module); the start-up error when W&B is configured but
missing; the GPU profile's sampler against a fake NVML; the report plot; the git state of run_info.json. (The
launcher tests check run_info.json and the TensorBoard files of real runs with ``check_run_directory``.)"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import platform
import socket
import subprocess
import sys
import time
import types
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import pipellm
from conftest import REPO
from pipellm.config import TrainConfig, load_config, validate_environment
from pipellm.training.distributed import config_hash, data_fingerprint
from pipellm.errors import PipellmError
from pipellm.observe.gpu_profile import COLUMNS, start_gpu_profile
from pipellm.observe.metrics import MetricsLog, ModelFlops, StepFigures, attention_pairs, flops_per_token
from pipellm.report import curves, main as report_main
from pipellm.observe.run_info import git_state
from pipellm.observe.sinks import open_sinks, scalars

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_step_record_follows_the_documented_formulas():
    # MFU = (6 (N - N_embedding) T + 12 L d sum(n^2)) / s / GPUs / peak over the real tokens T in samples of
    # lengths n; mfu_all_positions = all positions x (6 (N - N_embedding) + 12 L d S) / s / GPUs / peak.
    layers, hidden, seq, params, embedding = 2, 8, 16, 1000, 200
    hf_config = types.SimpleNamespace(num_hidden_layers=layers, hidden_size=hidden)
    assert flops_per_token(hf_config, params, embedding, seq) == 6 * (params - embedding) + 12 * layers * hidden * seq
    flops = ModelFlops.of(hf_config, params, embedding)
    # Two padded rows (real lengths 10 and 4) and one packed row (samples 5, 3 and 6, then 2 pads); S = 16.
    position_ids = torch.tensor([list(range(16)), list(range(16)),
                                 list(range(5)) + list(range(3)) + list(range(8))])
    lengths = torch.tensor([10, 4, 14])
    tokens, pairs = int(lengths.sum()), attention_pairs(position_ids, lengths)
    assert (tokens, pairs) == (28, 10**2 + 4**2 + 5**2 + 3**2 + 6**2)
    global_batch, world, seconds = 3, 2, 0.5
    useful = 6 * 800 * 28 + 12 * 2 * 8 * 186  # by hand: 134,400 + 35,712
    peak = useful / seconds / world / 0.5  # so that MFU is exactly 50%
    figures = StepFigures(global_batch, seq, world, flops, peak)
    record = figures.record(step=3, epoch=1, loss=2.5, lr=1e-3, grad_norm=0.75, tokens=tokens, pairs=pairs,
                            seconds=seconds, elapsed=7.25, peak_mem_gib_per_stage=[1.5, 2.0])
    all_positions = 3 * 16 * (6 * 800 + 12 * 2 * 8 * 16)  # padding counted as work
    assert record == {"step": 3, "epoch": 1, "loss": 2.5, "lr": 1e-3, "grad_norm": 0.75, "tokens": 28,
                      "tokens_per_sec": 56.0, "tokens_per_sec_per_gpu": 28.0, "samples_per_sec": 6.0, "mfu": 0.5,
                      "mfu_all_positions": pytest.approx(all_positions / seconds / world / peak),
                      "peak_mem_gib_per_stage": [1.5, 2.0], "step_time_s": 0.5, "elapsed_s": 7.25}
    assert record["mfu_all_positions"] > 1.8 * record["mfu"]  # 38% fill: pads no longer count as work
    # Full unpacked rows: both figures are the classic tokens/s/GPU x flops_per_token / peak.
    full = figures.record(step=1, epoch=0, loss=3.0, lr=0.0, grad_norm=None, tokens=48, pairs=3 * 16**2,
                          seconds=seconds, elapsed=0.5, peak_mem_gib_per_stage=[1.0])
    classic = 48 / seconds / world * flops_per_token(hf_config, params, embedding, seq) / peak
    assert full["mfu"] == pytest.approx(classic) and full["mfu_all_positions"] == pytest.approx(classic)
    unknown = StepFigures(global_batch, seq, world, flops, None).record(
        step=1, epoch=0, loss=3.0, lr=0.0, grad_norm=None, tokens=tokens, pairs=pairs, seconds=seconds,
        elapsed=0.5, peak_mem_gib_per_stage=[1.0])
    assert unknown["mfu"] is None and unknown["mfu_all_positions"] is None and unknown["grad_norm"] is None


class FakeWandb(types.ModuleType):
    """What pipellm calls of wandb: ``init`` -> a run with ``log`` and ``finish``."""

    def __init__(self):
        super().__init__("wandb")
        self.init_kwargs, self.logged, self.finished = None, [], False

    def init(self, **kwargs):
        self.init_kwargs = kwargs
        return types.SimpleNamespace(log=lambda data, step: self.logged.append((step, data)),
                                     finish=lambda: setattr(self, "finished", True))


def test_a_record_fans_out_to_metrics_jsonl_tensorboard_and_wandb(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = TrainConfig(model_path="m", save_path=str(tmp_path), data_path="d.jsonl", wandb_project="proj",
                      wandb_run_name="run-1")
    first = {"step": 1, "epoch": 0, "loss": 3.25, "lr": 1e-4, "grad_norm": None, "tokens": 120,
             "tokens_per_sec": 240.0, "tokens_per_sec_per_gpu": 120.0, "samples_per_sec": 16.0, "mfu": None,
             "peak_mem_gib_per_stage": [1.25, 0.5], "step_time_s": 0.5, "elapsed_s": 0.5}
    second = {**first, "step": 3, "epoch": 1, "loss": 2.125, "grad_norm": 0.375, "mfu": 0.4125, "eval_loss": 2.5}
    log = MetricsLog(tmp_path, total_steps=3, first_step=0, enabled=True, sinks=open_sinks(cfg))
    log.step(first)
    log.step(None)  # a step that is not logged
    log.step(second)
    log.close()

    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [first, second]
    # Every number under its metrics.jsonl name, lists per index, unmeasured (null) values left out.
    assert scalars(first) == {"epoch": 0.0, "loss": 3.25, "lr": 1e-4, "tokens": 120.0, "tokens_per_sec": 240.0,
                              "tokens_per_sec_per_gpu": 120.0, "samples_per_sec": 16.0,
                              "peak_mem_gib_per_stage/0": 1.25, "peak_mem_gib_per_stage/1": 0.5,
                              "step_time_s": 0.5, "elapsed_s": 0.5}
    assert set(scalars(second)) == set(scalars(first)) | {"grad_norm", "mfu", "eval_loss"}

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    expected = {}
    for record in (first, second):
        for tag, value in scalars(record).items():
            expected.setdefault(tag, []).append((record["step"], float(np.float32(value))))  # stored as float32
    assert set(events.Tags()["scalars"]) == set(expected)
    for tag, points in expected.items():
        assert [(e.step, e.value) for e in events.Scalars(tag)] == points, tag

    assert fake.init_kwargs == {"project": "proj", "name": "run-1", "config": dataclasses.asdict(cfg),
                                "dir": str(tmp_path)}
    assert fake.logged == [(1, scalars(first)), (3, scalars(second))]
    assert fake.finished


def test_observability_keys_are_checked_at_start_up(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "d.jsonl").write_text("")
    base = {"model_path": str(tmp_path / "model"), "save_path": str(tmp_path / "save"),
            "data_path": str(tmp_path / "d.jsonl"), "train_batch_size": 2}

    def load(**keys):
        path = tmp_path / "c.yml"
        path.write_text(yaml.safe_dump({**base, **keys}))
        return load_config(path)

    cfg = load(wandb_project="proj", wandb_run_name="r", use_tensorboard=False, gpu_profile_interval_s=0.5)
    assert (cfg.wandb_project, cfg.wandb_run_name, cfg.use_tensorboard, cfg.gpu_profile_interval_s) == \
        ("proj", "r", False, 0.5)
    with pytest.raises(PipellmError, match="`gpu_profile_interval_s` must be >= 0"):
        load(gpu_profile_interval_s=-1)
    monkeypatch.setitem(sys.modules, "wandb", None)  # not importable, whatever this machine has installed
    with pytest.raises(PipellmError) as error:
        validate_environment(cfg, 1)
    assert str(error.value) == ("`wandb_project` is set but the wandb package is not installed: pip install wandb, "
                                "or remove `wandb_project`")
    validate_environment(load(), 1)  # no project: wandb is not needed


class FakeNvml(types.ModuleType):
    """Two GPUs; GPU 1 cannot report utilisation (as on MIG). Remembers every reading it gave out."""

    class NVMLError(Exception):
        pass

    def __init__(self, fail_init: bool = False):
        super().__init__("pynvml")
        self.fail_init, self.readings, self.shut_down = fail_init, [], False

    def nvmlInit(self):
        if self.fail_init:
            raise self.NVMLError("Driver Not Loaded")

    def nvmlShutdown(self):
        self.shut_down = True

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetUtilizationRates(self, handle):
        if handle == 1:
            raise self.NVMLError("Not Supported")
        return types.SimpleNamespace(gpu=(len(self.readings) * 7) % 101)

    def nvmlDeviceGetMemoryInfo(self, handle):
        used = (len(self.readings) + 1) * 2**28  # quarter GiBs: exact in the CSV's 3 decimals
        self.readings.append((handle, used))
        return types.SimpleNamespace(used=used, total=80 * 2**30)


def _profile(tmp_path, interval_s=0.01, min_samples=3):
    profile = start_gpu_profile(tmp_path, interval_s)
    deadline = time.monotonic() + 10
    while profile.samples < min_samples and time.monotonic() < deadline:
        time.sleep(0.01)
    profile.finish()
    return profile


def test_gpu_profile_samples_every_gpu_into_csv_and_png(tmp_path, monkeypatch, capsys):
    nvml = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.delenv("CROSS_RANK", raising=False)
    profile = _profile(tmp_path)
    assert nvml.shut_down and profile.samples >= 3
    with open(tmp_path / "gpu_profile.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == COLUMNS
    rows = rows[1:]
    assert len(rows) == 2 * profile.samples == len(nvml.readings)
    for index, (row, (gpu, used)) in enumerate(zip(rows, nvml.readings)):
        utilization = "" if gpu == 1 else str((index * 7) % 101)
        assert row[2:] == [str(gpu), utilization, f"{used / 2**30:.3f}", "80.000"]
    elapsed = [float(row[1]) for row in rows[::2]]
    assert elapsed == sorted(elapsed) and elapsed[-1] - elapsed[0] >= 0.01 * (profile.samples - 1) - 1e-3
    assert all(row[:2] == pair[:2] for row, pair in zip(rows[::2], rows[1::2]))  # one time per sample
    assert (tmp_path / "gpu_profile.png").read_bytes().startswith(PNG_MAGIC)
    assert not list(tmp_path.glob(".*tmp*"))
    assert f"GPU profile of 2 GPU(s), {profile.samples} samples" in capsys.readouterr().err
    profile.finish()  # a second call (the exit hook) changes nothing
    assert len(list(tmp_path.iterdir())) == 2


def test_gpu_profile_off_without_nvml_driver_or_local_rank_0(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert start_gpu_profile(tmp_path, 1.0) is None
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(fail_init=True))
    assert start_gpu_profile(tmp_path, 1.0) is None
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml())
    assert start_gpu_profile(tmp_path, 0) is None  # gpu_profile_interval_s: 0
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert start_gpu_profile(tmp_path, 1.0) is None  # one sampler per node
    assert list(tmp_path.iterdir()) == []

    # Node 1 of several names its files; without matplotlib only the CSV, and the log line says why.
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("CROSS_RANK", "1")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    _profile(tmp_path, min_samples=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_profile_node1.csv"]
    assert "no PNG: matplotlib is not installed" in capsys.readouterr().err


def _metrics_file(tmp_path, records) -> Path:
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return tmp_path


def _record(step, loss, mfu=None, **extra):
    return {"step": step, "loss": loss, "lr": step * 1e-4, "tokens_per_sec_per_gpu": 100.0 * step, "mfu": mfu,
            **extra}


def test_report_plots_loss_eval_lr_throughput_and_mfu(tmp_path, capsys):
    records = [_record(1, 4.0), _record(2, 3.0, eval_loss=3.5), _record(3, 2.0), _record(4, 1.5, eval_loss=2.5),
               _record(3, 2.25), _record(4, 1.75, eval_loss=2.75)]  # a resumed run logged steps 3-4 again
    assert curves(records) == {
        "loss": {"loss": ([1, 2, 3, 4], [4.0, 3.0, 2.25, 1.75]), "eval_loss": ([2, 4], [3.5, 2.75])},
        "learning rate": {"lr": ([1, 2, 3, 4], [step * 1e-4 for step in (1, 2, 3, 4)])},
        "tokens/s/GPU": {"tokens_per_sec_per_gpu": ([1, 2, 3, 4], [100.0, 200.0, 300.0, 400.0])}}
    with_mfu = [_record(1, 4.0, mfu=0.25), _record(2, 3.0, mfu=0.5)]
    assert curves(with_mfu)["MFU"] == {"mfu": ([1, 2], [0.25, 0.5])}

    save = _metrics_file(tmp_path / "run", records)
    report_main([str(save)])
    assert (save / "metrics.png").read_bytes().startswith(PNG_MAGIC)
    assert capsys.readouterr().out.strip() == f"pipellm report: 6 records of {save / 'metrics.jsonl'} -> " \
                                              f"{save / 'metrics.png'}"
    out = tmp_path / "elsewhere" / "curves.png"
    report_main([str(_metrics_file(tmp_path / "mfu", with_mfu) / "metrics.jsonl"), "--out", str(out)])
    assert out.read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize("content, message", [
    (None, "does not exist; pass a training save_path"),
    ("", "holds no record yet"),
    ('{"step": 1, "loss": 2.0}\n{"step": 2, "loss"\n', "line 2: not valid JSON"),
    ('{"loss": 2.0}\n', "line 1: not a metrics record"),
])
def test_report_errors_are_one_line(tmp_path, capsys, content, message):
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    with pytest.raises(SystemExit) as exit_:
        report_main([str(tmp_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "metrics.png").exists()


def test_git_state_of_a_checkout_only(tmp_path, monkeypatch):
    def git(*args):
        return subprocess.run(["git", "-C", str(tree), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              check=True, capture_output=True, text=True).stdout.strip()

    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "a.py").write_text("1\n")
    assert git_state(tree) is None  # not a checkout
    git("init", "-q")
    git("add", "sub/a.py")
    git("commit", "-q", "-m", "first")
    commit = git("rev-parse", "HEAD")
    (tree / "untracked.txt").write_text("x")
    assert git_state(tree) == {"commit": commit, "dirty": False}  # untracked files do not count
    (tree / "sub" / "a.py").write_text("2\n")
    assert git_state(tree) == {"commit": commit, "dirty": True}
    assert git_state(tree / "sub") is None  # inside another repository, not the top of one
    monkeypatch.setenv("PATH", str(tmp_path / "no-git-here"))
    assert git_state(tree) is None


def check_run_directory(save: Path, records: list[dict], data_files: list[str], cache_dir: Path) -> dict:
    """What a 2-process launcher run on this machine leaves beside metrics.jsonl; returns run_info.json."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    resolved = (save / "train_config.json").read_text()
    info = json.loads((save / "run_info.json").read_text())
    assert info["config"] == json.loads(resolved) and info["config_hash"] == config_hash(resolved)
    assert info["versions"] == {"python": platform.python_version(), "pipellm": pipellm.__version__,
                                "torch": torch.__version__, "cuda": torch.version.cuda,
                                "deepspeed": metadata.version("deepspeed"),
                                "transformers": metadata.version("transformers")}
    if (REPO / ".git").exists():
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
        assert info["git"]["commit"] == head.stdout.strip() and isinstance(info["git"]["dirty"], bool)
    else:
        assert info["git"] is None
    assert info["world_size"] == 2 and info["hosts"] == [socket.gethostname()]
    assert [(r["rank"], r["local_rank"], r["host"], r["device"]) for r in info["ranks"]] == \
        [(0, 0, socket.gethostname(), "cpu"), (1, 1, socket.gethostname(), "cpu")]
    assert info["data"]["key"] == data_fingerprint(data_files)
    assert info["data"]["cache_dir"] == str(cache_dir.resolve())
    for path, entry in zip(data_files, info["data"]["files"], strict=True):
        meta = json.loads((cache_dir / entry["cache_key"] / "meta.json").read_text())
        assert entry == {"path": str(Path(path).resolve()),
                         "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest(),
                         "cache_key": entry["cache_key"], "records": meta["records"], "samples": meta["samples"],
                         "tokens": meta["tokens"]}

    events = EventAccumulator(str(save / "tensorboard"))
    events.Reload()
    for tag in ("loss", "tokens", f"peak_mem_gib_per_stage/{len(records[0]['peak_mem_gib_per_stage']) - 1}"):
        key, _, index = tag.partition("/")
        assert [(e.step, e.value) for e in events.Scalars(tag)] == \
            [(r["step"], float(np.float32(r[key][int(index)] if index else r[key]))) for r in records], tag
    assert not list(save.glob("gpu_profile*"))  # no NVML on this machine
    return info


def test_a_resumed_run_replaces_the_tensorboard_points_after_its_checkpoint(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pipellm.observe.sinks import TensorBoardSink

    first = TensorBoardSink(tmp_path)
    for step in range(1, 6):  # the first run logs steps 1-5, then dies; its checkpoint is at step 3
        first.write({"step": step, "loss": float(step)})
    first.close()
    resumed = TensorBoardSink(tmp_path, first_step=3)
    for step in (4, 5):
        resumed.write({"step": step, "loss": 10.0 * step})
    resumed.close()

    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0),
                                                                  (5, 50.0)]
