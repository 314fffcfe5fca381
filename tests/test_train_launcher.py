"""Through the real launcher: ``deepspeed --num_gpus 2 train_ds.py --config X`` starts two pipeline stages (two
CPU processes here), the loss falls, checkpoints land where ``pp_to_hg`` finds them, and the exported model
loads in transformers and scores a lower loss on the data than the starting model. The split is ``parts: auto``
(rank 0 measures the layers and every rank trains its choice)."""
from __future__ import annotations

import json
from pathlib import Path

from equivalence import LAUNCHER_DATA as DATA
from equivalence import train_through_launcher
from pipellm.convert.converters import pp_to_hg
from pipellm.quickstart import mean_token_loss
from test_observability import check_run_directory

METRIC_KEYS = {"step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_sec", "tokens_per_sec_per_gpu",
               "samples_per_sec", "mfu", "mfu_all_positions", "peak_mem_gib_per_stage", "step_time_s",
               "elapsed_s"}


def test_two_stage_training_through_launcher(tmp_path, tiny_pp_model):
    hf_init, pp_init = tiny_pp_model
    shm_before = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    save, records = train_through_launcher(tmp_path, pp_init, parts="auto")
    # DeepSpeed's CPU all-reduce buffers (66 MiB per rank) are unlinked once every rank has opened them.
    assert set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) == shm_before
    # 300 samples / 16 = 19 steps per epoch (the last filled up with empty rows: every sample once per epoch) x 2
    assert [r["step"] for r in records] == list(range(1, 39))
    assert all(METRIC_KEYS <= set(r) for r in records)
    assert records[0]["epoch"] == 0 and records[-1]["epoch"] == 1
    assert all(r["grad_norm"] > 0 and r["tokens"] > 0 and len(r["peak_mem_gib_per_stage"]) == 2 for r in records)
    first, last = sum(r["loss"] for r in records[:3]) / 3, sum(r["loss"] for r in records[-3:]) / 3
    assert last < first - 1.0, (first, last)
    info = check_run_directory(save, records, [DATA], tmp_path / "data_cache")
    # The run records the split `auto` chose; in DeepSpeed's layers the final norm and the head are two
    parts = json.loads((save / "train_config.json").read_text())["model_topo"]["parts"]
    assert len(parts) == 2 and min(parts) >= 1 and sum(parts) == 6, parts
    assert info["topology"] == {"axes": ["pipe", "data"], "dims": [2, 1],
                                "stage_layer_boundaries": [0, parts[0], 7]}
    assert [(r["stage"], r["replica"]) for r in info["ranks"]] == [(0, 0), (1, 0)]

    assert (save / "latest").read_text().strip() == "global_step38"
    assert {p.name for p in save.glob("global_step*")} == {"global_step10", "global_step20", "global_step30",
                                                           "global_step38"}
    exported = pp_to_hg(save, tmp_path / "hf_out")
    before = mean_token_loss(hf_init, [DATA], 64)
    after = mean_token_loss(exported, [DATA], 64)
    assert after < before - 1.0, (before, after)
