"""Pairwise objectives in the training loop: the reference model's log-probs, computed once and cached, and the
micro batches that carry them (``PairBatches``).

**The reference pass.** Before the first step, the same pipeline (or ZeRO model) runs forward in eval mode over
every training and eval sample with the reference weights, and the objective records each answer's summed
log-prob (``PairwiseObjective.recording``). The training samples go in the micro batches of epoch 0 (then any
sample epoch 0 does not draw, one per row), the eval samples in the eval batches: at step 0 the policy computes
exactly what the reference did, so with ``reference: initial`` the sigmoid loss is log 2. The ranks that scored a
sample sum it into one array per split (all-reduce over the world), so every rank holds all of them.

**The reference weights.** ``dpo.reference: initial`` is the weights the run starts from (``model_path``); a path
names another pipeline checkpoint (``hg_to_pp`` output or a training save / tag directory). When the stage does
not hold them (a resumed run, another path) its weights are copied to the CPU, the reference's layer files
loaded for the pass, and the copy put back: no second model on the GPU.

**With LoRA** (``lora:``) the reference is the base with the adapters off (the parameter set's ``reference_mode``,
peft's adapter toggle, for the pass): with ``initial`` that is the frozen base the stage holds, so no weights move
(only a resumed run with ``modules_to_save`` reloads the initial weights); a checkpoint path must be a full one (a
LoRA save holds only adapters: export it merged first), loaded under peft's ``base_layer`` names.

**The cache** (``save_path/reference_logps/<key>.npz``, written by rank 0 through a temporary file): the key
hashes the reference weights (each layer file's name, size and modification time; the config and seed for
``from_scratch``), the data (the tokenized files' cache keys, which cover content, tokenizer and template) and
what decides the batches and the arithmetic (batch sizes, data degree, packing, seed, weights, precision,
``loss_chunk_tokens``, compiled layers, the ``speed`` kernels, the attention kernel), so reruns and resumes reuse it
and any change recomputes it. A LoRA run's key also holds "adapters off" and ``quantize_base`` (a 4-bit base
computes other log-probs), not the adapters' rank, scale or targets: they do not change the base.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from pipellm.data import IGNORE_INDEX
from pipellm.data.batches import TrainingData, micro_batches
from pipellm.errors import PipellmError
from pipellm.pipeline.preference import PairLabels
from pipellm.training.parameters import optional_hook

SPLITS = ("train", "eval")


class PairBatches:
    """Micro batches with ``PairLabels``, and the reference log-probs of the train and eval samples."""

    def __init__(self, data: TrainingData, micro_batch_size: int, replica: int, replicas: int,
                 reference: dict[str, np.ndarray] | None = None):
        self.data, self.micro_batch_size = data, micro_batch_size
        self.replica, self.replicas = replica, replicas
        self.reference = reference or {}

    def store(self, split: str):
        return self.data.store if split == "train" else self.data.eval_store

    @staticmethod
    def pairs(rows: list) -> int:
        """Pairs in a global batch's rows."""
        return sum(len(samples) for samples in rows if samples is not None) // 2

    def micro_batches(self, rows: list, split: str, input_ids, labels, position_ids) -> list:
        """This replica's micro batches of the global batch ``rows`` (``pipellm.data.batches.micro_batches``'
        slicing), each with ``PairLabels``."""
        base = micro_batches(input_ids, labels, self.micro_batch_size, self.replica, self.replicas, position_ids)
        accumulation = len(base)
        scale = torch.tensor([accumulation * self.replicas / max(self.pairs(rows), 1)], dtype=torch.float32)
        store, reference = self.store(split), self.reference.get(split)
        lengths = store.lengths
        start = self.replica * (len(rows) // self.replicas)
        out = []
        for k, (inputs, (targets, _)) in enumerate(base):
            slots = torch.full_like(targets, -1)
            ids: list[int] = []
            ends: list[int] = []
            for r, samples in enumerate(rows[start + k * self.micro_batch_size:][:self.micro_batch_size]):
                at = 0
                for sample in [] if samples is None else samples.tolist():
                    length = int(lengths[sample])
                    slots[r, at:at + length] = len(ids)
                    ids.append(sample)
                    at += length
                    ends.append(r * targets.shape[1] + at - 1)
            slots[targets == IGNORE_INDEX] = -1
            values = reference[ids] if reference is not None else np.zeros(len(ids))
            out.append((inputs, PairLabels(targets, scale, slots, torch.tensor(values, dtype=torch.float32),
                                           torch.tensor(ids, dtype=torch.int64),
                                           torch.tensor(ends, dtype=torch.int64),
                                           torch.tensor(store.margins[ids], dtype=torch.float32))))
        return out


def check_no_margins(data: TrainingData) -> None:
    """A record's ``margin`` is a reward model's; an objective with a reference pass (DPO) has no use for it, so it
    is refused rather than ignored."""
    for store in {id(s): s for s in (data.store, data.eval_store) if s is not None}.values():
        for file in store.files:
            if file.meta.get("margins"):
                raise PipellmError(f"{file.path}: {file.meta['margins']} preference records give a `margin`, which "
                                   f"only `objective: reward` uses; remove the key from the records for DPO")


def reference_batches(data: TrainingData, schedule, global_batch_size: int):
    """``(split, rows)`` of the reference pass: epoch 0's batches, then the training samples it left out, then the
    eval batches (see the module docstring)."""
    plan, covered = data.plan, set()
    for index in range(schedule.steps_per_epoch[0]):
        rows = plan.batch(0, index)
        covered.update(s for samples in rows if samples is not None for s in samples.tolist())
        yield "train", rows
    group = 2
    units = np.concatenate(plan.train_ids) if plan.train_ids else np.zeros(0, np.int64)
    rest = [u for u in units.tolist() if u * group not in covered]
    if plan.packing:
        rows = [np.array([u * group, u * group + 1]) for u in rest]
    else:
        rows = [np.array([u * group + k]) for u in rest for k in range(group)]
    for start in range(0, len(rows), global_batch_size):
        chunk = rows[start:start + global_batch_size]
        yield "train", chunk + [None] * (global_batch_size - len(chunk))
    for rows in data.eval_row_batches(global_batch_size):
        yield "eval", rows


def reference_weights_dir(cfg, resumed: bool) -> Path | None:
    """The directory to load the reference weights from for the pass; None: the stage holds them already."""
    reference = cfg.dpo.reference
    if reference == "initial":
        # A LoRA run's frozen base stays the initial weights; only layers trained fully have moved on resume.
        if not resumed or (cfg.lora is not None and not cfg.lora.modules_to_save):
            return None
        if cfg.from_scratch:
            raise PipellmError("`dpo.reference: initial` with `from_scratch`: the resumed run cannot rebuild the "
                               "initial weights and their reference log-probs are not cached in save_path; start "
                               "the run again, or name a checkpoint in `dpo.reference`")
    from pipellm.pipeline.layer_files import resolve_checkpoint_dir

    return resolve_checkpoint_dir(cfg.model_path if reference == "initial" else reference)


def cache_key(cfg, data: TrainingData) -> str:
    """The reference cache's key (see the module docstring)."""
    reference = cfg.model_path if cfg.dpo.reference == "initial" else cfg.dpo.reference
    if cfg.dpo.reference == "initial" and cfg.from_scratch:
        weights = {"from_scratch": cfg.seed, "config": (Path(cfg.model_path) / "config.json").read_text()}
    else:
        from pipellm.pipeline.layer_files import follow_latest

        # A pipeline checkpoint (a save directory: its latest tag) or, for the ZeRO-3 baseline, a Hugging Face one.
        directory = follow_latest(Path(reference)) or Path(reference)
        weights = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(directory.iterdir())
                   if p.is_file()}
    eval_files = data.eval_store.files if data.eval_store is not data.store else []
    parts = {"weights": weights,
             "data": [f.meta["cache_key"] for f in data.store.files],
             "eval_data": [f.meta["cache_key"] for f in eval_files],
             "layout": [cfg.global_batch_size, cfg.micro_batch_size, cfg.data_degree, cfg.packing, cfg.seed,
                        cfg.data_weights, cfg.eval_ratio, cfg.max_seq_len, cfg.loss_chunk_tokens,
                        str(cfg.deepspeed_settings.dtype), cfg.model_topo.process_topology.dims],
             "kernels": [cfg.layers_compiled(torch.cuda.is_available()), cfg.speed, cfg.attention_backend,
                         cfg.use_flash_attn]}
    if cfg.lora is not None:
        parts["lora"] = {"adapters": "off", "quantize_base": cfg.quantize_base}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def prepare_pairs(cfg, data: TrainingData, engine, objective, schedule, resumed: bool) -> PairBatches:
    """The run's ``PairBatches`` with the reference log-probs, from the cache or computed now (all ranks)."""
    import deepspeed.comm as dist

    from pipellm.training.distributed import all_reduce

    if not objective.uses_reference:  # a reward model: nothing to compare with
        return PairBatches(data, cfg.micro_batch_size, engine.replica, engine.replicas)
    check_no_margins(data)
    path = Path(cfg.save_path) / "reference_logps" / f"{cache_key(cfg, data)}.npz"
    cached = all_reduce(torch.tensor([1.0 if path.is_file() else 0.0]), dist.ReduceOp.MIN)[0] > 0
    batches = PairBatches(data, cfg.micro_batch_size, engine.replica, engine.replicas)
    if cached:
        with np.load(path) as stored:
            batches.reference = {split: stored[split] for split in SPLITS}
        _say(f"pipellm: reference log-probs from {path}")
        return batches
    batches.reference = compute_reference(cfg, data, engine, objective, schedule, batches, resumed)
    if int(os.environ.get("RANK", "0")) == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}.npz")
        np.savez(tmp, **batches.reference)
        os.replace(tmp, path)
    return batches


def compute_reference(cfg, data, engine, objective, schedule, batches: PairBatches, resumed: bool) -> dict:
    """Every sample's summed answer log-prob under the reference weights (all ranks take part)."""
    import time

    from tqdm import tqdm

    started = time.perf_counter()
    sinks: dict[str, dict[int, float]] = {split: {} for split in SPLITS}
    batches_of_pass = list(reference_batches(data, schedule, cfg.global_batch_size))
    bar = tqdm(batches_of_pass, desc="reference log-probs", unit="batch", file=sys.stderr,
               disable=int(os.environ.get("RANK", "0")) != 0, mininterval=1 if sys.stderr.isatty() else 30)
    with reference_model(engine, reference_weights_dir(cfg, resumed)):
        for split, rows in bar:
            input_ids, labels, position_ids, _ = data.rows_of(rows, batches.store(split))
            with objective.recording(sinks[split]):
                engine.eval_step(batches.micro_batches(rows, split, input_ids, labels, position_ids))
    out = {split: gathered_logps(sinks[split], len(batches.store(split))) for split in SPLITS}
    _say(f"pipellm: reference log-probs of {len(data.store)} samples computed in "
         f"{time.perf_counter() - started:.1f}s")
    return out


def gathered_logps(sink: dict[int, float], samples: int) -> np.ndarray:
    """The log-probs every rank recorded of a split's ``samples`` (one per sample; the ranks that scored a sample
    agree), as one array on every rank."""
    from pipellm.training.distributed import all_reduce

    values, counts = torch.zeros(samples, dtype=torch.float64), torch.zeros(samples, dtype=torch.float64)
    for sample, value in sink.items():
        values[sample] += value
        counts[sample] += 1
    values, counts = all_reduce(values), all_reduce(counts)
    return (values / counts.clamp(min=1)).float().numpy()


@contextlib.contextmanager
def reference_model(engine, weights_dir: Path | None):
    """The engine's model as the reference while open: the reference's weights (``swapped_weights``) in the
    parameter set's reference mode (LoRA: adapters off)."""
    mode = optional_hook(engine.parameter_set, "reference_mode")
    with swapped_weights(engine, weights_dir), (mode(engine.model) if mode else contextlib.nullcontext()):
        yield


@contextlib.contextmanager
def swapped_weights(engine, weights_dir: Path | None):
    """The reference's layer files in the stage for the pass, this stage's own weights back afterwards."""
    if weights_dir is None:
        yield
        return
    from pipellm.models import get_family
    from pipellm.pipeline.weights import load_pipeline_weights

    if not hasattr(engine.model, "local_layer_indices"):
        raise PipellmError("the ZeRO-3 baseline computes reference log-probs only with `dpo.reference: initial` "
                           "on a fresh start; train with train_ds.py, or start the run again")
    own = {key: value.detach().to("cpu", copy=True) for key, value in engine.model.state_dict().items()}
    load_pipeline_weights(engine.model, get_family(engine.hf_config.model_type), engine.hf_config, weights_dir,
                          rename=optional_hook(engine.parameter_set, "full_layer_state"))
    try:
        yield
    finally:
        engine.model.load_state_dict(own)


def _say(message: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(message, file=sys.stderr)


