"""From tokenized samples to the micro batches a pipeline step consumes: mixing, eval split, packing, shuffling,
sharding across data-parallel replicas.

**An epoch.** File ``i`` (weight ``w_i``, default 1) contributes ``floor(w_i)`` copies of each of its training
samples plus a seeded random ``frac(w_i)`` share of them, drawn anew each epoch (weight 2: every sample twice
per epoch; 0.3: a different 30% each epoch). With ``packing`` the epoch's samples are packed into rows of
``max_seq_len`` tokens (best fit, longest first); otherwise each sample is a row, right-padded. The rows are
shuffled with a generator seeded by ``(seed, epoch)``, so every rank computes the same order without talking.

**A step** takes the next ``train_batch_size`` rows; replica r of D takes the r-th contiguous block of them.
The last step of an epoch is filled up with empty rows (all labels -100: they change neither the loss nor the
gradient, since the loss is the mean over labelled tokens), so every sample is trained exactly once per epoch
(times its weight) and the micro batch shapes never change.

**Packed rows** carry position ids that restart at 0 for each sample; attention uses them to keep each token
within its own sample (``pipellm.models.attention``), so a packed sample's per-token losses are those it has alone.

**Pairs** (``group: 2``, pairwise objectives): samples ``2k`` and ``2k + 1`` are a preference pair (a unit).
The eval split, the mixing, the shuffling and the packing work on units: without packing a pair is two adjacent
rows (an even micro batch size keeps them in one micro batch); with packing a pair is packed into one row (a
pair longer than a row together is left out, and counted).

Every rank can compute every global batch, which also gives each replica the number of labelled tokens of the
whole global batch without a collective: the loss is normalised by it (``pipellm.pipeline.token_mean_loss``).
"""
from __future__ import annotations

import bisect
import math

import numpy as np
import torch

from pipellm.data import IGNORE_INDEX
from pipellm.data.cache import TokenizedFile


def shift_targets(labels: torch.Tensor) -> torch.Tensor:
    """Next-token targets: position t is trained to predict token t + 1, the last position nothing."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    return targets


class SampleStore:
    """The samples of several tokenized files behind one global index (file 0's samples first)."""

    def __init__(self, files: list[TokenizedFile]):
        self.files = files
        self.bases = np.cumsum([0] + [len(f) for f in files])
        self.lengths = np.concatenate([f.lengths for f in files]) if files else np.zeros(0, np.int64)
        self.margins = np.concatenate([np.full(len(f), np.nan, np.float32) if f.margins is None else f.margins
                                       for f in files]) if files else np.zeros(0, np.float32)
        """Each sample's record ``margin`` (preference pairs; NaN: none given)."""

    def __len__(self) -> int:
        return int(self.bases[-1])

    def file_ids(self, file_index: int) -> np.ndarray:
        return np.arange(self.bases[file_index], self.bases[file_index + 1])

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        f = int(np.searchsorted(self.bases, index, side="right")) - 1
        return self.files[f].sample(int(index - self.bases[f]))


def split_eval(store: SampleStore, eval_ratio: float, seed: int,
               group: int = 1) -> tuple[list[np.ndarray], np.ndarray]:
    """Per file: the training unit ids and (pooled) the held-out ones, a seeded ``eval_ratio`` share of each (a
    unit is ``group`` consecutive samples: unit u is samples ``u * group ...``)."""
    train, held_out = [], []
    for i in range(len(store.files)):
        ids = store.file_ids(i)[::group] // group
        n_eval = int(round(eval_ratio * len(ids))) if eval_ratio else 0
        if eval_ratio and len(ids) > 1:
            n_eval = min(max(n_eval, 1), len(ids) - 1)
        perm = np.random.default_rng([seed, 7919, i]).permutation(len(ids))
        held_out.append(np.sort(ids[perm[:n_eval]]))
        train.append(np.sort(ids[perm[n_eval:]]))
    return train, np.concatenate(held_out) if held_out else np.zeros(0, np.int64)


def expand(unit_ids: np.ndarray, group: int) -> np.ndarray:
    """The sample ids of units ``unit_ids``, in order."""
    return (np.asarray(unit_ids, dtype=np.int64)[:, None] * group + np.arange(group)).reshape(-1)


def unit_lengths(lengths: np.ndarray, group: int) -> np.ndarray:
    """Tokens of each unit of ``group`` consecutive samples."""
    return lengths.reshape(-1, group).sum(axis=1) if group > 1 else lengths


def pack(sample_ids: np.ndarray, lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit-decreasing packing of samples (``lengths[i] <= capacity``) into rows of ``capacity`` tokens.

    Returns ``(row_offsets, row_samples)``: row r holds ``row_samples[row_offsets[r]:row_offsets[r + 1]]``.
    Deterministic: ties in length keep the order of ``sample_ids``.
    """
    order = np.argsort(-lengths[sample_ids], kind="stable")
    rows: list[list[int]] = []
    by_space: dict[int, list[int]] = {}  # free space -> rows with exactly that much free
    spaces: list[int] = []  # sorted keys of by_space
    for sample in sample_ids[order].tolist():
        length = int(lengths[sample])
        k = bisect.bisect_left(spaces, length)
        if k < len(spaces):
            space = spaces[k]
            row = by_space[space].pop()
            if not by_space[space]:
                del by_space[space]
                spaces.pop(k)
        else:
            space, row = capacity, len(rows)
            rows.append([])
        rows[row].append(sample)
        left = space - length
        if left > 0:
            if left not in by_space:
                by_space[left] = []
                bisect.insort(spaces, left)
            by_space[left].append(row)
    offsets = np.cumsum([0] + [len(r) for r in rows])
    flat = np.fromiter((s for r in rows for s in r), dtype=np.int64, count=int(offsets[-1]))
    return offsets, flat


class EpochPlan:
    """Which samples form which rows in each epoch, and in which order the rows come (see module docstring)."""

    def __init__(self, lengths: np.ndarray, train_ids: list[np.ndarray], weights: list[float] | None, seed: int,
                 max_seq_len: int, packing: bool, global_batch_size: int, group: int = 1):
        self.lengths, self.group = lengths, group
        self.unit_lengths = unit_lengths(lengths, group)
        self.train_ids = train_ids
        self.weights = list(weights) if weights else [1.0] * len(train_ids)
        self.seed, self.max_seq_len, self.packing = seed, max_seq_len, packing
        self.global_batch_size = global_batch_size
        self._cached: tuple[int, np.ndarray, np.ndarray] | None = None
        self._row_counts: dict[int, int] = {}

    def samples(self, epoch: int) -> np.ndarray:
        parts = []
        for i, (ids, weight) in enumerate(zip(self.train_ids, self.weights)):
            whole, frac = int(math.floor(weight)), weight - math.floor(weight)
            parts += [ids] * whole
            n_extra = int(round(frac * len(ids)))
            if n_extra:
                rng = np.random.default_rng([self.seed, epoch, 104729, i])
                parts.append(np.sort(rng.choice(ids, size=n_extra, replace=False)))
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def rows(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """``(row_offsets, row_samples)`` of the epoch, rows already in their shuffled order."""
        if self._cached is None or self._cached[0] != epoch:
            samples = self.samples(epoch)
            rng = np.random.default_rng([self.seed, epoch])
            samples = samples[rng.permutation(len(samples))]
            if self.packing:
                offsets, flat = pack(samples, self.unit_lengths, self.max_seq_len)
                order = rng.permutation(len(offsets) - 1)
                sizes = np.diff(offsets)[order]
                flat = np.concatenate([flat[offsets[r]:offsets[r + 1]] for r in order]) if len(order) else flat
                offsets = np.concatenate([[0], np.cumsum(sizes)]) * self.group
            else:
                offsets, flat = np.arange(len(samples) * self.group + 1), samples
            if self.group > 1:
                flat = expand(flat, self.group)
            self._cached = (epoch, offsets, flat)
            self._row_counts[epoch] = len(offsets) - 1
        return self._cached[1], self._cached[2]

    def num_rows(self, epoch: int) -> int:
        if epoch not in self._row_counts:
            if self.packing:
                self.rows(epoch)
            else:
                self._row_counts[epoch] = self.group * sum(
                    len(ids) * int(math.floor(w)) + int(round((w - math.floor(w)) * len(ids)))
                    for ids, w in zip(self.train_ids, self.weights))
        return self._row_counts[epoch]

    def steps(self, epoch: int) -> int:
        return math.ceil(self.num_rows(epoch) / self.global_batch_size)

    def batch(self, epoch: int, index: int) -> list[np.ndarray | None]:
        """The rows (each an array of sample ids; None for an empty filler row) of step ``index`` of ``epoch``."""
        offsets, flat = self.rows(epoch)
        start = index * self.global_batch_size
        rows = []
        for r in range(start, start + self.global_batch_size):
            rows.append(flat[offsets[r]:offsets[r + 1]] if r < len(offsets) - 1 else None)
        return rows


class Schedule:
    """Steps over ``n_epochs`` epochs of an ``EpochPlan``: step -> (epoch, index within the epoch)."""

    def __init__(self, plan: EpochPlan, n_epochs: int, max_steps: int | None = None):
        self.plan = plan
        self.steps_per_epoch = [plan.steps(e) for e in range(n_epochs)]
        self.starts = np.cumsum([0] + self.steps_per_epoch)
        total = int(self.starts[-1])
        self.total_steps = min(total, max_steps) if max_steps is not None else total

    def locate(self, step: int) -> tuple[int, int]:
        epoch = int(np.searchsorted(self.starts, step, side="right")) - 1
        return epoch, int(step - self.starts[epoch])

    def batch(self, step: int) -> list[np.ndarray | None]:
        return self.plan.batch(*self.locate(step))


def materialize(store: SampleStore, rows: list[np.ndarray | None], max_seq_len: int, pad_id: int):
    """``(input_ids, labels, position_ids, lengths)`` tensors ``[len(rows), max_seq_len]`` (lengths ``[rows]``).

    Samples of a row follow each other; their position ids restart at 0; padding (right) continues the last
    sample's positions and has labels -100. An empty (None) row is all padding.
    """
    n = len(rows)
    input_ids = np.full((n, max_seq_len), pad_id, dtype=np.int64)
    labels = np.full((n, max_seq_len), IGNORE_INDEX, dtype=np.int64)
    positions = np.tile(np.arange(max_seq_len, dtype=np.int64), (n, 1))
    lengths = np.zeros(n, dtype=np.int64)
    for r, samples in enumerate(rows):
        if samples is None:
            continue
        at = 0
        for s in samples:
            ids, trained = store.sample(int(s))
            k = len(ids)
            input_ids[r, at:at + k] = ids
            labels[r, at:at + k] = np.where(trained.astype(bool), ids, IGNORE_INDEX)
            positions[r, at:at + k] = np.arange(k)
            at += k
        positions[r, at:] = positions[r, at - 1] + 1 + np.arange(max_seq_len - at) if at else positions[r, at:]
        lengths[r] = at
    return (torch.from_numpy(input_ids), torch.from_numpy(labels), torch.from_numpy(positions),
            torch.from_numpy(lengths))


def micro_batches(input_ids: torch.Tensor, labels: torch.Tensor, micro_batch_size: int, data_rank: int,
                  data_degree: int, position_ids: torch.Tensor | None = None) -> list:
    """This replica's micro batches of one global batch, as ``((input_ids, position_ids), (targets, loss_scale))``.

    ``input_ids``/``labels``/``position_ids`` are the global batch's rows (unshifted labels, -100 where
    untrained; positions default to ``0..S-1``). Replica r takes the r-th contiguous block of rows.
    """
    global_rows = input_ids.shape[0]
    rows_per_replica = global_rows // data_degree
    accumulation_steps = rows_per_replica // micro_batch_size
    targets = shift_targets(labels)
    labelled = int((targets != IGNORE_INDEX).sum())
    # Scale so that DeepSpeed's mean over micro batches and replicas becomes a mean over labelled tokens.
    loss_scale = torch.tensor([accumulation_steps * data_degree / max(labelled, 1)], dtype=torch.float32)
    if position_ids is None:
        position_ids = torch.arange(input_ids.shape[1]).expand(global_rows, -1)
    start = data_rank * rows_per_replica
    batches = []
    for offset in range(start, start + rows_per_replica, micro_batch_size):
        rows = slice(offset, offset + micro_batch_size)
        batches.append(((input_ids[rows].contiguous(), position_ids[rows].contiguous()),
                        (targets[rows].contiguous(), loss_scale)))
    return batches


class TrainingData:
    """Everything the training loop reads: the samples, the epoch plan, the eval rows and what to log."""

    def __init__(self, store: SampleStore, plan: EpochPlan, eval_store: SampleStore | None,
                 eval_rows: list[np.ndarray], files_meta: list[dict], pad_id: int, max_seq_len: int,
                 long_pairs: int = 0):
        self.store, self.plan, self.long_pairs = store, plan, long_pairs
        self.eval_store, self.eval_rows = eval_store, eval_rows
        self.files_meta, self.pad_id, self.max_seq_len = files_meta, pad_id, max_seq_len

    def rows_of(self, rows: list[np.ndarray | None], store: SampleStore | None = None):
        return materialize(store or self.store, rows, self.max_seq_len, self.pad_id)

    def eval_row_batches(self, global_batch_size: int):
        """The eval rows in fixed order, in global batches (the last one filled up with empty rows)."""
        for start in range(0, len(self.eval_rows), global_batch_size):
            chunk = list(self.eval_rows[start:start + global_batch_size])
            yield chunk + [None] * (global_batch_size - len(chunk))

    def summary(self) -> str:
        """One log line: counts per file, rows, fill ratio, eval size."""
        def count(key):
            return sum(m[key] for m in self.files_meta)

        bad = {}
        for m in self.files_meta:
            for reason, n in m["bad_records"].items():
                bad[reason] = bad.get(reason, 0) + n
        offsets, flat = self.plan.rows(0)
        n_rows = len(offsets) - 1
        fill = float(self.plan.lengths[flat].sum()) / max(n_rows * self.max_seq_len, 1)
        bad_text = ", ".join(f"{n} {reason}" for reason, n in sorted(bad.items())) or "none"
        return (f"{count('records')} records in {len(self.files_meta)} file(s) -> {count('samples')} samples "
                f"({count('truncated')} truncated, {count('dropped_overlong')} dropped as over-long, bad records "
                f"skipped: {bad_text}); epoch 0: {n_rows} rows{' (packed)' if self.plan.packing else ''}, fill "
                f"ratio {fill:.1%} (non-pad tokens / all tokens); eval: {len(self.eval_rows)} rows"
                + (f"; {self.long_pairs} pairs left out, longer than a row together" if self.long_pairs else ""))


def load_training_data(cfg, tokenizer, show_progress: bool = True, pairs: bool = False) -> TrainingData:
    """Tokenize (or reuse the cache of) the config's data files and plan the epochs (``cfg``: a TrainConfig).
    ``pairs``: a pairwise objective's preference pairs (units of two samples)."""
    from pipellm.config.checks import expand_data_directories
    from pipellm.data.cache import pad_token_id, tokenize_file, tokenizer_fingerprint
    from pipellm.data.samples import DataOptions
    from pipellm.errors import PipellmError

    expand_data_directories(cfg)  # done by validate_environment already; here for callers that skip it
    options = DataOptions(cfg.max_seq_len, cfg.template, cfg.overlong, cfg.skip_bad_records, pairs=pairs)
    fingerprint = tokenizer_fingerprint(tokenizer)
    group = 2 if pairs else 1

    def tokenize(paths):
        return [tokenize_file(p, tokenizer, options, cache_dir=cfg.data_cache_dir,
                              num_workers=cfg.tokenize_workers, show_progress=show_progress,
                              tokenizer_hash=fingerprint) for p in paths]

    long_pairs = []

    def fitting(units, lengths):  # with packing a pair shares one row
        kept = units[unit_lengths(lengths, group)[units] <= cfg.max_seq_len] if cfg.packing else units
        long_pairs.append(len(units) - len(kept))
        return kept

    files = tokenize(cfg.data_paths)
    store = SampleStore(files)
    train_ids, held_out = split_eval(store, cfg.eval_ratio, cfg.seed, group)
    train_ids, held_out = [fitting(ids, store.lengths) for ids in train_ids], fitting(held_out, store.lengths)
    if not sum(len(ids) for ids in train_ids):
        raise PipellmError(f"`data_path` {cfg.data_paths} has no trainable sample; add data or raise max_seq_len")
    plan = EpochPlan(store.lengths, train_ids, cfg.data_weights, cfg.seed, cfg.max_seq_len, cfg.packing,
                     cfg.global_batch_size, group)
    if cfg.eval_data_paths:
        eval_store = SampleStore(tokenize(cfg.eval_data_paths))
        eval_ids = fitting(np.arange(len(eval_store) // group), eval_store.lengths)
    else:
        eval_store, eval_ids = store, held_out
    if cfg.packing and len(eval_ids):
        offsets, flat = pack(eval_ids, unit_lengths(eval_store.lengths, group), cfg.max_seq_len)
        eval_rows = [expand(flat[offsets[r]:offsets[r + 1]], group) for r in range(len(offsets) - 1)]
    else:
        eval_rows = [sample[None] for sample in expand(eval_ids, group)]
    return TrainingData(store, plan, eval_store, eval_rows, [f.meta for f in files], pad_token_id(tokenizer),
                        cfg.max_seq_len, sum(long_pairs))
