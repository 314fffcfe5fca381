"""Where a metrics record goes besides ``metrics.jsonl``, the log line and the bar: TensorBoard and W&B.

``MetricsLog`` (``pipellm.observe.metrics``) hands every record to each sink. A sink logs the record's ``scalars``: each
number under its ``metrics.jsonl`` name, a list's items as ``name/<index>`` (stage i's peak memory is
``peak_mem_gib_per_stage/i``), values that were not measured (``null``) left out, all at the record's ``step``.
Sinks live on the logging rank (rank 0) only.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path


def scalars(record: dict) -> dict[str, float]:
    """The record's numbers, flattened, without ``step`` (the x axis)."""
    flat = {}

    def add(name: str, value) -> None:
        if isinstance(value, (int, float)):  # bool too: logged as 0/1
            flat[name] = float(value)
        elif isinstance(value, list):
            for index, item in enumerate(value):
                add(f"{name}/{index}", item)
        elif isinstance(value, dict):
            for key, item in value.items():
                add(f"{name}/{key}", item)

    for key, value in record.items():
        if key != "step":
            add(key, value)
    return flat


class TensorBoardSink:
    """Event files under ``log_dir`` (``tensorboard --logdir save_path/tensorboard``)."""

    def __init__(self, log_dir: str | Path, first_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        # A resumed run (first_step = the checkpoint's step) re-logs the steps after its checkpoint: purge_step
        # hides the earlier run's events from there on, as metrics.jsonl is cut back.
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=first_step + 1 if first_step else None)

    def write(self, record: dict) -> None:
        for name, value in scalars(record).items():
            self.writer.add_scalar(name, value, record["step"])
        self.writer.flush()  # a run that dies keeps everything it logged

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """One W&B run (``wandb_project``, ``wandb_run_name``) with the resolved config; its files under ``directory``."""

    def __init__(self, project: str, run_name: str | None, config: dict, directory: str | Path):
        import wandb

        self.run = wandb.init(project=project, name=run_name, config=config, dir=str(directory))

    def write(self, record: dict) -> None:
        self.run.log(scalars(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()


def open_sinks(cfg, first_step: int = 0) -> list:
    """The sinks ``cfg`` (a ``TrainConfig``) asks for, for a run whose first step is ``first_step + 1``; call on the
    logging rank only."""
    sinks = []
    if cfg.use_tensorboard:
        sinks.append(TensorBoardSink(Path(cfg.save_path) / "tensorboard", first_step))
    if cfg.wandb_project:
        sinks.append(WandbSink(cfg.wandb_project, cfg.wandb_run_name, dataclasses.asdict(cfg), cfg.save_path))
    return sinks
