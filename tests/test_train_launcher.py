"""Through the real launcher: ``deepspeed --num_gpus 2 train_ds.py --config X`` starts two pipeline stages (two
CPU processes here), the loss falls, checkpoints land where ``pp_to_hg`` finds them, and the exported model
loads in transformers and scores a lower loss on the data than the starting model."""
from __future__ import annotations

import json
import subprocess
import sys

import yaml

from conftest import REPO
from distributed import free_port
from pipellm.convert import pp_to_hg
from pipellm.quickstart import mean_token_loss

DATA = str(REPO / "pipellm" / "assets" / "data" / "sample.jsonl")
METRIC_KEYS = {"step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_sec", "tokens_per_sec_per_gpu",
               "samples_per_sec", "mfu", "peak_mem_gib_per_stage", "step_time_s", "elapsed_s"}


def test_two_stage_training_through_launcher(tmp_path, tiny_pp_model):
    hf_init, pp_init = tiny_pp_model
    save = tmp_path / "save"
    config = {"model_path": str(pp_init), "save_path": str(save), "data_path": DATA, "max_seq_len": 64,
              "n_epochs": 2, "log_steps": 1, "save_steps": 10, "seed": 1,
              "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}, "parts": [2, 4]},
              "train_batch_size": 16, "train_micro_batch_size_per_gpu": 4,
              "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.01}},
              "gradient_clipping": 1.0}
    config_path = tmp_path / "config.yml"
    config_path.write_text(yaml.safe_dump(config))

    result = subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                             str(free_port()), "train_ds.py", "--config", str(config_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 37))  # 300 samples // 16 = 18 steps x 2 epochs
    assert all(METRIC_KEYS <= set(r) for r in records)
    assert records[0]["epoch"] == 0 and records[-1]["epoch"] == 1
    assert all(r["grad_norm"] > 0 and r["tokens"] > 0 and len(r["peak_mem_gib_per_stage"]) == 2 for r in records)
    first, last = sum(r["loss"] for r in records[:3]) / 3, sum(r["loss"] for r in records[-3:]) / 3
    assert last < first - 1.0, (first, last)

    assert (save / "latest").read_text().strip() == "global_step36"
    assert {p.name for p in save.glob("global_step*")} == {"global_step10", "global_step20", "global_step30",
                                                           "global_step36"}
    exported = pp_to_hg(save, tmp_path / "hf_out")
    before = mean_token_loss(hf_init, [DATA], 64)
    after = mean_token_loss(exported, [DATA], 64)
    assert after < before - 1.0, (before, after)
