"""Training data on disk: tokenize each data file once into a cache of flat token arrays, then read rows from it.

**Cache.** Each data file is tokenized (``pipellm.data.templates``) into ``<data_cache_dir>/<key>/``: ``tokens.bin``
(int32 token ids of all samples, back to back), ``trained.bin`` (uint8, 1 where the token is a label),
``offsets.npy`` (sample boundaries) and ``meta.json`` (counts). The key hashes the file's content, the
tokenizer (its full serialisation), the template, ``max_seq_len``, ``overlong`` and ``skip_bad_records``, so any
change re-tokenizes and nothing else does. Every rank of a node opens the same files (memory-mapped: the page
cache holds one copy per node, and training memory does not grow with the data); the first rank to take the
file lock builds, the others wait and reuse. The default directory is ``~/.cache/pipellm/data``
(``$PIPELLM_CACHE``, or the config key ``data_cache_dir``).

**Samples.** A record becomes one sample: its token ids and, per token, whether it is trained (aligned with the
ids: ``labels[t]`` is ``input_ids[t]`` or ``-100``; the training loop shifts them). The first token of a sample
is never trained (nothing precedes it), which is also what keeps packed samples from predicting each other.

**Over-long samples** (``overlong``): ``truncate`` (default) keeps the first ``max_seq_len`` tokens. Keeping the
beginning keeps the whole prompt, so every trained token is still conditioned on the question it answers; the
cut answer loses its EOS, so the model is never taught to stop early. (Keeping the end would train answers on
prompts whose beginning is gone, i.e. teach the model to answer questions it was not shown.) ``drop`` leaves
such samples out. Both are counted and logged. A sample left without any trained token by truncation is a
bad record (below).

**Bad records** (invalid JSON, unknown type, missing or mistyped field, empty answer, no label left after
truncation, a record the chat template rejects) stop the build with ``file line N`` (or ``record N`` of a JSON
list) and the field, or with ``skip_bad_records: true`` are skipped and counted by reason.
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

from pipellm.errors import PipellmError
from pipellm.data.records import BadRecord, PathArg, as_path_list, check_record, iter_raw, load_records
from pipellm.data.templates import INSTRUCT_TEMPLATE, INSTRUCT_TEMPLATE_NO_INPUT, IGNORE_INDEX, Encoder, TemplateError

__all__ = ["DataOptions", "TokenizedFile", "TokenizedDataset", "build_dataset", "tokenize_file", "pad_token_id",
           "load_records", "INSTRUCT_TEMPLATE", "INSTRUCT_TEMPLATE_NO_INPUT", "IGNORE_INDEX"]

CACHE_VERSION = 1
OVERLONG = ("truncate", "drop")
# Records handed to a tokenizing step (and a worker process) at a time.
CHUNK_RECORDS = 2048
# Files this large (bytes) are tokenized by worker processes; smaller ones in the calling process.
PARALLEL_MIN_BYTES = 4 << 20


@dataclasses.dataclass(frozen=True)
class DataOptions:
    """How records become samples (the data keys of the training config)."""

    max_seq_len: int
    template: str = "auto"
    overlong: str = "truncate"
    skip_bad_records: bool = False

    def __post_init__(self):
        if self.max_seq_len < 2:
            raise PipellmError(f"max_seq_len is {self.max_seq_len}; it must be at least 2 (a context token and a "
                               f"target)")
        if self.overlong not in OVERLONG:
            raise PipellmError(f"`overlong` must be truncate or drop, got {self.overlong!r}")


def pad_token_id(tokenizer) -> int:
    """The id used for padding: the tokenizer's pad token, else its EOS, else 0 (labels mask it anyway)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


# ----- tokenizing records -----

class ChunkResult:
    """Samples of a chunk of records, flat, plus what was truncated, dropped or bad."""

    def __init__(self):
        self.tokens: list[np.ndarray] = []
        self.trained: list[np.ndarray] = []
        self.lengths: list[int] = []
        self.records = self.truncated = self.dropped = 0
        self.bad: dict[str, int] = {}
        self.first_bad: list[str] = []

    def add_bad(self, bad: BadRecord) -> None:
        self.bad[bad.reason] = self.bad.get(bad.reason, 0) + 1
        if len(self.first_bad) < 5:
            self.first_bad.append(str(bad))


def tokenize_chunk(encoder: Encoder, items: list[tuple[str, object]], options: DataOptions) -> ChunkResult:
    """Check, encode, truncate or drop a chunk of ``(where, raw JSON line / parsed record / BadRecord)``.

    Raises ``PipellmError`` at the first bad record unless ``options.skip_bad_records``.
    """
    out = ChunkResult()
    checked, wheres = [], []
    for where, raw in items:
        out.records += 1
        try:
            if isinstance(raw, BadRecord):
                raise raw
            if isinstance(raw, str):
                try:
                    raw = json.loads(raw)
                except json.JSONDecodeError as e:
                    raise BadRecord(where, None, f"invalid JSON ({e.msg}); a JSONL file holds exactly one JSON "
                                                 f"object per line", "invalid_json") from None
            checked.append(check_record(raw, where))
            wheres.append(where)
        except BadRecord as bad:
            _bad(out, bad, options)
    for where, encoded in zip(wheres, encoder.encode_many(checked)):
        if isinstance(encoded, TemplateError):
            _bad(out, BadRecord(where, None, str(encoded), "chat_template"), options)
            continue
        ids, trained = encoded
        if len(ids) > options.max_seq_len:
            if options.overlong == "drop":
                out.dropped += 1
                continue
            out.truncated += 1
            ids, trained = ids[:options.max_seq_len], trained[:options.max_seq_len]
            if not trained.any():
                _bad(out, BadRecord(where, None, f"nothing left to train on after truncation to max_seq_len "
                                                 f"{options.max_seq_len} (the prompt alone is longer); raise "
                                                 f"max_seq_len or shorten the prompt", "no_label_after_truncation"),
                     options)
                continue
        out.tokens.append(ids)
        out.trained.append(trained)
        out.lengths.append(len(ids))
    return out


def _bad(out: ChunkResult, bad: BadRecord, options: DataOptions) -> None:
    if not options.skip_bad_records:
        raise PipellmError(f"{bad}; fix the record or set `skip_bad_records: true` to skip bad records")
    out.add_bad(bad)


# Worker processes: each holds its own encoder (tokenizers are picklable; Rust threads are not shared).
_WORKER: tuple[Encoder, DataOptions] | None = None


def _worker_init(tokenizer, options: DataOptions) -> None:
    global _WORKER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER = (Encoder(tokenizer, options.template), options)


def _worker_chunk(items):
    encoder, options = _WORKER
    try:
        return tokenize_chunk(encoder, items, options)
    except PipellmError as e:
        return e


def _chunks(path: Path, progress):
    """Chunks of ``(where, raw)``: JSONL lines stay unparsed (the parsing happens in the workers)."""
    chunk = []
    for where, raw in _iter_lines(path, progress):
        chunk.append((where, raw))
        if len(chunk) == CHUNK_RECORDS:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _iter_lines(path: Path, progress):
    """``(where, raw line or parsed record)``; JSON lists are parsed here, JSONL lines are left to the workers."""
    try:
        with path.open("rb") as f:
            head = f.read(4096).lstrip()
    except OSError as e:
        raise PipellmError(f"{path}: cannot read data file ({e.strerror}); pass an existing UTF-8 JSON or JSONL "
                           f"file") from None
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:].lstrip()
    if head.startswith(b"["):
        for where, raw in iter_raw(path):
            yield where, raw
        progress(path.stat().st_size)
        return
    with path.open("rb") as f:
        for lineno, line in enumerate(f, start=1):
            progress(len(line))
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                yield f"{path} line {lineno}", BadRecord(f"{path} line {lineno}", None,
                                                        f"not UTF-8 ({e.reason}); save the file as UTF-8",
                                                        "invalid_json")
                continue
            if lineno == 1:
                text = text.lstrip("\ufeff")
            if text.strip():
                yield f"{path} line {lineno}", text


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
        return cls(meta["file"], tokens, trained, offsets, meta)


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
    tokenized.meta.update(sha256=file_digest, cache_key=key)  # what run_info.json records of the file
    return tokenized


def _build_entry(path: Path, entry: Path, tokenizer, encoder: Encoder, options: DataOptions,
                 num_workers: int | None, show_progress: bool) -> None:
    from tqdm import tqdm

    tmp = entry.with_name(f"{entry.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    size = path.stat().st_size
    bar = tqdm(total=size, unit="B", unit_scale=True, desc=f"tokenizing {path.name}", file=sys.stderr,
               disable=not show_progress or size < (1 << 20), mininterval=1 if sys.stderr.isatty() else 30)
    if num_workers is None:
        num_workers = min(len(os.sched_getaffinity(0)), 8)
    parallel = num_workers > 1 and size >= PARALLEL_MIN_BYTES
    started = time.perf_counter()
    totals = ChunkResult()
    offsets = [0]
    n_tokens = 0
    try:
        with open(tmp / "tokens.bin", "wb") as tok_f, open(tmp / "trained.bin", "wb") as lab_f:
            if parallel:
                import multiprocessing

                ctx = multiprocessing.get_context("spawn")
                pool = ctx.Pool(num_workers, initializer=_worker_init, initargs=(tokenizer, options))
                results = pool.imap(_worker_chunk, _chunks(path, bar.update))
            else:
                pool = None
                results = (tokenize_chunk(encoder, chunk, options) for chunk in _chunks(path, bar.update))
            try:
                for result in results:
                    if isinstance(result, PipellmError):
                        raise result
                    if result.lengths:
                        tok_f.write(np.concatenate(result.tokens).astype(np.int32).tobytes())
                        lab_f.write(np.concatenate(result.trained).astype(np.uint8).tobytes())
                    for length in result.lengths:
                        n_tokens += length
                        offsets.append(n_tokens)
                    totals.records += result.records
                    totals.truncated += result.truncated
                    totals.dropped += result.dropped
                    for reason, count in result.bad.items():
                        totals.bad[reason] = totals.bad.get(reason, 0) + count
                    totals.first_bad += result.first_bad[:5 - len(totals.first_bad)]
            finally:
                if pool is not None:
                    pool.terminate()
        bar.close()
        np.save(tmp / "offsets.npy", np.asarray(offsets, dtype=np.int64))
        n_trained = int(np.fromfile(tmp / "trained.bin", dtype=np.uint8).sum()) if n_tokens else 0
        seconds = time.perf_counter() - started
        meta = {"file": str(path), "records": totals.records, "samples": len(offsets) - 1, "tokens": n_tokens,
                "trained_tokens": n_trained, "truncated": totals.truncated, "dropped_overlong": totals.dropped,
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
        for chunk in _chunks(path, lambda n: None):
            part = tokenize_chunk(encoder, chunk, options)
            result.tokens += part.tokens
            result.trained += part.trained
            result.lengths += part.lengths
            result.truncated += part.truncated
            result.dropped += part.dropped
            result.records += sum(part.bad.values())
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
                            result.dropped, result.records)
