"""Records → samples: each record checked, encoded with the template, truncated or dropped when over-long.

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

import dataclasses
import json
import math
import os
import typing
from pathlib import Path

import numpy as np

from pipellm.config.schema import Overlong, Template
from pipellm.data.preference import encode_pairs, type_problem
from pipellm.data.records import BadRecord, check_record, iter_raw
from pipellm.data.templates import Encoder, TemplateError
from pipellm.errors import PipellmError

# Records handed to a tokenizing step (and a worker process) at a time.
CHUNK_RECORDS = 2048


@dataclasses.dataclass(frozen=True)
class DataOptions:
    """How records become samples (the data keys of the training config)."""

    max_seq_len: int
    template: Template = "auto"
    overlong: Overlong = "truncate"
    skip_bad_records: bool = False
    pairs: bool = False
    """A pairwise objective (dpo, reward): every record is a preference record, two samples each
    (``pipellm.data.preference``)."""

    def __post_init__(self):
        if self.max_seq_len < 2:
            raise PipellmError(f"max_seq_len is {self.max_seq_len}; it must be at least 2 (a context token and a "
                               f"target)")
        if self.overlong not in typing.get_args(Overlong):
            raise PipellmError(f"`overlong` must be truncate or drop, got {self.overlong!r}")



# ----- tokenizing records -----

class ChunkResult:
    """Samples of a chunk of records, flat, plus what was truncated, dropped or bad."""

    def __init__(self):
        self.tokens: list[np.ndarray] = []
        self.trained: list[np.ndarray] = []
        self.lengths: list[int] = []
        self.margins: list[float] = []
        """Per sample of a pair: its record's ``margin`` (NaN: none given)."""
        self.records = self.truncated = self.dropped = 0
        self.bad: dict[str, int] = {}
        self.first_bad: list[str] = []

    def add_counts(self, other: "ChunkResult") -> None:
        """Count ``other``'s records, truncated, dropped and bad records in this result too."""
        self.records += other.records
        self.truncated += other.truncated
        self.dropped += other.dropped
        for reason, count in other.bad.items():
            self.bad[reason] = self.bad.get(reason, 0) + count
        self.first_bad += other.first_bad[:5 - len(self.first_bad)]

    def add_bad(self, bad: BadRecord) -> None:
        self.bad[bad.reason] = self.bad.get(bad.reason, 0) + 1
        if len(self.first_bad) < 5:
            self.first_bad.append(str(bad))


def tokenize_chunk(encoder: Encoder, items: list[tuple[str, object]], options: DataOptions) -> ChunkResult:
    """Check, encode, truncate or drop a chunk of ``(where, raw JSON line / parsed record / BadRecord)``.

    Raises ``PipellmError`` at the first bad record unless ``options.skip_bad_records``.
    """
    out = ChunkResult()
    checked, wheres = _checked_records(items, options, out)

    def fit(ids, trained, where, field=None):
        return _fit(ids, trained, where, field, options, out)

    if options.pairs:
        for record, pair in zip(checked, encode_pairs(encoder, checked, wheres, fit)):
            if isinstance(pair, BadRecord):
                _bad(out, pair, options)
            elif pair is not None:
                for ids, trained in pair:
                    _add(out, ids, trained)
                out.margins += [record.get("margin", math.nan)] * 2
        return out
    for where, encoded in zip(wheres, encoder.encode_many(checked)):
        try:
            if isinstance(encoded, TemplateError):
                raise BadRecord(where, None, str(encoded), "chat_template")
            fitted = fit(*encoded, where)
        except BadRecord as bad:
            _bad(out, bad, options)
            continue
        if fitted is not None:
            _add(out, *fitted)
    return out


def _checked_records(items, options: DataOptions, out: ChunkResult) -> tuple[list[dict], list[str]]:
    """The chunk's records that pass ``check_record`` (and fit the objective), and where each is."""
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
            record = check_record(raw, where)
            wrong_type = type_problem(record, where, options.pairs)
            if wrong_type is not None:
                raise wrong_type
            checked.append(record)
            wheres.append(where)
        except BadRecord as bad:
            _bad(out, bad, options)
    return checked, wheres


def _fit(ids, trained, where: str, field: str | None, options: DataOptions, out: ChunkResult):
    """The sample truncated to ``max_seq_len`` (counted), or None when dropped as over-long; ``BadRecord`` when
    truncation leaves nothing to train on."""
    if len(ids) <= options.max_seq_len:
        return ids, trained
    if options.overlong == "drop":
        out.dropped += 1
        return None
    out.truncated += 1
    ids, trained = ids[:options.max_seq_len], trained[:options.max_seq_len]
    if not trained.any():
        raise BadRecord(where, field, f"nothing left to train on after truncation to max_seq_len "
                                      f"{options.max_seq_len} (the prompt alone is longer); raise max_seq_len or "
                                      f"shorten the prompt", "no_label_after_truncation")
    return ids, trained


def _add(out: ChunkResult, ids, trained) -> None:
    out.tokens.append(ids)
    out.trained.append(trained)
    out.lengths.append(len(ids))


def _bad(out: ChunkResult, bad: BadRecord, options: DataOptions) -> None:
    if not options.skip_bad_records:
        raise PipellmError(f"{bad}; fix the record or set `skip_bad_records: true` to skip bad records")
    out.add_bad(bad)


# Worker processes: each holds its own encoder (tokenizers are picklable; Rust threads are not shared).
_WORKER: tuple[Encoder, DataOptions] | None = None


def worker_init(tokenizer, options: DataOptions) -> None:
    global _WORKER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER = (Encoder(tokenizer, options.template), options)


def worker_chunk(items):
    encoder, options = _WORKER
    try:
        return tokenize_chunk(encoder, items, options)
    except PipellmError as e:
        return e


def chunks(path: Path, progress):
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
