"""Bad configs and paths fail before any process group work: one line naming the key and the fix, exit code 2,
and nothing written to save_path."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from conftest import REPO
from pipellm.config import load_config
from pipellm.errors import PipellmError
from pipellm.training.train import main

DATA = str(REPO / "pipellm" / "assets" / "data" / "sample.jsonl")


def write_config(tmp_path, tiny_pp_model, **overrides):
    config = {"model_path": str(tiny_pp_model[1]), "save_path": str(tmp_path / "save"), "data_path": DATA,
              "max_seq_len": 32, "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]},
                                                "parts": [3, 3]},
              "train_batch_size": 4, "train_micro_batch_size_per_gpu": 2}
    config.update(overrides)
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def assert_fails(capsys, monkeypatch, tmp_path, config_path, *expected, world_size=2):
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(config_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for text in expected:
        assert text in err, err
    assert not (tmp_path / "save").exists()


BAD = {
    "misspelt key": (dict(max_seq_length=32), ["unknown key `max_seq_length`", "did you mean `max_seq_len`"]),
    "misspelt nested key": (dict(model_topo={"part": [3, 3]}), ["`model_topo.part`", "`parts`"]),
    "wrong type": (dict(max_seq_len="long"), ["`max_seq_len` must be int"]),
    "parts sum": (dict(model_topo={"process_topology": {"dims": [2, 1]}, "parts": [3, 4]}),
                  ["sums to 7", "6 pipeline layers", "config.yml: `model_topo.parts` [3, 4]"]),
    "parts length": (dict(model_topo={"process_topology": {"dims": [2, 1]}, "parts": [2, 2, 2]}),
                     ["3 entries", "2 stages"]),
    "batch does not divide": (dict(train_batch_size=5), ["`train_batch_size` 5 is not divisible"]),
    "batch sizes disagree": (dict(train_batch_size=8, gradient_accumulation_steps=3),
                             ["!= train_micro_batch_size_per_gpu 2 x gradient_accumulation_steps 3"]),
    "missing data": (dict(data_path="/nonexistent/data.jsonl"), ["/nonexistent/data.jsonl does not exist"]),
    "missing model": (dict(model_path="/nonexistent/model"), ["/nonexistent/model", "hg_to_pp"]),
    "unknown optimizer key at top": (dict(optimiser={"type": "AdamW"}), ["did you mean `optimizer`"]),
    "template": (dict(template="alpaca"), ["`template` must be one of auto, builtin, chat"]),
    "overlong": (dict(overlong="cut"), ["`overlong` must be one of truncate, drop"]),
    "weights count": (dict(data_weights=[1, 2]), ["`data_weights` has 2 entries but `data_path` has 1"]),
    "weights sign": (dict(data_weights=[0]), ["`data_weights` must be > 0"]),
    "eval ratio": (dict(eval_ratio=1.5), ["`eval_ratio` must be in [0, 1)"]),
    "eval twice": (dict(eval_ratio=0.1, eval_data_path=DATA), ["`eval_data_path` or `eval_ratio`, not both"]),
    "missing eval data": (dict(eval_data_path="/nonexistent/eval.jsonl"),
                          ["`eval_data_path` file /nonexistent/eval.jsonl does not exist"]),
    "objective name": (dict(objective="toke_mean"), ["`objective` 'toke_mean' is not one of token_mean, dpo, "
                                                     "reward and not `module:attribute`; did you mean `token_mean`?"]),
    "data_types not a mapping": (dict(data_types="fp32"), ["`data_types` must be a mapping like "
                                                           "{grad_accum_dtype: fp32}, got 'fp32'"]),
    "loss chunk": (dict(loss_chunk_tokens=0), ["`loss_chunk_tokens` must be >= 1 (or null: no chunking), got 0"]),
    "profile window": (dict(profile_steps=[3, 2]), ["`profile_steps` must be [first, last] with 1 <= first <= last "
                                                     "(1-based training steps), got [3, 2]"]),
    "zero stage": (dict(zero_optimization={"stage": "one"}), ["`zero_optimization.stage` must be one of 0, 1, 2, 3"]),
    "parts choice": (dict(model_topo={"parts": "even"}), ["`model_topo.parts` must be a list of layer counts, `uniform`"]),
    "optimizer lr range": (dict(optimizer={"type": "AdamW", "params": {"lr": -1e-3}}),
                           ["`optimizer.params.lr` must be > 0, got -0.001"]),
    "optimizer lr type": (dict(optimizer={"type": "AdamW", "params": {"lr": "abc"}}),
                          ["`optimizer.params.lr` must be a number, got 'abc'"]),
    "optimizer misspelt": (dict(optimizer={"type": "AdamW", "params": {"lrr": 1e-3}}),
                           ["unknown key `optimizer.params.lrr` for AdamW; did you mean `lr`?"]),
    "scheduler misspelt": (dict(scheduler={"type": "WarmupLR", "params": {"warmup_num_step": 3}}),
                           ["unknown key `scheduler.params.warmup_num_step` for WarmupLR; did you mean "
                            "`warmup_num_steps`?"]),
    "scheduler type": (dict(scheduler={"type": "Cosine"}), ["`scheduler.type` 'Cosine' is not a DeepSpeed or torch"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_config_fails_with_one_line(case, tmp_path, tiny_pp_model, capsys, monkeypatch):
    overrides, expected = BAD[case]
    assert_fails(capsys, monkeypatch, tmp_path, write_config(tmp_path, tiny_pp_model, **overrides), *expected)


def test_bad_record_stops_before_training(tmp_path, tiny_pp_model, capsys, monkeypatch):
    data = tmp_path / "data.jsonl"
    data.write_text('{"type": "pretrain", "text": "one two"}\n{"type": "conversation", "rounds": [["ask", "hi"], '
                    '["ans", 7]]}\n')
    config = write_config(tmp_path, tiny_pp_model, data_path=str(data), data_cache_dir=str(tmp_path / "cache"))
    assert_fails(capsys, monkeypatch, tmp_path, config, f"{data} line 2: field \"rounds[1][1]\": must be a string, "
                 "got int", "skip_bad_records: true")


def test_world_size_must_match_dims(tmp_path, tiny_pp_model, capsys, monkeypatch):
    assert_fails(capsys, monkeypatch, tmp_path, write_config(tmp_path, tiny_pp_model), "needs 2 processes",
                 "started 3", world_size=3)


def test_missing_layer_file(tmp_path, tiny_pp_model, capsys, monkeypatch):
    import shutil

    pp = tmp_path / "pp"
    shutil.copytree(tiny_pp_model[1], pp)
    (pp / "layer_03-model_states.pt").unlink()
    assert_fails(capsys, monkeypatch, tmp_path, write_config(tmp_path, (None, pp)), "lacks layer_03-model_states.pt")


def test_bad_yaml_names_the_line(tmp_path, capsys, monkeypatch):
    path = tmp_path / "config.yml"
    path.write_text("model_path: a\nsave_path: [unclosed\n")
    with pytest.raises(PipellmError, match=r"config.yml line \d+: not valid YAML"):
        load_config(path)


def test_batch_sizes_completed_and_old_spelling(tmp_path, tiny_pp_model):
    cfg = load_config(write_config(tmp_path, tiny_pp_model, n_epoches=3, train_batch_size=8))
    assert cfg.n_epochs == 3
    assert (cfg.global_batch_size, cfg.micro_batch_size, cfg.gradient_accumulation_steps) == (8, 2, 4)


def test_cli_exit_code(tmp_path, tiny_pp_model):
    """Through the real entry point in a fresh interpreter, as the launcher runs it."""
    config = write_config(tmp_path, tiny_pp_model, n_epochz=1)
    result = subprocess.run([sys.executable, "train_ds.py", "--config", str(config)], cwd=REPO, capture_output=True,
                            text=True, env={"PATH": "/usr/bin:/bin", "WORLD_SIZE": "2", "RANK": "0"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (f"error: {config}: unknown key `n_epochz`; did you mean "
                                                      f"`n_epochs`?")
    assert not (tmp_path / "save").exists()


@pytest.mark.parametrize("name", ["ds_config_pp.yml", "llama7b_pp8.yml", "llama7b_dpo.yml"])
def test_shipped_configs_are_valid(name):
    cfg = load_config(REPO / "configs" / name)
    assert isinstance(cfg.model_topo.parts, list) and len(cfg.model_topo.parts) == cfg.pipe_degree
    assert cfg.global_batch_size == cfg.micro_batch_size * cfg.gradient_accumulation_steps * cfg.data_degree


@pytest.mark.parametrize("key,value,expected", [
    ("hidden_act", "gelu", 'hidden_act "gelu" is not supported by pipellm\'s llama; supported: "silu"'),
    ("rope_parameters", {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
     'rope_parameters.rope_type "dynamic" is not supported by pipellm\'s llama; supported: "default" or "linear"'),
])
def test_unsupported_model_config_fails_before_the_process_group(key, value, expected, tmp_path, tiny_pp_model,
                                                                  capsys, monkeypatch):
    import json
    import shutil

    pp = tmp_path / "pp"
    shutil.copytree(tiny_pp_model[1], pp)
    config = json.loads((pp / "config.json").read_text())
    (pp / "config.json").write_text(json.dumps({**config, key: value}))
    assert_fails(capsys, monkeypatch, tmp_path, write_config(tmp_path, (None, pp)), f"{pp / 'config.json'}: {expected}")
