"""The max_seq_len sweep's machinery on CPU (``--smoke``: tiny model, 2 processes; the numbers mean nothing):
every point is its own launch, results are written as CSV, markdown and PNG, and a point that fails is recorded
without stopping the sweep. OOM is told apart from other failures by the log."""
from __future__ import annotations

import csv
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import harness  # noqa: E402


def test_smoke_sweep_writes_table_plot_and_records_failures(tmp_path):
    out = tmp_path / "sweep"
    # zero3-mb3 cannot split the 4 rows per GPU into micro batches of 3: the trainer refuses it (exit 2).
    result = subprocess.run([sys.executable, "benchmarks/sweep.py", "--smoke", "--out", str(out), "--seqs", "32",
                             "--methods", "zero3-mb3,pipeline,zero3-best"], cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    rows = list(csv.DictReader(open(out / "results.csv")))
    points = {r["method"]: r for r in rows if r["role"] == "point"}
    assert set(points) == {"zero3-mb3", "pipeline", "zero3-best"}
    assert points["zero3-mb3"]["status"] == "failed"
    assert "train_micro_batch_size_per_gpu 3" in points["zero3-mb3"]["reason"]
    for method in ("pipeline", "zero3-best"):
        assert points[method]["status"] == "ok", points[method]
        assert float(points[method]["samples_per_sec"]) > 0 and float(points[method]["peak_mem_gib_per_gpu"]) > 0
        assert points[method]["global_batch"] == "8" and points[method]["timed_steps"] == "2"
    assert points["zero3-best"]["micro"] == "4"  # the largest micro batch allowed (4 rows per GPU) fits

    markdown = (out / "results.md").read_text()
    assert "| zero3-mb3 | failed |" in markdown and "(mb 4)" in markdown and "MFU = (6 x (N - N_embedding) x T" in markdown
    assert "## Reading" in markdown
    assert (out / "throughput_memory.png").read_bytes()[:4] == b"\x89PNG"


def test_out_of_memory_is_told_apart_from_other_failures():
    import torch

    with pytest.raises(RuntimeError) as cpu_oom:
        torch.empty(2**60, dtype=torch.uint8)  # the CPU allocator's real message
    cuda_oom = ("[rank0]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                "capacity of 139.72 GiB of which 1.50 GiB is free.")
    for log in (f"[rank1]: RuntimeError: {cpu_oom.value}", cuda_oom):
        assert harness.classify_failure("some start-up line\n" + log + "\nexits with return code = 1")[0] == "OOM"
    assert harness.classify_failure("x\nerror: `max_seq_len` must be >= 1, got 0\n") == \
        ("failed", "error: `max_seq_len` must be >= 1, got 0")
    assert harness.classify_failure("x\n[rank0]: ValueError: bad shape\nlauncher: exits with return code = 1") == \
        ("failed", "[rank0]: ValueError: bad shape")


def test_guard_flags_regressions_and_reports_the_goals(tmp_path, capsys):
    import guard

    fields = ["method", "seq", "role", "status", "samples_per_sec", "mfu", "peak_mem_gib_per_gpu", "reason"]

    def write(name, rows):
        path = tmp_path / name
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fields)
            writer.writeheader()
            for method, seq, status, samples, mfu, memory in rows:
                writer.writerow({"method": method, "seq": seq, "role": "point", "status": status,
                                 "samples_per_sec": samples, "mfu": mfu, "peak_mem_gib_per_gpu": memory,
                                 "reason": "CUDA out of memory" if status == "OOM" else ""})
        return path

    baseline = write("baseline.csv", [("pipeline", 2048, "ok", 11.1, 0.494, 73.0),
                                      ("zero3-best", 2048, "ok", 9.6, 0.424, 101.4),
                                      ("pipeline", 8192, "ok", 2.48, 0.539, 89.1)])
    same = write("same.csv", [("pipeline", 2048, "ok", 11.0, 0.480, 76.0), ("zero3-best", 2048, "ok", 9.6, 0.424,
                                                                            101.4)])
    assert guard.main(["--results", str(same), "--baseline", str(baseline)]) == 0  # within 2 points and 5%
    assert "2 points compared" in capsys.readouterr().out

    worse = write("worse.csv", [("pipeline", 2048, "ok", 10.0, 0.46, 73.0), ("zero3-best", 2048, "ok", 9.6, 0.424,
                                                                             107.0),
                                ("pipeline", 8192, "OOM", "", "", "")])
    assert guard.main(["--results", str(worse), "--baseline", str(baseline)]) == 1
    out = capsys.readouterr().out
    assert "REGRESSION pipeline @ 2048: MFU 46.0% < baseline 49.4%" in out
    assert "REGRESSION zero3-best @ 2048: peak memory 107.0 GiB > baseline 101.4 GiB" in out
    assert "REGRESSION pipeline @ 8192: ran in the baseline, now OOM" in out

    goals = write("goals.csv", [("pipeline", 2048, "ok", 13.0, 0.56, 70.0), ("zero3-best", 2048, "ok", 9.6, 0.424,
                                                                             101.4),
                                ("pipeline", 4096, "ok", 6.0, 0.54, 80.0), ("pipeline-ckpt", 32768, "ok", 0.5,
                                                                             0.5, 120.0)])
    assert dict((name, verdict) for name, verdict, _ in guard.goals(guard.read_points(goals))) == {
        "pipeline MFU >= 55% at 2048": "PASS", "pipeline MFU >= 55% at 4096": "FAIL",
        "pipeline >= 1.3x best ZeRO-3 samples/s at 512, memory <= ZeRO-3's": "NOT MEASURED",
        "pipeline >= 1.3x best ZeRO-3 samples/s at 2048, memory <= ZeRO-3's": "PASS",  # 13.0 / 9.6 = 1.35
        "pipeline >= 1.3x best ZeRO-3 samples/s at 4096, memory <= ZeRO-3's": "NOT MEASURED",
        "a pipeline method trains at max_seq_len >= 32768": "PASS"}
    assert guard.main(["--results", str(goals), "--baseline", str(baseline), "--require-goals"]) == 1


def test_smoke_plan_layouts_compares_uniform_and_auto(tmp_path):
    out = tmp_path / "plans"
    result = subprocess.run([sys.executable, "benchmarks/plan_layouts.py", "--smoke", "--out", str(out)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "plans.csv")))
    assert {(r["stages"], r["layout"]) for r in rows} == {("2", "uniform"), ("2", "auto"), ("4", "uniform"),
                                                          ("4", "auto")}
    for row in rows:
        micro_batches, stages = int(row["micro_batches"]), int(row["stages"])
        assert float(row["bubble"]) == pytest.approx((stages - 1) / (micro_batches + stages - 1), abs=1e-4)
        assert float(row["step_s"]) == pytest.approx((micro_batches + stages - 1) * float(row["slowest_stage_ms"])
                                                     / 1e3, rel=1e-2)
    # auto is the fastest split that fits: never slower than uniform at the same stage count.
    by_key = {(r["stages"], r["layout"]): float(r["slowest_stage_ms"]) for r in rows}
    assert by_key[("4", "auto")] <= by_key[("4", "uniform")] and by_key[("2", "auto")] <= by_key[("2", "uniform")]
    assert "| tiny | 4 | auto |" in (out / "plans.md").read_text()


def test_smoke_packing_speed_compares_packed_and_fixed_rows(tmp_path):
    import packing_speed
    import torch

    packing_speed.main(["--smoke", "--out", str(tmp_path)])
    rows = {r["variant"]: r for r in csv.DictReader(open(tmp_path / "results.csv"))}
    assert rows["fixed"]["status"] == "ok" and float(rows["fixed"]["fill"]) == 1.0
    assert float(rows["fixed"]["vs_fixed"]) == 1.0
    packed = rows["packed-sdpa"]
    assert packed["status"] == "ok" and 0.5 < float(packed["fill"]) < 1.0  # real tokens only: padding not counted
    assert float(packed["real_tokens_per_sec"]) > 0 and float(packed["vs_fixed"]) > 0
    flex_status = "ok" if torch.cuda.is_available() else "skipped"
    assert rows["packed-flex"]["status"] == flex_status
    assert "| packed-sdpa |" in (tmp_path / "results.md").read_text()


def test_smoke_stage_profile_accounts_for_the_wall_time(tmp_path):
    import stage_profile

    stage_profile.main(["--smoke", "--out", str(tmp_path)])
    rows = {r["kind"]: r for r in csv.DictReader(open(tmp_path / "results.csv"))}
    assert {"matmul", "attention", "loss (softmax, cross entropy)", "idle (no kernel running)"} <= set(rows)
    assert float(rows["matmul"]["ms_per_step"]) > 0 and int(rows["matmul"]["kernels_per_step"]) > 0
    # The idle time is the wall time no operator covers: with it, the kinds account for all of the wall time.
    assert float(rows["idle (no kernel running)"]["share_of_wall"]) >= 0
    assert sum(float(r["share_of_wall"]) for r in rows.values()) >= 1 - 1e-9
    assert list(csv.DictReader(open(tmp_path / "kernels.csv")))
    assert "| matmul |" in (tmp_path / "results.md").read_text()


def test_bf16_accumulation_measures_the_buffers_against_the_exact_sum(tmp_path):
    import bf16_accumulation

    bf16_accumulation.main(["--out", str(tmp_path), "--seq", "32", "--micro-batches", "4"])
    rows = {int(r["micro_batches"]): r for r in csv.DictReader(open(tmp_path / "results.csv"))}
    assert sorted(rows) == [1, 2, 4]
    assert float(rows[1]["bf16_relative_error"]) == float(rows[1]["fp32_relative_error"]) == 0  # nothing added yet
    for count in (2, 4):
        # bf16 rounds each running sum to 8 significant bits; fp32 keeps 24, and every addend is bf16-exact in it.
        assert 1e-4 < float(rows[count]["bf16_relative_error"]) < 2 ** -8 * count
        assert float(rows[count]["fp32_relative_error"]) < 2 ** -22 * count
        assert 0 < float(rows[count]["sampling_noise"])
    assert "| 4 |" in (tmp_path / "results.md").read_text()


def test_guard_reports_the_stage_goals(tmp_path, capsys):
    import guard

    levers, packing = tmp_path / "levers.csv", tmp_path / "packing.csv"
    harness.write_rows(levers, ["variant", "status", "mfu"], [
        {"variant": "baseline", "status": "ok", "mfu": 0.60}, {"variant": "micro-4", "status": "ok", "mfu": 0.63},
        {"variant": "eager", "status": "OOM", "mfu": ""}])
    harness.write_rows(packing, ["variant", "status", "fill", "vs_fixed"], [
        {"variant": "fixed", "status": "ok", "fill": 1.0, "vs_fixed": 1.0},
        {"variant": "packed-flex", "status": "ok", "fill": 0.98, "vs_fixed": 0.96}])
    # Equal stages of F = B = W = 1: ZB-H1 leaves one F + B - W = 1 of bubble on 2 stages, 49 / 48 of the compute.
    verdicts = guard.stage_goals([levers], packing, ["1,1,1", "1,1,1"], 16)
    assert [(verdict, figures) for _, verdict, figures in verdicts] == [
        ("PASS", "baseline 60.0%, best micro-4 63.0%"), ("FAIL", "96.0%, fill 98.0%"),
        ("PASS", "1.021x, 49 ms; micro batches held 2 vs 2")]
    # run_pipeline.py rows: the best one-stage run of each sequence length (the 2-stage row does not count).
    runs = tmp_path / "runs" / "pairs.csv"
    runs.parent.mkdir()
    fields = ["seq", "stages", "micro", "layers", "yaml_json", "mfu", "device"]
    harness.write_rows(runs, fields, [dict(zip(fields, values)) for values in (
        (2048, 1, 8, 12, "{}", 0.598, "H100"), (2048, 2, 8, 12, "{}", 0.70, "H100"),
        (4096, 1, 4, 12, "{}", 0.617, "H100"), (4096, 1, 4, 12, '{"speed": 1}', 0.634, "H100"))])
    verdicts = guard.stage_goals([levers], None, None, 16, [runs])
    assert [(name, verdict, figures) for name, verdict, figures in verdicts[:2]] == [
        ("one stage >= 62% MFU (runs/pairs.csv, seq 2048)", "FAIL",
         "best 59.8% of 1 run(s): micro batch 8, 12 layers, YAML {}, H100"),
        ("one stage >= 62% MFU (runs/pairs.csv, seq 4096)", "PASS",
         'best 63.4% of 2 run(s): micro batch 4, 12 layers, YAML {"speed": 1}, H100')]
    assert verdicts[2][0] == f"one stage >= 62% MFU ({tmp_path.name})"  # the levers file, in the common folder
    cpu = tmp_path / "runs" / "cpu.csv"  # a run without an MFU figure measures nothing
    harness.write_rows(cpu, fields, [dict(zip(fields, (64, 1, 8, 2, "{}", "", "cpu")))])
    assert guard.stage_goals([], None, None, 16, [cpu]) == [("one stage >= 62% MFU (runs/cpu.csv)", "NOT MEASURED",
                                                            "")]
    # Without a sweep to compare, only the stage goals; --require-goals fails on the packing goal.
    assert guard.main(["--packing", str(packing)]) == 0
    assert guard.main(["--packing", str(packing), "--require-goals"]) == 1
    assert "FAIL         packed rows" in capsys.readouterr().out
