"""The ``speed`` levers on CPU: the compiled loss equals the eager one, liger's kernels replace exactly the llama-style
kernel attributes, and settings that cannot run fail before training with one line. Liger's kernels, the SDPA
backends and the early batch copy run on CUDA only: ``tests/test_speed_gpu.py``."""
from __future__ import annotations

import pytest
import torch

from pipellm.config.schema import Speed
from pipellm.errors import PipellmError
from pipellm.models import chatglm, kernels, llama
from test_config import assert_fails, write_config


def test_compiled_loss_equals_the_eager_loss_and_gradient():
    from pipellm.pipeline.loss import compiled_cross_entropy, logits_cross_entropy

    torch.manual_seed(0)
    logits = torch.randn(2, 16, 97, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 97, (2, 16))
    targets[0, :5] = -100  # unlabelled tokens count for nothing in both
    compiled = compiled_cross_entropy()(logits, targets)
    (compiled_grad,) = torch.autograd.grad(compiled, logits)
    eager = logits_cross_entropy(logits, targets)
    (eager_grad,) = torch.autograd.grad(eager, logits)
    assert compiled.dtype == eager.dtype == torch.float32 and compiled_grad.dtype == torch.bfloat16
    # The same function: only the order of the fp32 sums and the exp implementation may differ (a few fp32 ulp), so
    # the loss agrees to fp32 rounding and each bf16 gradient element to one bf16 ulp (2^-7 relative) at most.
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=0)
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=2 ** -7, atol=0)


def test_liger_kernel_table_covers_the_modules_that_use_kernels():
    from transformers import LlamaConfig

    from pipellm.quickstart import TINY_LLAMA

    config = LlamaConfig.from_pretrained(TINY_LLAMA)
    decoder = llama.LlamaDecoderLayer(config)
    assert decoder.input_layernorm.norm_kernel is kernels.rms_norm and decoder.mlp.swiglu_kernel is kernels.swiglu
    assert decoder.self_attn.rotary_kernel is kernels.rotary
    keys = set(decoder.state_dict())
    # Two norms, the MLP's SwiGLU, the attention's rotary; the weights are untouched.
    assert kernels.use_liger_kernels(decoder) == 4
    assert decoder.input_layernorm.norm_kernel is kernels.liger_rms_norm
    assert decoder.post_attention_layernorm.norm_kernel is kernels.liger_rms_norm
    assert decoder.mlp.swiglu_kernel is kernels.liger_swiglu
    assert decoder.self_attn.rotary_kernel is kernels.liger_rotary
    assert set(decoder.state_dict()) == keys
    # A family built from llama's modules gets them too (chatglm's norms); one without any gets nothing.
    assert kernels.use_liger_kernels(chatglm.RMSNorm(8, 1e-5)) == 1
    assert kernels.use_liger_kernels(torch.nn.Linear(2, 2)) == 0


SPEED_ERRORS = {
    "liger on CPU": (dict(speed={"liger_kernels": True}), False,
                     ["`speed.liger_kernels` runs Triton kernels on CUDA only"]),
    "liger loss on CPU": (dict(speed={"loss_kernel": "liger"}), False,
                          ["`speed.loss_kernel: liger` runs Triton kernels on CUDA only"]),
    "two loss paths": (dict(speed={"loss_kernel": "compiled"}, loss_chunk_tokens=4), False,
                       ["`speed.loss_kernel: compiled` and `loss_chunk_tokens` are two ways"]),
    "liger loss with dpo": (dict(speed={"loss_kernel": "liger"}, objective="dpo"), True,
                            ["`speed.loss_kernel: liger` serves `objective: token_mean` only"]),
    "compiled loss with dpo": (dict(speed={"loss_kernel": "compiled"}, objective="dpo"), False,
                               ["`speed.loss_kernel: compiled` serves `objective: token_mean` only"]),
    "liger with zb-h1": (dict(speed={"liger_kernels": True}, pipeline_schedule="zb-h1"), True,
                         ["`speed.liger_kernels` with `pipeline_schedule: zb-h1` is not supported"]),
    "sdpa choice": (dict(speed={"sdpa_backend": "fastest"}), False,
                    ["`speed.sdpa_backend` must be one of auto, cudnn, flash, efficient, math"]),
    "misspelt speed key": (dict(speed={"liger": True}), False, ["unknown key `speed.liger`"]),
}


@pytest.mark.parametrize("case", list(SPEED_ERRORS))
def test_speed_settings_that_cannot_run_fail_with_one_line(case, tmp_path, tiny_pp_model, capsys, monkeypatch):
    overrides, on_gpu_with_liger, expected = SPEED_ERRORS[case]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: on_gpu_with_liger)
    monkeypatch.setattr(kernels, "liger_available", lambda: on_gpu_with_liger)
    assert_fails(capsys, monkeypatch, tmp_path, write_config(tmp_path, tiny_pp_model, **overrides), *expected)


def test_the_zero3_baseline_refuses_speed_settings(tmp_path, tiny_pp_model, capsys, monkeypatch):
    from pipellm.training.zero import main as zero_main

    path = write_config(tmp_path, tiny_pp_model, speed={"loss_kernel": "compiled"}, from_scratch=True,
                        model_path=str(tiny_pp_model[0]), model_topo={"process_topology": {"dims": [1, 2]}})
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as exit_info:
        zero_main(["--config", str(path)])
    assert exit_info.value.code == 2
    assert "`speed` is pipeline training's" in capsys.readouterr().err
    assert Speed() == Speed(liger_kernels=False, loss_kernel="torch", sdpa_backend="auto",
                            fewer_host_syncs=False)


def test_fewer_host_syncs_turns_deepspeed_throughput_timer_off_unless_the_yaml_sets_it():
    from pipellm.training.pipeline_engine import without_throughput_timer

    ds_config = {"train_batch_size": 4, "bf16": {"enabled": True}}
    assert without_throughput_timer(ds_config) == {**ds_config, "timers": {"throughput": {"enabled": False}}}
    own = {**ds_config, "timers": {"throughput": {"enabled": True, "synchronized": False}}}
    assert without_throughput_timer(own) == own
    assert "timers" not in ds_config  # the config is not changed in place
    from deepspeed.utils.config import get_timers_config  # what DeepSpeed's engine reads the block with

    assert get_timers_config(without_throughput_timer(ds_config)).enabled is False
    assert get_timers_config(ds_config).enabled and get_timers_config(ds_config).synchronized


def test_the_pipeline_engine_accumulates_bf16_gradients_as_they_arrive_unless_the_yaml_says(
        tmp_path, tiny_pp_model):
    from pipellm.config import load_config
    from pipellm.training.pipeline_engine import pipeline_deepspeed_config

    def ds_config(**overrides) -> dict:
        return pipeline_deepspeed_config(load_config(write_config(tmp_path, tiny_pp_model, **overrides)))

    assert ds_config(bf16={"enabled": True})["bf16"] == {"enabled": True, "immediate_grad_update": True}
    assert ds_config(bf16={"enabled": True, "immediate_grad_update": False})["bf16"]["immediate_grad_update"] is False
    assert "bf16" not in ds_config() and ds_config(fp16={"enabled": True})["fp16"] == {"enabled": True}
    both = ds_config(bf16={"enabled": True}, speed={"fewer_host_syncs": True})
    assert both["bf16"]["immediate_grad_update"] and both["timers"] == {"throughput": {"enabled": False}}
    yaml_config = load_config(write_config(tmp_path, tiny_pp_model, bf16={"enabled": True}))
    pipeline_deepspeed_config(yaml_config)
    assert yaml_config.deepspeed["bf16"] == {"enabled": True}  # the config as loaded is not changed
    with pytest.raises(PipellmError, match="`bf16.immediate_grad_update` must be"):
        ds_config(bf16={"enabled": True, "immediate_grad_update": "yes"})


def test_accumulating_gradients_as_they_arrive_trains_as_deferred_accumulation(tmp_path, tied_pp_model):
    """``train_ds.py`` on 2 stages in bf16, 4 micro batches a step, with pipellm's default
    (``bf16.immediate_grad_update: true``) and DeepSpeed's (``false``): each parameter gets one bf16 gradient per
    micro batch, and adding it into the optimizer's accumulation buffer as it arrives or after the backward gives
    the same sums, so every step's loss and gradient norm are equal; the tied embedding's all-reduce reads what was
    added. ZB-H1's deferred weight pass under the default: ``tests/test_zero_bubble.py``'s bf16 case."""
    from equivalence import spawn_training, two_stage_config

    runs = []
    for bf16 in ({"enabled": True}, {"enabled": True, "immediate_grad_update": False}):
        work = tmp_path / f"immediate{len(bf16)}"
        work.mkdir()
        config = dict(two_stage_config(work, tied_pp_model, "uniform", n_epochs=1, save_steps=0), max_steps=3,
                      save_final=False, use_tensorboard=False, bf16=bf16)
        runs.append([(r["loss"], r["grad_norm"]) for r in spawn_training(config, work / "config.yml")])
    assert len(runs[0]) == 3 and runs[0] == runs[1]


def rotary_tables(family: str):
    """The family's rotary table maker and the formula it replaced (angles, then cos/sin in the graph)."""
    from types import SimpleNamespace

    from transformers import LlamaConfig

    from pipellm.models.chatglm import ChatGLMRotary
    from pipellm.models.llama import RotaryEmbedding

    if family == "llama":
        rotary = RotaryEmbedding(LlamaConfig(hidden_size=64, num_attention_heads=4,
                                             rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                                              "factor": 8.0, "low_freq_factor": 1.0,
                                                              "high_freq_factor": 4.0,
                                                              "original_max_position_embeddings": 64}))

        def formula(position_ids, dtype):
            angles = position_ids[..., None].float() * rotary.inv_freq
            angles = torch.cat((angles, angles), dim=-1)
            return (angles.cos() * rotary.scaling).to(dtype), (angles.sin() * rotary.scaling).to(dtype)
    else:
        rotary = ChatGLMRotary(SimpleNamespace(kv_channels=16, hidden_size=64, num_attention_heads=4, rope_ratio=2.0))

        def formula(position_ids, dtype):
            angles = position_ids[..., None].float() * rotary.inv_freq
            return angles.cos().to(dtype), angles.sin().to(dtype)
    return rotary, formula


@pytest.mark.parametrize("family", ["llama", "chatglm"])
def test_a_compiled_layer_reads_the_rotary_tables_instead_of_recomputing_them(family):
    """cos/sin are computed by one opaque op (``pipellm::rotary_cos_sin``): left in the graph, inductor fuses them
    into the rotary kernel, which evaluates cos and sin again for every head. The tables are the formula's, bit
    for bit, eager and compiled."""
    rotary, formula = rotary_tables(family)
    position_ids = torch.arange(3000).view(2, 1500)  # angles far past 2 pi: fp32 range reduction matters
    for dtype in (torch.float32, torch.bfloat16):
        for got, want in zip(rotary(position_ids, dtype), formula(position_ids, dtype)):
            assert got.dtype == dtype and torch.equal(got, want)

    graphs = []

    def capture(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    compiled = torch.compile(lambda ids: rotary(ids, torch.bfloat16), backend=capture, dynamic=False)
    for got, want in zip(compiled(position_ids), formula(position_ids, torch.bfloat16)):
        assert torch.equal(got, want)
    targets = [str(node.target) for node in graphs[0].graph.nodes if node.op in ("call_function", "call_method")]
    assert "pipellm.rotary_cos_sin.default" in targets
    assert not any(name in target for target in targets for name in ("cos", "sin") if "rotary" not in target)
