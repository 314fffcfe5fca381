"""Training data on disk: tokenize each data file once into a cache of flat token arrays, then read rows from it.

**Cache.** Each data file is tokenized (``pipellm.data.templates``) into ``<data_cache_dir>/<key>/``: ``tokens.bin``
(int32 token ids of all samples, back to back), ``trained.bin`` (uint8, 1 where the token is a label),
``offsets.npy`` (sample boundaries), for preference pairs ``margins.npy`` (float32 per sample: its record's
``margin``, NaN where none) and ``meta.json`` (counts). The key hashes the file's content, the
tokenizer (its full serialisation), the template, ``max_seq_len``, ``overlong`` and ``skip_bad_records``, so any
change re-tokenizes and nothing else does. Every rank of a node opens the same files (memory-mapped: the page
cache holds one copy per node, and training memory does not grow with the data); the first rank to take the
file lock builds, the others wait and reuse. The default directory is ``~/.cache/pipellm/data``
(``$PIPELLM_CACHE``, or the config key ``data_cache_dir``).

How a record becomes a sample (templates, over-long samples, bad records): ``pipellm.data.samples``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pipellm.data import IGNORE_INDEX
from pipellm.data.records import PathArg, as_path_list, empty_file_error
from pipellm.data.samples import ChunkResult, DataOptions, chunks, tokenize_chunk, worker_chunk, worker_init
from pipellm.data.templates import Encoder
from pipellm.errors import PipellmError

CACHE_VERSION = 2
# Files this large (bytes) are tokenized by worker processes; smaller ones in the calling process.
PARALLEL_MIN_BYTES = 4 << 20


def pad_token_id(tokenizer) -> int:
    """The id used for padding: the tokenizer's pad token, else its EOS, else 0 (labels mask it anyway)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


# ----- the per-file cache -----

def default_cache_dir() -> Path:
    return Path(os.environ.get("PIPELLM_CACHE") or Path.home() / ".cache" / "pipellm") / "data"


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything in the tokenizer that changes token ids."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        if getattr(tokenizer, "sp_model", None) is not None:  # the sentencepiece model: pieces, scores, normalizer
            h.update(tokenizer.sp_model.serialized_model_proto())
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    special = {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())}
    h.update(json.dumps(special, sort_keys=True).encode())
    return h.hexdigest()


def cache_key(file_digest: str, tokenizer_hash: str, encoder: Encoder, options: DataOptions) -> str:
    parts = {"version": CACHE_VERSION, "file": file_digest, "tokenizer": tokenizer_hash,
             "encoder": encoder.describe(), "options": dataclasses.asdict(options)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


@dataclasses.dataclass
class TokenizedFile:
    """The samples of one data file, memory-mapped from the cache."""

    path: str
    tokens: np.ndarray  # int32 [total tokens]
    trained: np.ndarray  # uint8 [total tokens]
    offsets: np.ndarray  # int64 [samples + 1]
    meta: dict
    margins: np.ndarray | None = None  # float32 [samples], preference pairs only: each record's margin, NaN: none

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        start, stop = self.offsets[i], self.offsets[i + 1]
        return self.tokens[start:stop], self.trained[start:stop]

    @classmethod
    def open(cls, directory: Path) -> "TokenizedFile":
        meta = json.loads((directory / "meta.json").read_text())
        n_tokens = meta["tokens"]
        tokens = np.memmap(directory / "tokens.bin", dtype=np.int32, mode="r", shape=(n_tokens,)) if n_tokens \
            else np.zeros(0, np.int32)
        trained = np.memmap(directory / "trained.bin", dtype=np.uint8, mode="r", shape=(n_tokens,)) if n_tokens \
            else np.zeros(0, np.uint8)
        offsets = np.load(directory / "offsets.npy", mmap_mode="r")
        margins = np.load(directory / "margins.npy") if (directory / "margins.npy").is_file() else None
        return cls(meta["file"], tokens, trained, offsets, meta, margins)


@contextlib.contextmanager
def _locked(lock_path: Path):
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def tokenize_file(path: str | Path, tokenizer, options: DataOptions, *, cache_dir: str | Path | None = None,
                  num_workers: int | None = None,
                  show_progress: bool = True, tokenizer_hash: str | None = None) -> TokenizedFile:
    """The cached samples of one data file, tokenizing it first if no cache entry matches."""
    path = Path(path)
    if not path.is_file():
        raise PipellmError(f"data file {path} does not exist")
    encoder = Encoder(tokenizer, options.template)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    file_digest = _file_digest(path)
    key = cache_key(file_digest, tokenizer_hash or tokenizer_fingerprint(tokenizer), encoder, options)
    entry = cache_dir / key
    with _locked(cache_dir / f"{key}.lock"):
        if not (entry / "meta.json").is_file():
            _build_entry(path, entry, tokenizer, encoder, options, num_workers, show_progress)
    tokenized = TokenizedFile.open(entry)
    if not tokenized.meta["records"]:
        raise empty_file_error(path)
    tokenized.meta.update(sha256=file_digest, cache_key=key)  # what run_info.json records of the file
    return tokenized


def _build_entry(path: Path, entry: Path, tokenizer, encoder: Encoder, options: DataOptions,
                 num_workers: int | None, show_progress: bool) -> None:
    """Tokenize ``path`` into a temporary directory beside ``entry``, then rename it to ``entry``."""
    from tqdm import tqdm

    tmp = entry.with_name(f"{entry.name}.tmp-{os.getpid()}")
    size = path.stat().st_size
    bar = tqdm(total=size, unit="B", unit_scale=True, desc=f"tokenizing {path.name}", file=sys.stderr,
               disable=not show_progress or size < (1 << 20), mininterval=1 if sys.stderr.isatty() else 30)
    if num_workers is None:
        num_workers = min(len(os.sched_getaffinity(0)), 8)
    workers = num_workers if num_workers > 1 and size >= PARALLEL_MIN_BYTES else 0
    started = time.perf_counter()
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        with _chunk_results(path, tokenizer, encoder, options, workers, bar.update) as results:
            totals, offsets = _write_samples(tmp, results, options.pairs)
        bar.close()
        n_tokens = int(offsets[-1])
        n_trained = int(np.fromfile(tmp / "trained.bin", dtype=np.uint8).sum()) if n_tokens else 0
        seconds = time.perf_counter() - started
        meta = {"file": str(path), "records": totals.records, "samples": len(offsets) - 1, "tokens": n_tokens,
                "trained_tokens": n_trained, "truncated": totals.truncated, "dropped_overlong": totals.dropped,
                "margins": int(np.count_nonzero(~np.isnan(totals.margins))) // 2,
                "bad_records": totals.bad, "first_bad_records": totals.first_bad, "template": encoder.template,
                "options": dataclasses.asdict(options), "seconds": round(seconds, 3),
                "records_per_sec": round(totals.records / max(seconds, 1e-9), 1)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False))
        if entry.exists():
            shutil.rmtree(entry)
        os.replace(tmp, entry)
    finally:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _chunk_results(path: Path, tokenizer, encoder: Encoder, options: DataOptions, workers: int, progress):
    """The ``ChunkResult`` of each chunk of ``path``, in order: from ``workers`` spawned processes, or from this
    one when ``workers`` is 0. A worker's ``PipellmError`` is raised here."""
    pool = None
    if workers:
        import multiprocessing

        pool = multiprocessing.get_context("spawn").Pool(workers, initializer=worker_init,
                                                         initargs=(tokenizer, options))
        results = pool.imap(worker_chunk, chunks(path, progress))
    else:
        results = (tokenize_chunk(encoder, chunk, options) for chunk in chunks(path, progress))

    def raising():
        for result in results:
            if isinstance(result, PipellmError):
                raise result
            yield result
    try:
        yield raising()
    finally:
        if pool is not None:
            pool.terminate()


def _write_samples(directory: Path, results, pairs: bool) -> tuple[ChunkResult, np.ndarray]:
    """``tokens.bin``, ``trained.bin``, ``offsets.npy`` (and for ``pairs`` ``margins.npy``) of the samples in
    ``results``; the counts (with every margin) and offsets."""
    totals = ChunkResult()
    offsets = [0]
    with open(directory / "tokens.bin", "wb") as tokens, open(directory / "trained.bin", "wb") as trained:
        for result in results:
            if result.lengths:
                tokens.write(np.concatenate(result.tokens).astype(np.int32).tobytes())
                trained.write(np.concatenate(result.trained).astype(np.uint8).tobytes())
            offsets += (offsets[-1] + np.cumsum(result.lengths, dtype=np.int64)).tolist()
            totals.add_counts(result)
            totals.margins += result.margins
    offsets = np.asarray(offsets, dtype=np.int64)
    np.save(directory / "offsets.npy", offsets)
    if pairs:
        np.save(directory / "margins.npy", np.asarray(totals.margins, dtype=np.float32).reshape(-1))
    return totals, offsets


# ----- in-memory padded tensors (small data: evaluation helpers, tests) -----

@dataclasses.dataclass
class TokenizedDataset:
    """Samples as fixed-shape tensors, one per row, right-padded."""

    input_ids: torch.Tensor  # [n, max_seq_len] int64, right-padded with pad_token_id(tokenizer)
    labels: torch.Tensor  # [n, max_seq_len] int64, aligned with input_ids; -100 where untrained and on padding
    lengths: torch.Tensor  # [n] int64, number of non-pad tokens of each row
    n_truncated: int
    n_dropped: int  # over-long samples left out (overlong: drop)
    n_bad: int = 0  # bad records skipped

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def fill_ratio(self) -> float:
        """Share of non-pad tokens among all tokens."""
        return self.lengths.sum().item() / max(self.input_ids.numel(), 1)


def build_dataset(paths: PathArg, tokenizer, max_seq_len: int, *, template: str = "auto",
                  overlong: str = "truncate", skip_bad_records: bool = False) -> TokenizedDataset:
    """Tokenize ``paths`` in memory into padded tensors, one sample per row (no cache; for small data)."""
    options = DataOptions(max_seq_len, template, overlong, skip_bad_records)
    encoder = Encoder(tokenizer, template)
    result = ChunkResult()
    for path in as_path_list(paths):
        if not path.is_file():
            raise PipellmError(f"data file {path} does not exist")
        records = result.records
        for chunk in chunks(path, lambda n: None):
            part = tokenize_chunk(encoder, chunk, options)
            result.tokens += part.tokens
            result.trained += part.trained
            result.lengths += part.lengths
            result.add_counts(part)
        if result.records == records:
            raise empty_file_error(path)
    if not result.lengths:
        raise PipellmError(f"no trainable sample in {[str(p) for p in as_path_list(paths)]}; add data or raise "
                           f"max_seq_len")
    n = len(result.lengths)
    input_ids = torch.full((n, max_seq_len), pad_token_id(tokenizer), dtype=torch.long)
    labels = torch.full((n, max_seq_len), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, trained) in enumerate(zip(result.tokens, result.trained)):
        ids_t = torch.from_numpy(np.asarray(ids, dtype=np.int64))
        input_ids[i, :len(ids)] = ids_t
        labels[i, :len(ids)] = torch.where(torch.from_numpy(np.asarray(trained, dtype=bool)), ids_t, IGNORE_INDEX)
    return TokenizedDataset(input_ids, labels, torch.tensor(result.lengths, dtype=torch.long), result.truncated,
                            result.dropped, sum(result.bad.values()))
