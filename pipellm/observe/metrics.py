"""Throughput, MFU and memory figures, and where they go: ``metrics.jsonl``, a log line and a progress bar.

MFU (model FLOPs utilisation), the formula used everywhere in pipellm, counts only real (non-pad) tokens as work:

    MFU = (6 * N_active * T + 12 * L * d * sum over samples of n^2) / step time / GPUs / peak FLOP/s of one GPU

T is the step's real tokens (padding left out), n the length of each sample (a packed row holds several; an
unpacked row one, its real tokens), N_active = N - N_embedding (the input embedding is a lookup, no matmul; an
untied head is a matmul and counts; Mixtral also leaves out the experts a token does not pass through), L the
decoder layers, d the hidden size. 6 = forward + backward (2 + 4) FLOPs per parameter per token; 12 * L * d * n
per token is the attention score and value matmuls, forward and backward, over the n keys of its sample (the
usual non-causal count). With full rows of one sample each (n = S) this is the classic
``tokens/s/GPU x (6 N_active + 12 L d S) / peak``. ``mfu_all_positions`` is that classic figure with every
position computed counted (micro batch x S, padding included: what the GPU spends FLOPs on). Activation
recomputation (``use_grad_ckpt``) is not counted as useful work.
"""
from __future__ import annotations

import dataclasses
import json
import math
import resource
import sys
import time
from pathlib import Path

import torch

from pipellm.files import atomic_path

# Dense bf16/fp16 tensor-core peak, FLOP/s, by a substring of the device name.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12, "V100": 125e12}


def peak_flops_of(device_name: str | None) -> float | None:
    """``PEAK_FLOPS`` of a device by its name; None for a device the table lacks."""
    return next((flops for key, flops in PEAK_FLOPS.items() if key in (device_name or "")), None)


def device_peak_flops() -> float | None:
    return peak_flops_of(torch.cuda.get_device_name()) if torch.cuda.is_available() else None


@dataclasses.dataclass(frozen=True)
class ModelFlops:
    """Training FLOPs of a model: ``per_token`` x real tokens + ``per_pair`` x (query, key) pairs within samples."""

    per_token: float
    """6 x N_active: forward + backward of the matmuls with parameters, per token."""
    per_pair: float
    """12 x L x d: attention scores and values, forward + backward, per (query, key) pair."""

    @classmethod
    def of(cls, hf_config, num_params: int, embedding_params: int, frozen_params: int = 0) -> ModelFlops:
        """N_active = N − N_embedding − N_unrouted. N_unrouted is zero for dense models. In a mixture of experts
        (``num_local_experts`` E experts of ``num_experts_per_tok`` k per token, as Mixtral) a token passes
        through k experts, so the E − k others of every layer are left out: N_unrouted = L·(E − k)·3·d·d_ff
        (gate, up and down projections, no biases). ``frozen_params`` (LoRA's base, the embedding and the
        unrouted experts among them) compute no weight gradient: 4 FLOPs per token instead of 6, so per_token is
        6·N_active − 2·N_frozen_active with N_frozen_active = N_frozen − N_embedding − N_unrouted."""
        layers, hidden = hf_config.num_hidden_layers, hf_config.hidden_size
        experts = getattr(hf_config, "num_local_experts", None)
        unrouted = 0
        if experts:
            unrouted = layers * (experts - hf_config.num_experts_per_tok) * 3 * hidden * hf_config.intermediate_size
        frozen_active = max(0, frozen_params - embedding_params - unrouted) if frozen_params else 0
        return cls(6 * (num_params - embedding_params - unrouted) - 2 * frozen_active, 12 * layers * hidden)

    def of_step(self, tokens: int, pairs: int) -> float:
        return self.per_token * tokens + self.per_pair * pairs


def flops_per_token(hf_config, num_params: int, embedding_params: int, seq_len: int) -> float:
    """Training FLOPs per token of full ``seq_len`` rows: 6·N_active + 12·L·d·S (``ModelFlops``)."""
    flops = ModelFlops.of(hf_config, num_params, embedding_params)
    return flops.per_token + flops.per_pair * seq_len


def attention_pairs(position_ids: torch.Tensor, lengths: torch.Tensor) -> int:
    """Sum over the samples of rows ``[rows, S]`` of length² (each real token attends to the n keys of its
    sample): a sample starts where its position id is 0; a row's first ``lengths[r]`` tokens are real."""
    real = torch.arange(position_ids.shape[1]) < lengths[:, None]
    starts = (position_ids == 0) & real
    sample_of_token = torch.cumsum(starts.flatten(), 0)[real.flatten()]
    return int((torch.bincount(sample_of_token).double() ** 2).sum())


def perplexity(loss: float) -> float:
    """exp(mean cross entropy); inf past exp's float range (a loss that high means a diverged run)."""
    return math.exp(loss) if loss < 700 else math.inf


def peak_memory_gib() -> float:
    """Peak device memory of this process (GPU allocator peak; on CPU the process's peak resident set)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


@dataclasses.dataclass(frozen=True)
class StepFigures:
    """What turns a step's time into the figures of a ``metrics.jsonl`` record; fixed for a run."""

    global_batch_size: int
    max_seq_len: int
    world_size: int
    flops: ModelFlops
    peak_flops: float | None

    def record(self, *, step: int, epoch: int, loss: float, lr: float, grad_norm, tokens: int, pairs: int,
               seconds: float, elapsed: float, peak_mem_gib_per_stage: list[float]) -> dict:
        """One step's record; ``tokens`` are the real (non-pad) tokens and ``pairs`` their (query, key) pairs
        within samples (``attention_pairs``): MFU counts them; ``mfu_all_positions`` every position computed."""
        positions = self.global_batch_size * self.max_seq_len
        all_positions = self.flops.of_step(positions, positions * self.max_seq_len)

        def mfu(flops):
            return flops / seconds / self.world_size / self.peak_flops if self.peak_flops else None

        return {
            "step": step, "epoch": epoch, "loss": float(loss), "lr": lr,
            "grad_norm": None if grad_norm is None else float(grad_norm), "tokens": tokens,
            "tokens_per_sec": tokens / seconds, "tokens_per_sec_per_gpu": tokens / seconds / self.world_size,
            "samples_per_sec": self.global_batch_size / seconds,
            "mfu": mfu(self.flops.of_step(tokens, pairs)), "mfu_all_positions": mfu(all_positions),
            "peak_mem_gib_per_stage": peak_mem_gib_per_stage, "step_time_s": seconds, "elapsed_s": elapsed,
        }


def cut_metrics_log(path: Path, step: int) -> None:
    """Drop the records of ``path`` after ``step``: they belong to an interrupted run's lost steps."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines(keepends=True) if json.loads(line)["step"] <= step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(kept))


class MetricsLog:
    """Writes one JSON object per logged step to ``metrics.jsonl``, prints a readable line, drives a bar, and hands
    the record to each of ``sinks`` (``pipellm.observe.sinks``: TensorBoard, W&B): the one place a record fans out.

    A run resumed at ``first_step`` continues the file from there: records after it are cut first."""

    def __init__(self, save_path: str | Path, total_steps: int, first_step: int, enabled: bool, sinks=()):
        self.enabled = enabled
        self.sinks = list(sinks)
        self.file = None
        self.bar = None
        if not enabled:
            return
        from tqdm import tqdm

        path = Path(save_path) / "metrics.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        if first_step:
            cut_metrics_log(path, first_step)
        self.file = open(path, "a", buffering=1)
        # Redirected to a file, a bar redraw per step would flood the log: redraw every 30 s there.
        self.bar = tqdm(total=total_steps, initial=first_step, desc="train", unit="step", dynamic_ncols=True,
                        file=sys.stderr, mininterval=0.1 if sys.stderr.isatty() else 30)

    def step(self, record: dict | None) -> None:
        if not self.enabled:
            return
        self.bar.update(1)
        if record is None:
            return
        self.file.write(json.dumps(record) + "\n")
        for sink in self.sinks:
            sink.write(record)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
        parts = [f"step {record['step']}", f"epoch {record['epoch']}", f"loss {record['loss']:.4f}",
                 f"lr {record['lr']:.3g}", f"grad_norm {record['grad_norm']:.3g}" if record["grad_norm"] is not None
                 else "grad_norm n/a", f"tokens/s {record['tokens_per_sec']:.0f}",
                 f"tokens/s/gpu {record['tokens_per_sec_per_gpu']:.0f}",
                 f"mfu {record['mfu']:.1%}" if record["mfu"] is not None else "mfu n/a",
                 "mem GiB/stage " + "/".join(f"{m:.1f}" for m in record["peak_mem_gib_per_stage"])]
        if record.get("eval_loss") is not None:
            ppl = f" | eval_ppl {record['eval_ppl']:.2f}" if "eval_ppl" in record else ""
            parts.insert(3, f"eval_loss {record['eval_loss']:.4f}{ppl}")
        self.bar.write(" | ".join(parts), file=sys.stderr)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.file.close()
            for sink in self.sinks:
                sink.close()


class StepTimer:
    def __init__(self):
        self.start = time.perf_counter()
        self.last = self.start

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self.last = now - self.last, now
        return elapsed

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start
