"""The ZeRO-3 baseline through the real launcher (two CPU processes): it trains, writes the pipeline's metrics,
and computes the pipeline's objective -- its first-step loss and gradient norm equal ``train_ds.py``'s on the
same Hugging Face weights, data, seed and global batch (fp32)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from distributed import free_port
from equivalence import spawn_training
from pipellm.errors import PipellmError
from test_observability import check_run_directory
from test_train_launcher import DATA, METRIC_KEYS

BASE = {"data_path": DATA, "max_seq_len": 64, "log_steps": 1, "seed": 1, "train_batch_size": 16,
        "train_micro_batch_size_per_gpu": 4,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.01}}, "gradient_clipping": 1.0,
        "eval_ratio": 0.05}


def launch(script: str, config: dict, path) -> list[dict]:
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                             str(free_port()), script, "--config", str(path)], cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [json.loads(line) for line in (Path(config["save_path"]) / "metrics.jsonl").read_text().splitlines()]


def test_zero3_trains_and_matches_the_pipeline_objective(tmp_path, tiny_pp_model):
    hf_dir, pp_dir = tiny_pp_model
    BASE["data_cache_dir"] = str(tmp_path / "data_cache")
    zero_save, pipe_save = tmp_path / "zero", tmp_path / "pipe"
    # Gradient checkpointing recomputes the same forward, so the objective is unchanged; it is exercised here.
    zero = launch("train_ds_zero.py", {**BASE, "model_path": str(hf_dir), "save_path": str(zero_save), "max_steps": 8,
                                       "use_grad_ckpt": True,
                                       "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [1, 2]}}},
                  tmp_path / "zero.yml")
    assert [r["step"] for r in zero] == list(range(1, 9))
    assert all(METRIC_KEYS <= set(r) for r in zero)
    assert 0 < zero[-1]["eval_loss"] < zero[0]["loss"]  # eval_ratio holds out 5%: evaluated at the end
    assert all(r["grad_norm"] > 0 and r["tokens"] > 0 and len(r["peak_mem_gib_per_stage"]) == 1 for r in zero)
    assert sum(r["loss"] for r in zero[-2:]) / 2 < zero[0]["loss"] - 0.5, [r["loss"] for r in zero]
    assert (zero_save / "latest").read_text().strip() == "global_step8"
    assert (zero_save / "global_step8" / "config.json").is_file()
    info = check_run_directory(zero_save, zero, [DATA], tmp_path / "data_cache")
    assert info["topology"] == {"zero_stage": 3, "dims": [1, 2]}
    assert [r["replica"] for r in info["ranks"]] == [0, 1]

    # The pipeline's side is the reference, not under test: two ranks spawned in-process, without the launcher.
    pipe = spawn_training({**BASE, "model_path": str(pp_dir), "save_path": str(pipe_save), "max_steps": 1,
                           "save_final": False,
                           "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]},
                                          "parts": [3, 3]}},
                          tmp_path / "pipe.yml")
    assert zero[0]["tokens"] == pipe[0]["tokens"]
    assert zero[0]["loss"] == pytest.approx(pipe[0]["loss"], rel=1e-6)
    assert zero[0]["grad_norm"] == pytest.approx(pipe[0]["grad_norm"], rel=1e-5)


@pytest.mark.parametrize("change, message", [
    ({"model_path": "PP"}, "export them with `python convert_model.py pp_to_hg`"),
    ({"zero_optimization": {"stage": 2}}, "set it to 3"),
    ({"compile_layers": True}, "`compile_layers` is not supported"),
])
def test_user_errors_name_the_key(tmp_path, tiny_pp_model, monkeypatch, change, message):
    # Pipeline dims ([2, 1]) are no error any more: the baseline ignores them (tests/test_reliability.py).
    from pipellm.training.zero import prepare

    hf_dir, pp_dir = tiny_pp_model
    config = {**BASE, "model_path": str(hf_dir), "save_path": str(tmp_path / "save"),
              "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [1, 2]}}, **change}
    if config["model_path"] == "PP":
        config["model_path"] = str(pp_dir)
    (tmp_path / "c.yml").write_text(yaml.safe_dump(config))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(PipellmError, match=message.replace("[", r"\[").replace("(", r"\(")):
        prepare(["--config", str(tmp_path / "c.yml")])


def test_packed_rows_attend_within_each_sample(tiny_pp_model):
    """ZeRO-3 hands the data layer's packed rows to the transformers model as they are: no attention mask and
    position ids restarting at 0 per sample, which transformers turns into a block-diagonal causal mask. Each
    sample's logits must then be those it has alone (as the pipeline's attention guarantees). transformers does
this only without a KV cache, which is why the ZeRO loop passes ``use_cache=False``."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_pp_model[0], dtype=torch.float32, attn_implementation="sdpa")
    generator = torch.Generator().manual_seed(0)
    first, second = (torch.randint(4, 1000, (1, n), generator=generator) for n in (11, 7))
    packed = torch.cat([first, second], dim=1)
    positions = torch.cat([torch.arange(11), torch.arange(7)])[None]
    with torch.no_grad():
        together = model(input_ids=packed, position_ids=positions, use_cache=False).logits
        alone = [model(input_ids=ids, use_cache=False).logits for ids in (first, second)]
    torch.testing.assert_close(together, torch.cat(alone, dim=1), rtol=1e-5, atol=1e-5)
