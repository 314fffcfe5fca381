"""Checkpoint conversion: Hugging Face <-> pipeline layer files, round trips bit-exact, errors on the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from pipellm.convert.converters import hg_to_pp, layer_file_name, pp_to_hg, resolve_checkpoint_dir
from pipellm.errors import PipellmError
from pipellm.models import FAMILIES

REPO = Path(__file__).resolve().parents[1]
N_LAYERS = 2


def make_model(tmp_path: Path, tied: bool, dtype: torch.dtype = torch.float32, fmt: str = "safetensors"):
    """A tiny random llama saved in ``tmp_path/hf`` in several shards; returns ``(model, dir)``."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, max_position_embeddings=64,
                         tie_word_embeddings=tied)
    model = LlamaForCausalLM(config).to(dtype).eval()
    hf_dir = tmp_path / "hf"
    model.save_pretrained(hf_dir, max_shard_size="20KB")
    (hf_dir / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    if fmt == "bin":  # transformers 5 no longer writes .bin: write it the way older versions did
        for path in hf_dir.glob("model*.safetensors*"):
            path.unlink()
        torch.save(model.state_dict(), hf_dir / "pytorch_model.bin")
    return model, hf_dir


def hf_state(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor stored in a safetensors checkpoint directory, read from the files themselves."""
    state = {}
    for path in sorted(hf_dir.glob("*.safetensors")):
        state.update(load_file(path))
    return state


def assert_same_tensors(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype, key
        assert torch.equal(actual[key], tensor), key


def assert_same_logits(hf_dir: Path, out_dir: Path, dtype: torch.dtype) -> None:
    # Both models are loaded the same way: ``model.to(dtype)`` in memory also casts the rotary buffers,
    # which from_pretrained recomputes in fp32, so an in-memory reference would differ in bf16 for that alone.
    original, converted = (AutoModelForCausalLM.from_pretrained(d, dtype=dtype).eval() for d in (hf_dir, out_dir))
    input_ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(converted(input_ids).logits, original(input_ids).logits)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_is_bit_exact(tmp_path, tied, dtype):
    _, hf_dir = make_model(tmp_path, tied, dtype)
    assert len(list(hf_dir.glob("model-*.safetensors"))) > 1  # the input really is sharded
    hg_to_pp(hf_dir, tmp_path / "pp")
    pp_to_hg(tmp_path / "pp", tmp_path / "out", max_shard_size="30KB")

    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == {p.name for p in shards}
    assert all(p.stat().st_size <= 30_000 + 1_000 for p in shards)  # cap plus the safetensors header
    out_state = hf_state(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in out_state.values())
    assert_same_tensors(out_state, hf_state(hf_dir))
    assert (out / "config.json").is_file() and (out / "tokenizer_config.json").is_file()
    assert not list(tmp_path.glob("*.tmp-*"))
    assert_same_logits(hf_dir, out, dtype)


def test_export_config_names_the_precision_the_weights_were_saved_in(tmp_path):
    """A bf16 training run saves bf16 layer files under the fp32 model's config.json: the export says bfloat16,
    so loaders with dtype="auto" get the weights as stored."""
    _, hf_dir = make_model(tmp_path, tied=False)
    pp = hg_to_pp(hf_dir, tmp_path / "pp")
    for path in pp.glob("layer_*"):
        state = torch.load(path, weights_only=True)
        torch.save({key: tensor.to(torch.bfloat16) for key, tensor in state.items()}, path)
    out = pp_to_hg(pp, tmp_path / "out")
    assert json.loads((hf_dir / "config.json").read_text())["dtype"] == "float32"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(out, dtype="auto").dtype == torch.bfloat16
    # Stored as the config says: the config is copied unchanged.
    same = pp_to_hg(hg_to_pp(out, tmp_path / "pp2"), tmp_path / "out2")
    assert (same / "config.json").read_bytes() == (out / "config.json").read_bytes()


@pytest.mark.parametrize("tied", [False, True])
def test_layer_files(tmp_path, tied):
    model, hf_dir = make_model(tmp_path, tied)
    pp = hg_to_pp(hf_dir, tmp_path / "pp")

    layer_files = sorted(p.name for p in pp.glob("layer_*"))
    n_files = N_LAYERS + (2 if tied else 3)
    assert layer_files == [layer_file_name(i) for i in range(n_files)]
    assert layer_file_name(3) == "layer_03-model_states.pt"
    assert {"config.json", "generation_config.json", "tokenizer_config.json"} <= {p.name for p in pp.iterdir()}

    hf = model.state_dict()
    layers = [torch.load(pp / name, weights_only=True) for name in layer_files]
    assert set(layers[0]) == {"weight"} and torch.equal(layers[0]["weight"], hf["model.embed_tokens.weight"])
    for i in range(N_LAYERS):
        prefix = f"model.layers.{i}."
        expected = {k[len(prefix):]: v for k, v in hf.items() if k.startswith(prefix)}
        assert "self_attn.q_proj.weight" in layers[i + 1]
        assert_same_tensors(layers[i + 1], expected)
    assert_same_tensors(layers[N_LAYERS + 1], {"weight": hf["model.norm.weight"]})
    if not tied:
        assert_same_tensors(layers[N_LAYERS + 2], {"weight": hf["lm_head.weight"]})
    # Each file holds only its own tensors, not a view into a bigger shared storage.
    for layer in layers:
        for tensor in layer.values():
            assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()


@pytest.mark.parametrize("tied", [False, True])
def test_bin_checkpoint(tmp_path, tied):
    model, hf_dir = make_model(tmp_path, tied, fmt="bin")
    hg_to_pp(hf_dir, tmp_path / "pp")
    pp_to_hg(tmp_path / "pp", tmp_path / "out")
    out = tmp_path / "out"
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    # A tied .bin stores lm_head.weight too (it is the embedding); the output, like transformers, does not.
    expected = {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    assert_same_tensors(hf_state(out), expected)
    assert_same_logits(hf_dir, out, torch.float32)


def test_training_save_dir_with_latest(tmp_path):
    model, hf_dir = make_model(tmp_path, tied=False)
    run = tmp_path / "run"
    hg_to_pp(hf_dir, run / "global_step20")
    (run / "global_step20" / "mp_rank_00_model_states.pt").write_bytes(b"not a layer file")
    (run / "latest").write_text("global_step20\n")

    assert resolve_checkpoint_dir(run) == run / "global_step20"
    assert resolve_checkpoint_dir(run / "global_step20") == run / "global_step20"
    pp_to_hg(run, tmp_path / "out")
    assert_same_tensors(hf_state(tmp_path / "out"), hf_state(hf_dir))


def test_refuses_non_empty_save_path_unless_overwrite(tmp_path):
    _, hf_dir = make_model(tmp_path, tied=True)
    target = tmp_path / "pp"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    with pytest.raises(PipellmError, match="--overwrite"):
        hg_to_pp(hf_dir, target)
    assert (target / "keep.txt").is_file()
    hg_to_pp(hf_dir, target, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / layer_file_name(0)).is_file()


def test_unowned_key_is_an_error(tmp_path):
    _, hf_dir = make_model(tmp_path, tied=False, fmt="bin")
    state = torch.load(hf_dir / "pytorch_model.bin", weights_only=True)
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # ignored: derived from config
    state["model.extra.weight"] = torch.ones(4)
    torch.save(state, hf_dir / "pytorch_model.bin")
    with pytest.raises(PipellmError, match=r"model\.extra\.weight") as err:
        hg_to_pp(hf_dir, tmp_path / "pp")
    assert "inv_freq" not in str(err.value)
    assert not (tmp_path / "pp").exists()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "convert_model.py", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def assert_cli_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_cli_missing_input(tmp_path):
    result = run_cli("hg_to_pp", "--input-path", str(tmp_path / "nope"), "--save-path", str(tmp_path / "pp"))
    assert_cli_error(result, str(tmp_path / "nope"))
    assert not (tmp_path / "pp").exists()


def test_cli_unsupported_model_type(tmp_path):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    result = run_cli("hg_to_pp", "--input-path", str(hf_dir), "--save-path", str(tmp_path / "pp"))
    assert_cli_error(result, "'gpt2'", "supported: " + ", ".join(sorted(FAMILIES)))
    assert not (tmp_path / "pp").exists()


def test_cli_missing_layer_file(tmp_path):
    _, hf_dir = make_model(tmp_path, tied=False)
    pp = hg_to_pp(hf_dir, tmp_path / "pp")
    (pp / layer_file_name(2)).unlink()
    result = run_cli("pp_to_hg", "--input-path", str(pp), "--save-path", str(tmp_path / "out"))
    assert_cli_error(result, layer_file_name(2))
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob("out.tmp-*"))


def test_cli_round_trip(tmp_path):
    _, hf_dir = make_model(tmp_path, tied=True)
    for command, src, dst in (("hg_to_pp", hf_dir, tmp_path / "pp"), ("pp_to_hg", tmp_path / "pp", tmp_path / "out")):
        result = run_cli(command, "--input-path", str(src), "--save-path", str(dst))
        assert result.returncode == 0, result.stderr
    assert_same_tensors(hf_state(tmp_path / "out"), hf_state(hf_dir))


# ----- damaged inputs, full or read-only disks, signals: one line, nothing left behind -----

def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize("which", ["single", "shard"])
def test_truncated_safetensors_is_one_line(tmp_path, which):
    _, hf_dir = make_model(tmp_path, tied=False)
    if which == "single":
        state = hf_state(hf_dir)
        for path in hf_dir.glob("model*.safetensors*"):
            path.unlink()
        from safetensors.torch import save_file
        save_file(state, hf_dir / "model.safetensors")
    damaged = sorted(hf_dir.glob("model*.safetensors"))[-1]
    truncate(damaged)
    result = run_cli("hg_to_pp", "--input-path", str(hf_dir), "--save-path", str(tmp_path / "pp"))
    assert_cli_error(result, str(damaged), "truncated or corrupted")
    assert not (tmp_path / "pp").exists() and not list(tmp_path.glob("pp.tmp-*"))


def test_truncated_layer_file_is_one_line(tmp_path):
    _, hf_dir = make_model(tmp_path, tied=False)
    pp = hg_to_pp(hf_dir, tmp_path / "pp")
    truncate(pp / layer_file_name(1))
    result = run_cli("pp_to_hg", "--input-path", str(pp), "--save-path", str(tmp_path / "out"))
    assert_cli_error(result, str(pp / layer_file_name(1)), "truncated or corrupted")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))


class Payload:
    """A pickle that would run code when unpickled without weights_only."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_refused_pickle_says_why_and_how_to_convert(tmp_path):
    model, hf_dir = make_model(tmp_path, tied=False, fmt="bin")
    torch.save({**model.state_dict(), "extra": Payload()}, hf_dir / "pytorch_model.bin")
    result = run_cli("hg_to_pp", "--input-path", str(hf_dir), "--save-path", str(tmp_path / "pp"))
    assert_cli_error(result, str(hf_dir / "pytorch_model.bin"), "refused for safety", "safetensors")
    assert "weights_only" not in result.stderr and "pwned" not in result.stdout + result.stderr


@pytest.mark.parametrize("failure,expected", [
    (OSError(28, "No space left on device"), "no space left on device writing"),
    (RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4736 vs 4624"),
     "no space left on device writing"),
    (OSError(30, "Read-only file system"), "read-only file system: cannot write"),
])
def test_full_or_read_only_disk_is_one_line(tmp_path, monkeypatch, failure, expected):
    import pipellm.convert.converters as converters

    _, hf_dir = make_model(tmp_path, tied=False)
    pp = hg_to_pp(hf_dir, tmp_path / "pp")

    def failing_save(*args, **kwargs):
        raise failure
    monkeypatch.setattr(converters.torch, "save", failing_save)
    with pytest.raises(PipellmError) as error:
        hg_to_pp(hf_dir, tmp_path / "again")
    message = str(error.value)
    assert expected in message and str(tmp_path / "again") in message and "\n" not in message
    if "space" in expected:
        assert "GB (the output needs about" in message and "--save-path" in message
    monkeypatch.setattr(converters, "save_file", failing_save)
    with pytest.raises(PipellmError, match=expected):
        pp_to_hg(pp, tmp_path / "out")
    assert not list(tmp_path.glob("again*")) and not list(tmp_path.glob("out*"))


SLOW_CONVERSION = """
import sys, time
import pipellm.convert.converters as converters
save = converters.torch.save
def slow_save(*args, **kwargs):
    save(*args, **kwargs)
    print("saved a layer", flush=True)
    time.sleep(60)
converters.torch.save = slow_save
converters.main(sys.argv[1:])
"""


def test_sigterm_during_conversion_leaves_nothing(tmp_path):
    import signal

    _, hf_dir = make_model(tmp_path, tied=False)
    process = subprocess.Popen([sys.executable, "-c", SLOW_CONVERSION, "hg_to_pp", "--input-path", str(hf_dir),
                                "--save-path", str(tmp_path / "pp")], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "saved a layer"
    assert list(tmp_path.glob("pp.tmp-*"))  # the conversion is under way
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert stderr.strip().splitlines()[-1] == f"pipellm: stopped by SIGTERM; nothing was written to {tmp_path / 'pp'}"
    assert not list(tmp_path.glob("pp*"))


def test_stale_temporaries_of_killed_conversions_are_removed(tmp_path, capsys):
    from pipellm.files import HOST

    _, hf_dir = make_model(tmp_path, tied=False)
    # A pid no process can have (above the kernel's limit): gone, and never reused while the test runs.
    dead_pid = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    stale = [tmp_path / f"pp.tmp-{HOST}-{dead_pid}", tmp_path / f"pp.tmp-{dead_pid}"]
    alive = [tmp_path / f"pp.tmp-{HOST}-{os.getppid()}", tmp_path / f"pp.tmp-other-host-{dead_pid}"]
    for path in stale + alive:
        path.mkdir()
        (path / layer_file_name(0)).write_bytes(b"half a layer")
    hg_to_pp(hf_dir, tmp_path / "pp")
    assert not any(p.exists() for p in stale) and all(p.exists() for p in alive)
    err = capsys.readouterr().err
    for path in stale:
        assert f"pipellm: removed {path}, left by an interrupted conversion (its process is gone)" in err
