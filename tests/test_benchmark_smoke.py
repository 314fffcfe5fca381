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
    assert "| zero3-mb3 | failed |" in markdown and "(mb 4)" in markdown and "MFU = tokens/s/GPU" in markdown
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
