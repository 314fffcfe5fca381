"""What every pipellm benchmark shares: a synthetic llama-shaped model and data, one training launch, its figures.

* ``write_model`` -- a random-init llama ``config.json`` of a preset shape plus the embedded tokenizer (no
  download); both trainers start from it with ``from_scratch: true``.
* ``write_data`` -- pretrain records long enough to fill every row (no padding, so every token is real work);
  ``write_sft_data`` -- variable-length records for packed rows.
* ``Point`` -- one measurement: which trainer (``train_ds.py`` pipeline or ``train_ds_zero.py`` ZeRO-3), sequence
  length, batch sizes and switches; ``Point.config`` is its training YAML.
* ``llama_config``, ``add_stage_arguments``, ``stage_layers``, ``on_device``, ``forward_backward``, ``sync`` -- one
  pipeline stage holding a whole preset-shaped model, built from pipellm's own stage modules as training builds them, run without
  DeepSpeed's engine (the benchmarks that time or profile the stage's own work).
* ``launch`` -- runs one point through the deepspeed launcher in its own process group (a hung or timed-out point
  is killed whole), logs to a file, and returns an ``Outcome``: the figures (median over the steps after the
  warm-up ones) or why it failed, OOM told apart from other failures by the exit status and the log.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import platform
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MFU_FORMULA = ("MFU = (6 x (N - N_embedding) x T + 12 x L x d x sum of n^2 over samples) / step time / GPUs / peak "
               "FLOP/s per GPU (N parameters, L layers, d hidden size, T real (non-pad) tokens, n each sample's "
               "length; with full rows of one sample: tokens/s/GPU x (6 (N - N_embedding) + 12 L d S) / peak; "
               "recomputation not counted; the step time includes pipeline bubbles)")

# name: (hidden, intermediate, layers, heads, kv_heads, vocab)
PRESETS = {
    "tiny": (64, 172, 4, 4, 2, 1017),
    "1b": (2048, 5632, 22, 32, 4, 32000),
    "7b": (4096, 11008, 32, 32, 32, 32000),
    "7b-16": (4096, 11008, 16, 32, 32, 32000),  # llama-7B's shape, half its layers: one stage of a 2-stage 7B
    "13b": (5120, 13824, 40, 40, 40, 32000),
    "13b-20": (5120, 13824, 20, 40, 40, 32000),  # llama-13B's shape, half its layers (about a 2-stage 13B's stage)
}
WORDS = ("the of and to in is was for on are with as by at from this that have not but what all were when we "
         "there can an your which their said if will each about how up out them then she many some so these "
         "would other into has more her two like him see time could no make than first been its who now people "
         "my made over did down only way find use may water long little very after words called just where most "
         "know get through back much go good new write our me man too any day same right look think also around "
         "another came come work three word must because does part even place well such here take why things "
         "help put years different away again off went old number great tell men say small every found still "
         "between name should home big give air line set own under read last never us left end along while").split()
TRAINERS = {"pipeline": "train_ds.py", "zero3": "train_ds_zero.py"}
# What the CUDA caching allocator, NCCL and the CPU allocator say when memory runs out.
OOM_PATTERN = re.compile(r"out of memory|OutOfMemoryError|can't allocate memory|CUBLAS_STATUS_ALLOC_FAILED",
                         re.IGNORECASE)
# The last line of a Python traceback, as torch's launcher prefixes it.
EXCEPTION_LINE = re.compile(r"^(\[rank\d+\]:\s*)?[\w.]+(Error|Exception): ")


def write_model(work: Path, preset: str, layers: int | None = None) -> Path:
    """A Hugging Face model directory without weights: llama ``config.json`` of the preset shape + tokenizer;
    ``layers`` overrides the preset's decoder layers (``--preset 7b --layers 16``: one stage of a 2-stage 7B)."""
    from transformers import LlamaConfig

    from pipellm.quickstart import TINY_LLAMA
    from pipellm.data.tokenizer import load_tokenizer

    hidden, intermediate, preset_layers, heads, kv_heads, vocab = PRESETS[preset]
    layers = layers or preset_layers
    model_dir = work / "model"
    LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                max_position_embeddings=32768, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                pad_token_id=3).save_pretrained(model_dir)
    load_tokenizer(TINY_LLAMA).save_pretrained(model_dir)
    return model_dir


def llama_config(preset: str, layers: int | None, seq: int):
    """transformers' ``LlamaConfig`` of a preset's shape (``layers``: the preset's when None), untied head."""
    from transformers import LlamaConfig

    hidden, intermediate, preset_layers, heads, kv_heads, vocab = PRESETS[preset]
    return LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers or preset_layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                       max_position_embeddings=max(seq, 64), tie_word_embeddings=False)


def add_stage_arguments(parser, preset: str) -> None:
    """The stage-alone benchmarks' shape flags: ``--preset`` (default ``preset``), ``--layers``, ``--seq``,
    ``--micro`` and ``--micro-batches`` (per round: one step's forward + backward)."""
    parser.add_argument("--preset", choices=PRESETS, default=preset)
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the preset's)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro", type=int, default=2, help="rows per micro batch")
    parser.add_argument("--micro-batches", type=int, default=4, help="micro batches per round")


def stage_layers(hf_config, attention, device, dtype, *, grad_ckpt: bool = False, compiled: bool = True) -> list:
    """The whole model as one stage's modules (embedding, decoders, final norm, head and loss), random weights
    (std 0.02), in ``dtype`` on ``device``, in training mode; ``compiled``: the decoders compiled as training
    compiles them."""
    from pipellm.models import get_family
    from pipellm.pipeline.stages import init_weights, layer_specs

    specs = layer_specs(get_family("llama"), hf_config, use_grad_ckpt=grad_ckpt, attention=attention,
                        compile_layers=compiled)
    with device:
        layers = [spec.build() for spec in specs]
    for layer in layers:
        init_weights(layer, 0.02)
        layer.to(dtype).train()
    return layers


def on_device(batches: list, device) -> list:
    """Micro batches (``pipellm.data.batches.micro_batches`` layout) with every tensor on ``device``."""
    return [(tuple(t.to(device) for t in inputs), (targets.to(device), scale.to(device)))
            for inputs, (targets, scale) in batches]


def sync(device) -> None:
    """Wait for ``device``'s queued kernels (a no-op on CPU), so a host clock times their work."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_backward(layers: list, batches: list) -> None:
    """Forward and backward of each micro batch (``pipellm.data.batches.micro_batches`` layout, on the layers'
    device) through the stage's layers, the loss on the last; gradients accumulate, no optimizer step."""
    from pipellm.pipeline.loss import token_mean_loss

    for inputs, labels in batches:
        hidden = inputs
        for layer in layers[:-1]:
            hidden = layer(hidden)
        token_mean_loss(layers[-1](hidden), labels).backward()


def write_data(path: Path, samples: int, seq: int) -> Path:
    """``samples`` pretrain records of ``seq`` words each (at least ``seq`` tokens: every row is full)."""
    rng = random.Random(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for _ in range(samples):
            f.write(json.dumps({"type": "pretrain", "text": " ".join(rng.choices(WORDS, k=seq))}) + "\n")
    return path


def write_sft_data(path: Path, rows: int, seq: int) -> Path:
    """Variable-length records for packed rows (``packing: true``): seeded lengths of seq/16 .. seq/3 words (each
    word at least one token), enough of them to fill at least ``rows`` packed rows."""
    rng = random.Random(0)
    low, high = max(seq // 16, 1), max(seq // 3, 2)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for _ in range(2 * rows * seq // ((low + high) // 2) + 1):
            f.write(json.dumps({"type": "pretrain", "text": " ".join(rng.choices(WORDS, k=rng.randint(low, high)))})
                    + "\n")
    return path


@dataclasses.dataclass
class Point:
    """One measurement. ``replicas`` is the pipeline's data-parallel degree (stages = gpus / replicas); ZeRO-3
    is data parallel over all ``gpus``. ``eager`` turns the pipeline's per-layer ``torch.compile`` off."""

    trainer: str
    seq: int
    global_batch: int
    micro: int
    gpus: int
    steps: int
    replicas: int = 1
    parts: str = "parameters"
    flash: bool = False
    grad_ckpt: bool = False
    eager: bool = False
    dtype: str = "bf16"
    loss_chunk_tokens: int | None = None
    extra: dict = dataclasses.field(default_factory=dict)
    """More YAML keys (``lora``, ``objective`` ...), set over the point's own."""

    def config(self, model_dir: Path, data: Path, save: Path) -> dict:
        if self.trainer == "pipeline":
            dims = [self.gpus // self.replicas, self.replicas]
            parts = self.parts if self.parts in ("uniform", "parameters", "auto") else \
                [int(p) for p in self.parts.split(",")]
        else:
            dims, parts = [1, self.gpus], "uniform"
        config = {
            "model_path": str(model_dir), "save_path": str(save), "data_path": str(data),
            "max_seq_len": self.seq, "max_steps": self.steps, "from_scratch": True, "log_steps": 1,
            "save_final": False, "use_flash_attn": self.flash, "use_grad_ckpt": self.grad_ckpt,
            "data_cache_dir": str(data.parent / "data_cache"),
            "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": dims}, "parts": parts},
            "train_batch_size": self.global_batch, "train_micro_batch_size_per_gpu": self.micro,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "weight_decay": 0.0}},
            "gradient_clipping": 1.0,
        }
        if self.trainer == "pipeline":
            config["compile_layers"] = False if self.eager else None
            config["loss_chunk_tokens"] = self.loss_chunk_tokens
        else:
            config["zero_optimization"] = zero3_settings(model_dir)
        if self.dtype == "bf16":
            config["bf16"] = {"enabled": True}
        return {**config, **self.extra}


def zero3_settings(model_dir: Path) -> dict:
    """ZeRO-3 buckets scaled to the model as the transformers Trainer's ``auto`` values do (hidden size d:
    reduce bucket d^2, prefetch 0.9 d^2, parameters below 10 d elements stay unpartitioned), overlapped."""
    hidden = json.loads((model_dir / "config.json").read_text())["hidden_size"]
    return {"stage": 3, "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": hidden * hidden,
            "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
            "stage3_param_persistence_threshold": 10 * hidden}


@dataclasses.dataclass
class Outcome:
    status: str
    """``ok``, ``OOM``, ``timeout`` or ``failed``."""
    reason: str
    """Empty when ok; else the log line that says why."""
    log: Path
    figures: dict | None
    """``summarize``'s figures when ok."""


def launch(point: Point, model_dir: Path, data: Path, work: Path, warmup: int, timeout: float | None = None,
           echo: bool = False, launcher: bool = True) -> Outcome:
    """Train ``point`` with the deepspeed launcher (``launcher=False``, one process: the trainer alone, which sets
    up its own one-process group); its config, log and metrics go to ``work``."""
    work.mkdir(parents=True, exist_ok=True)
    save = work / "save"
    config_path = work / "config.yml"
    config_path.write_text(yaml.safe_dump(point.config(model_dir, data, save)))
    trainer = [str(REPO / TRAINERS[point.trainer]), "--config", str(config_path)]
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(point.gpus),
               "--master_port", str(free_port()), *trainer] if launcher else [sys.executable, *trainer]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    log_path = work / "log.txt"
    with open(log_path, "w") as log:
        log.write("+ " + " ".join(command) + "\n")
        log.flush()
        # A session of its own, so that a timed-out point's workers die with it and free their GPUs.
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, errors="replace", start_new_session=True)
        copier = threading.Thread(target=_copy_lines, args=(process.stdout, log, echo), daemon=True)
        copier.start()
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            returncode = None
        copier.join()
    if returncode is None:
        return Outcome("timeout", f"killed after {timeout:.0f}s", log_path, None)
    text = log_path.read_text(errors="replace")
    metrics = save / "metrics.jsonl"
    if returncode != 0 or not metrics.is_file():
        status, reason = classify_failure(text)
        return Outcome(status, reason, log_path, None)
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    if len(records) <= warmup:
        return Outcome("failed", f"{len(records)} steps logged, not more than the {warmup} warm-up steps",
                       log_path, None)
    return Outcome("ok", "", log_path, summarize(records, warmup))


def _copy_lines(stream, log, echo: bool) -> None:
    for line in stream:
        log.write(line)
        if echo:
            sys.stdout.write(line)


def classify_failure(log_text: str) -> tuple[str, str]:
    """``("OOM", line)`` when the log says memory ran out, else ``("failed", the most telling line)``."""
    lines = [line.strip() for line in log_text.splitlines() if line.strip()]
    for line in lines:
        if OOM_PATTERN.search(line):
            return "OOM", line[:300]
    user_errors = [line for line in lines if line.startswith("error: ")]  # pipellm's one-line errors
    if user_errors:
        return "failed", user_errors[0][:300]
    exceptions = [line for line in lines if EXCEPTION_LINE.match(line)]
    return "failed", (exceptions or lines or ["no output"])[-1][:300]


def summarize(records: list[dict], warmup: int) -> dict:
    """Medians over the steps after the first ``warmup`` ones; peak memory is the worst step's worst GPU."""
    timed = records[warmup:]
    mfu = [r["mfu"] for r in timed if r["mfu"] is not None]
    all_positions = [r["mfu_all_positions"] for r in timed if r.get("mfu_all_positions") is not None]
    per_stage = max((r["peak_mem_gib_per_stage"] for r in timed), key=max)
    return {
        "timed_steps": len(timed),
        "samples_per_sec": statistics.median(r["samples_per_sec"] for r in timed),
        "tokens_per_sec_per_gpu": statistics.median(r["tokens_per_sec_per_gpu"] for r in timed),
        "mfu": statistics.median(mfu) if mfu else None,
        "mfu_all_positions": statistics.median(all_positions) if all_positions else None,
        "step_time_s": statistics.median(r["step_time_s"] for r in timed),
        "peak_mem_gib_per_stage": per_stage, "peak_mem_gib_per_gpu": max(per_stage),
        "final_loss": timed[-1]["loss"],
    }


def write_rows(path: Path, fields: list[str], rows: list[dict]) -> None:
    """A results CSV: one line per row, the ``fields`` in order (a field a row lacks is empty)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in fields})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gpu_query(field: str) -> str | None:
    """The first GPU's ``field`` from nvidia-smi (``name``, ``memory.total``: MiB), None without GPUs (this process
    never creates a CUDA context, so it holds no GPU memory while the points run)."""
    try:
        values = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader,nounits"],
                                capture_output=True, text=True, timeout=30).stdout.split("\n")
    except (OSError, subprocess.TimeoutExpired):
        return None
    return values[0].strip() or None


def gpu_name() -> str | None:
    return gpu_query("name")


def environment() -> dict:
    """Machine and versions, recorded next to every result."""
    import deepspeed
    import torch
    import transformers

    return {"device": gpu_name() or "cpu", "host": platform.node(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__}
