"""GPU utilisation and memory over a run, like Metaflow's ``@gpu_profile`` card: a CSV and a PNG in ``save_path``.

One sampler per node (the process with local rank 0) reads every GPU of the node through NVML (the ``pynvml``
module of the ``nvidia-ml-py`` package: ``pip install 'pipellm[nvml]'``) every ``gpu_profile_interval_s``
seconds on a background thread, and streams the rows to a temporary file. When training ends, or the process
exits on an error, the file is renamed to ``gpu_profile.csv`` and plotted to ``gpu_profile.png`` (with
matplotlib, ``pipellm[plot]``; without it only the CSV). Node k > 0 writes ``gpu_profile_node<k>.csv``/``.png``.
Without NVML, or without GPUs, nothing is sampled or written.

CSV columns: ``unix_time``, ``elapsed_s`` (since the sampler started), ``gpu`` (NVML index: every GPU of the
node, whatever ``CUDA_VISIBLE_DEVICES`` says), ``utilization_pct`` (NVML's: the share of the last sample period
in which a kernel ran), ``memory_used_gib``, ``memory_total_gib``; a cell is empty where NVML cannot tell.
"""
from __future__ import annotations

import atexit
import csv
import math
import os
import sys
import threading
import time
from pathlib import Path

from pipellm.files import save_figure

COLUMNS = ("unix_time", "elapsed_s", "gpu", "utilization_pct", "memory_used_gib", "memory_total_gib")


class GpuProfile:
    """Samples ``handles`` of the initialised NVML module ``nvml`` until ``finish``."""

    def __init__(self, nvml, handles: list, csv_path: Path, interval_s: float):
        self.nvml, self.handles, self.interval_s = nvml, handles, interval_s
        self.csv_path, self.png_path = csv_path, csv_path.with_suffix(".png")
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_path = csv_path.with_name(f".{csv_path.name}.tmp-{os.getpid()}")
        self.file = open(self.tmp_path, "w", newline="")
        self.writer = csv.writer(self.file)
        self.writer.writerow(COLUMNS)
        self.samples = 0
        self.started = time.monotonic()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="pipellm-gpu-profile", daemon=True)
        self.thread.start()
        atexit.register(self.finish)  # an error exit still leaves the profile up to it

    def _run(self) -> None:
        while True:
            self.sample()
            if self.stop.wait(self.interval_s):
                return

    def _read(self, query):
        try:
            return query()
        except self.nvml.NVMLError:  # e.g. utilisation is not supported on MIG instances
            return None

    def sample(self) -> None:
        now, elapsed = time.time(), time.monotonic() - self.started
        for index, handle in enumerate(self.handles):
            utilization = self._read(lambda: self.nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            memory = self._read(lambda: self.nvml.nvmlDeviceGetMemoryInfo(handle))
            self.writer.writerow([f"{now:.3f}", f"{elapsed:.3f}", index, "" if utilization is None else utilization,
                                  "" if memory is None else f"{memory.used / 2**30:.3f}",
                                  "" if memory is None else f"{memory.total / 2**30:.3f}"])
        self.file.flush()
        self.samples += 1

    def finish(self) -> None:
        """Stop sampling, put the CSV in place and plot it (once; later calls do nothing)."""
        if self.stop.is_set():
            return
        self.stop.set()
        self.thread.join()
        atexit.unregister(self.finish)
        self.file.close()
        self.nvml.nvmlShutdown()
        os.replace(self.tmp_path, self.csv_path)
        note = plot_gpu_profile(self.csv_path, self.png_path)
        print(f"pipellm: GPU profile of {len(self.handles)} GPU(s), {self.samples} samples: {self.csv_path}, "
              f"{note or self.png_path}", file=sys.stderr)


def start_gpu_profile(save_path: str | Path, interval_s: float) -> GpuProfile | None:
    """The node's sampler, started, on the process with local rank 0 when NVML sees GPUs; else None."""
    if not interval_s or int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return None
    try:
        import pynvml
    except ImportError:
        import torch

        if torch.cuda.is_available():
            print("pipellm: no GPU profile: NVML is not installed (pip install 'pipellm[nvml]')", file=sys.stderr)
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:  # no NVIDIA driver
        return None
    handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
    if not handles:
        pynvml.nvmlShutdown()
        return None
    node = int(os.environ.get("CROSS_RANK", "0"))  # the deepspeed launcher's node rank
    name = "gpu_profile.csv" if node == 0 else f"gpu_profile_node{node}.csv"
    return GpuProfile(pynvml, handles, Path(save_path) / name, interval_s)


def plot_gpu_profile(csv_path: Path, png_path: Path) -> str | None:
    """Utilisation and memory of each GPU against time; returns a note instead when matplotlib is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return "no PNG: matplotlib is not installed (pip install 'pipellm[plot]')"

    def number(cell: str) -> float:
        return float(cell) if cell else math.nan  # NaN: a gap in the line

    series: dict[str, dict[str, list[float]]] = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            gpu = series.setdefault(row["gpu"], {key: [] for key in COLUMNS[3:]} | {"minutes": []})
            gpu["minutes"].append(float(row["elapsed_s"]) / 60)
            for key in COLUMNS[3:]:
                gpu[key].append(number(row[key]))
    figure = Figure(figsize=(10, 6.5))
    utilization_axis, memory_axis = figure.subplots(2, 1, sharex=True)
    for index, (gpu, values) in enumerate(series.items()):
        color = f"C{index % 10}"
        utilization_axis.plot(values["minutes"], values["utilization_pct"], color=color, label=f"GPU {gpu}")
        memory_axis.plot(values["minutes"], values["memory_used_gib"], color=color, label=f"GPU {gpu} used")
        memory_axis.plot(values["minutes"], values["memory_total_gib"], color=color, linestyle="--", alpha=0.5,
                         label=f"GPU {gpu} total")
    utilization_axis.set(title="GPU utilisation (%)", ylim=(0, 105))
    memory_axis.set(title="GPU memory (GiB)", xlabel="minutes since start", ylim=(0, None))
    for axis in (utilization_axis, memory_axis):
        axis.grid(alpha=0.3)
        axis.legend(loc="upper left", fontsize="small", ncol=min(len(series), 4))
    figure.tight_layout()
    save_figure(figure, png_path)
    return None
