"""Training launches the scale-out tests compare with each other: the scale-out config (tiny llama, 2 stages,
4 steps), the deepspeed launcher command, a run's losses; ``launcher_run_2x1`` (a session fixture in conftest):
the one-node launcher run they are all compared with."""
from __future__ import annotations

import json
import subprocess
import sys

import yaml

from conftest import REPO
from distributed import free_port

DATA = str(REPO / "pipellm" / "assets" / "data" / "sample.jsonl")


def write_config(path, pp_model, save, dims, **overrides):
    config = {"model_path": str(pp_model), "save_path": str(save), "data_path": DATA, "max_seq_len": 64,
              "max_steps": 4, "log_steps": 1, "save_final": False, "seed": 3,
              "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": dims}, "parts": [3, 3]},
              "train_batch_size": 8, "train_micro_batch_size_per_gpu": 2,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    config.update(overrides)
    path.write_text(yaml.safe_dump(config))
    return path


def launcher(config, *args, port):
    return [sys.executable, "-m", "deepspeed.launcher.runner", *args, "--master_port", str(port), "train_ds.py",
            "--config", str(config)]


def metrics(save) -> list[dict]:
    return [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]


def losses(save):
    return [record["loss"] for record in metrics(save)]


def run_launcher_2x1(root, pp_model):
    """``deepspeed --num_gpus 2 train_ds.py`` on the scale-out config, 2 stages x 1 replica; its save directory."""
    config = write_config(root / "one.yml", pp_model, root / "one", [2, 1])
    result = subprocess.run(launcher(config, "--num_gpus", "2", port=free_port()), cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "one"
