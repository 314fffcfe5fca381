"""``profile_steps``: torch.profiler over chosen training steps, each kernel sorted by kind
(``pipellm.observe.step_profile``), on 2 stages through ``train_ds.py``, and the same sorting's table."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from pipellm.observe.step_profile import IDLE, StepProfiler, kind_of


@pytest.mark.parametrize("kernel, kind", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1", "matmul"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN", "matmul"),
    ("aten::mm", "matmul"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>>", "attention"),
    ("fmha_cutlassB_bf16_aligned_64x64_k128_sm80", "attention"),  # attention, though "cutlass" names GEMMs too
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x64x128", "attention"),
    ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "collectives and p2p"),
    ("aten::broadcast_tensors", "other elementwise and reductions"),  # not a collective
    ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", "fused elementwise (compiled)"),
    ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float>", "loss (softmax, cross entropy)"),
    ("Memcpy DtoD (Device -> Device)", "copy, cast, fill"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::AUnaryFunctor>",
     "other elementwise and reductions"),
])
def test_kernels_are_sorted_by_kind(kernel, kind):
    assert kind_of(kernel) == kind


def read_kinds(path) -> dict[str, dict]:
    return {row["kind"]: row for row in csv.DictReader(open(path))}


def test_a_window_past_the_run_is_written_when_the_run_ends(tmp_path):
    profiler, weight = StepProfiler(tmp_path, (2, 9)), torch.randn(64, 64)
    for done in (1, 2, 3):
        with profiler.step(done):
            (weight @ weight).sum()
    assert not (tmp_path / "profile").exists()  # step 9 never came: nothing written yet
    profiler.close()
    profiler.close()  # once only
    kinds = read_kinds(tmp_path / "profile" / "rank0.kinds.csv")
    assert float(kinds["matmul"]["ms_per_step"]) > 0 and IDLE in kinds
    markdown = (tmp_path / "profile" / "rank0.kinds.md").read_text()
    assert "2 step(s) profiled" in markdown and "| `aten::mm` | matmul |" in markdown
    longest = list(csv.DictReader(open(tmp_path / "profile" / "rank0.kernels.csv")))
    mm = next(row for row in longest if row["kernel"] == "aten::mm")
    assert mm["kind"] == "matmul" and float(mm["calls_per_step"]) == 1  # one product in each recorded step
    times = [float(row["ms_per_step"]) for row in longest]
    assert times == sorted(times, reverse=True)


def test_profile_steps_on_two_stages_changes_nothing_and_writes_each_rank(tmp_path, tiny_pp_model):
    from equivalence import spawn_training, two_stage_config

    runs = []
    for window in (None, [2, 3]):
        work = tmp_path / str(window)
        work.mkdir()
        config = dict(two_stage_config(work, tiny_pp_model[1], "uniform", n_epochs=1, save_steps=0), max_steps=4,
                      save_final=False, use_tensorboard=False, profile_steps=window)
        runs.append([(r["loss"], r["grad_norm"]) for r in spawn_training(config, work / "config.yml")])
    assert len(runs[0]) == 4 and runs[0] == runs[1]
    profile = tmp_path / "[2, 3]" / "save" / "profile"
    assert not (tmp_path / "None" / "save" / "profile").exists()
    for rank in (0, 1):
        trace = json.loads((profile / f"rank{rank}.trace.json").read_text())
        assert any(event.get("name") == "aten::mm" for event in trace["traceEvents"])
        kinds = read_kinds(profile / f"rank{rank}.kinds.csv")
        assert float(kinds["matmul"]["ms_per_step"]) > 0
        assert int(kinds["collectives and p2p"]["kernels_per_step"]) > 0  # the stages' sends and receives
        assert "2 step(s) profiled" in (profile / f"rank{rank}.kinds.md").read_text()


def test_ranges_of_user_annotations_on_the_gpu_timeline_are_not_kernels():
    from types import SimpleNamespace

    from pipellm.observe.step_profile import kernel_times

    def event(name, start, end, annotation=False):
        return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end),
                               device_type=torch.autograd.DeviceType.CUDA, is_user_annotation=annotation)

    # The optimizer step's range spans its two kernels and the gap between them.
    events = [event("Optimizer.step#AdamW.step", 10, 40, annotation=True), event("multi_tensor_apply_kernel", 10, 20),
              event("multi_tensor_apply_kernel", 30, 40), event("nvjet_sm90_gemm", 50, 60)]
    kernels, busy = kernel_times(SimpleNamespace(events=lambda: events), on_gpu=True)
    assert [name for name, _ in kernels] == ["multi_tensor_apply_kernel"] * 2 + ["nvjet_sm90_gemm"]
    assert busy == 30  # the gap from 20 to 30 had no kernel running
