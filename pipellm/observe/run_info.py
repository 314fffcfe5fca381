"""The run directory's record of what ran: ``train_config.json`` and ``run_info.json``, written by rank 0 at start.

``run_info.json`` holds the resolved config and its hash, the versions of python, pipellm, torch (and its CUDA),
deepspeed and transformers, the git commit of the pipellm source tree with a dirty flag (tracked files changed)
when pipellm runs from a git checkout, the command line and its directory, the world size, the hosts, the process grid and each
rank's host, coordinates and device, and the data: each file's sha256, tokenized-cache key and counts, the cache
directory and the data key the ranks compared at start-up. Both files are written to a temporary name and renamed.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

import pipellm
from pipellm.config import TrainConfig, dump_resolved
from pipellm.files import write_text_atomically

SOURCE_TREE = Path(pipellm.__file__).resolve().parent.parent


def git_state(tree: Path) -> dict | None:
    """``{"commit", "dirty"}`` when ``tree`` is the top of a git checkout; None when it is not or git is missing."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        # pipellm installed into site-packages may sit inside some other repository: that commit says nothing.
        if Path(git("rev-parse", "--show-toplevel")).resolve() != tree.resolve():
            return None
        return {"commit": git("rev-parse", "HEAD"),
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict:
    return {"python": platform.python_version(), "pipellm": pipellm.__version__, "torch": torch.__version__,
            "cuda": torch.version.cuda, "deepspeed": metadata.version("deepspeed"),
            "transformers": metadata.version("transformers")}


def rank_identity(coordinates: dict) -> dict:
    """This process: rank, host, local rank, its coordinates in the process grid and its device."""
    return {"rank": int(os.environ.get("RANK", "0")), "host": socket.gethostname(),
            "local_rank": int(os.environ.get("LOCAL_RANK", "0")), **coordinates,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}


def data_files(paths: list[str], tokenized_files: list) -> list[dict]:
    """Per data file: where it is, its content hash, its cache entry and what it held."""
    return [{"path": str(Path(path).resolve()), "sha256": tokenized.meta["sha256"],
             "cache_key": tokenized.meta["cache_key"], "records": tokenized.meta["records"],
             "samples": tokenized.meta["samples"], "tokens": tokenized.meta["tokens"]}
            for path, tokenized in zip(paths, tokenized_files)]


def build_run_info(cfg: TrainConfig, data, ranks: list[dict], layout: dict, config_digest: str,
                   data_key: str) -> dict:
    """``data`` is the run's ``TrainingData``; ``ranks`` every rank's ``rank_identity``, in rank order."""
    from pipellm.data.cache import default_cache_dir

    eval_files = data_files(cfg.eval_data_paths, data.eval_store.files) if cfg.eval_data_paths else []
    return {
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv],
        "cwd": os.getcwd(),
        "config_hash": config_digest,
        "config": json.loads(dump_resolved(cfg)),
        "versions": versions(),
        "git": git_state(SOURCE_TREE),
        "world_size": len(ranks),
        "hosts": list(dict.fromkeys(r["host"] for r in ranks)),
        "topology": layout,
        "ranks": ranks,
        "data": {"key": data_key, "cache_dir": str(Path(cfg.data_cache_dir or default_cache_dir()).resolve()),
                 "files": data_files(cfg.data_paths, data.store.files), "eval_files": eval_files},
    }


def write_run_info(cfg: TrainConfig, data, *, layout: dict, coordinates: dict, config_digest: str,
                   data_key: str) -> None:
    """Every rank calls this (it gathers each rank's identity); rank 0 writes ``train_config.json`` and
    ``run_info.json`` into ``save_path``. ``layout`` describes the process grid, ``coordinates`` this rank in it."""
    import deepspeed.comm as dist

    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, rank_identity(coordinates))
    if dist.get_rank() != 0:
        return
    save_path = Path(cfg.save_path)
    write_text_atomically(save_path / "train_config.json", dump_resolved(cfg))
    info = build_run_info(cfg, data, ranks, layout, config_digest, data_key)
    write_text_atomically(save_path / "run_info.json", json.dumps(info, indent=2) + "\n")
