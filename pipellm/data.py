"""Training data: read JSON / JSONL records, tokenize them with label masks, pad them into fixed-size tensors.

Two record types are understood (one JSON object each, in a JSON list file or one per line in a JSONL file):

* ``{"type": "pretrain", "text": "..."}`` -- every token of the text is trained.
* ``{"type": "instruct", "instruct": "...", "input": "...", "output": "..."}`` -- ``input`` is optional. The
  prompt is built with :data:`INSTRUCT_TEMPLATE` (or :data:`INSTRUCT_TEMPLATE_NO_INPUT`); only the output and
  the EOS that ends it are trained, the prompt's labels are ``-100``.

Keys other than these are ignored. A bad file, line or record raises :class:`~pipellm.errors.PipellmError`
with a one-line message naming the file, the line (JSONL) or record index (JSON list) and the fix.

Sequences are ``[BOS] tokens [EOS]``, truncated at ``max_seq_len`` (keeping the beginning) and right-padded:
the model relies on right padding, where causal attention makes padding invisible to the real tokens.
Labels are *aligned* with ``input_ids`` (``labels[t]`` is ``input_ids[t]`` or ``-100``); the training loop
shifts them for next-token prediction. Because the first token of a row is never a prediction target (nothing
precedes it), its label is always ``-100``, so "has a trained token" means "contributes to the loss".
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import torch
from tqdm import tqdm

from pipellm.errors import PipellmError

IGNORE_INDEX = -100

#: Built-in Alpaca-style prompt for ``instruct`` records that have an ``input``; the output follows the prompt.
INSTRUCT_TEMPLATE = "### Instruction:\n{instruct}\n\n### Input:\n{input}\n\n### Response:\n"
#: The same prompt without the Input block, for records with no ``input`` (absent, null or empty).
INSTRUCT_TEMPLATE_NO_INPUT = "### Instruction:\n{instruct}\n\n### Response:\n"

# Required string fields per record type.
_FIELDS = {"pretrain": ("text",), "instruct": ("instruct", "output")}
_HELP = ('records look like {"type": "pretrain", "text": ...} '
         'or {"type": "instruct", "instruct": ..., "output": ...}')
# Below this many records the progress bar would only flash by.
_PROGRESS_MIN_RECORDS = 1000

PathArg = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]


def _record_problem(record) -> str | None:
    """What is wrong with a record (a message ending in the fix), or None if it is valid."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}; {_HELP}"
    if "type" not in record:
        return 'missing field "type"; add "type": "pretrain" or "type": "instruct"'
    kind = record["type"]
    if kind not in _FIELDS:
        return f'unknown type {kind!r}; use "pretrain" or "instruct" (this version reads only these two)'
    for key in _FIELDS[kind]:
        if key not in record:
            return f'missing field "{key}" in a {kind} record; {_HELP}'
        if not isinstance(record[key], str):
            return f'field "{key}" must be a string, got {type(record[key]).__name__}'
    if kind == "instruct" and not isinstance(record.get("input", ""), (str, type(None))):
        return f'field "input" must be a string, got {type(record["input"]).__name__}; omit it when there is none'
    return None


def _read_file(path: Path) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PipellmError(f"{path}: cannot read data file ({e}); "
                           f"pass an existing UTF-8 JSON or JSONL file") from None

    # A JSON list starts with "["; anything else is read as JSONL, whatever the file's extension.
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise PipellmError(f"{path} line {e.lineno}: invalid JSON ({e.msg}); fix the JSON list "
                               f"or write one JSON object per line (JSONL)") from None
        located = [(f"record {i} (0-based index in the JSON list)", r) for i, r in enumerate(records)]
    else:
        located = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                located.append((f"line {lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise PipellmError(f"{path} line {lineno}: invalid JSON ({e.msg}); a JSONL file holds exactly "
                                   f"one JSON object per line") from None

    for where, record in located:
        problem = _record_problem(record)
        if problem:
            raise PipellmError(f"{path} {where}: {problem}")
    return [record for _, record in located]


def _as_path_list(paths: PathArg) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        return [Path(paths)]
    return [Path(p) for p in paths]


def load_records(paths: PathArg) -> list[dict]:
    """Read and validate the records of one or more JSON-list / JSONL files, in file order."""
    path_list = _as_path_list(paths)
    if not path_list:
        raise PipellmError("no data files given; pass at least one JSON or JSONL file")
    return [record for path in path_list for record in _read_file(path)]


def _format_prompt(record: dict) -> str:
    if record.get("input"):
        return INSTRUCT_TEMPLATE.format(instruct=record["instruct"], input=record["input"])
    return INSTRUCT_TEMPLATE_NO_INPUT.format(instruct=record["instruct"])


def encode_record(record: dict, tokenizer) -> tuple[list[int], list[int]]:
    """Token ids and aligned labels (``-100`` where not trained) of one record, not truncated.

    The prompt and the trained part are tokenized separately and their ids concatenated, so the boundary
    between ``-100`` and trained labels is exact. ``add_special_tokens=False`` because BOS and EOS are added
    here, once, whatever the tokenizer's own post-processing would do.
    """
    problem = _record_problem(record)
    if problem:
        raise PipellmError(f"invalid record: {problem}")
    if tokenizer.eos_token_id is None:
        raise PipellmError("the tokenizer has no EOS token; use a tokenizer that defines eos_token")

    if record["type"] == "pretrain":
        prompt_ids: list[int] = []
        answer_ids = tokenizer.encode(record["text"], add_special_tokens=False)
    else:
        prompt_ids = tokenizer.encode(_format_prompt(record), add_special_tokens=False)
        answer_ids = tokenizer.encode(record["output"], add_special_tokens=False)
    if tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    answer_ids = answer_ids + [tokenizer.eos_token_id]

    input_ids = prompt_ids + answer_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    labels[0] = IGNORE_INDEX  # never a target: nothing precedes the first token (matters only without BOS)
    return input_ids, labels


def pad_token_id(tokenizer) -> int:
    """The id used for right padding: the tokenizer's pad token, else its EOS, else 0 (labels mask it anyway)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


@dataclass
class TokenizedDataset:
    """All samples as fixed-shape tensors, ready to be batched by row index."""

    input_ids: torch.Tensor  # [n, max_seq_len] int64, right-padded with pad_token_id(tokenizer)
    labels: torch.Tensor  # [n, max_seq_len] int64, aligned with input_ids; -100 on prompt, first token, padding
    lengths: torch.Tensor  # [n] int64, number of non-pad tokens of each row
    n_truncated: int  # samples longer than max_seq_len, cut to their first max_seq_len tokens (dropped ones too)
    n_dropped: int  # samples left without a trained token by truncation, not in the tensors

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def fill_ratio(self) -> float:
        """Share of non-pad tokens among all tokens: how much of each batch is real work."""
        return self.lengths.sum().item() / max(self.input_ids.numel(), 1)


def build_dataset(paths: PathArg, tokenizer, max_seq_len: int) -> TokenizedDataset:
    """Load, encode, truncate and right-pad every record of ``paths`` into a :class:`TokenizedDataset`."""
    if max_seq_len < 2:
        raise PipellmError(f"max_seq_len is {max_seq_len}; it must be at least 2 (a context token and a target)")
    records = load_records(paths)

    rows: list[tuple[list[int], list[int]]] = []
    n_truncated = n_dropped = 0
    for record in tqdm(records, desc="tokenizing", unit="rec", disable=len(records) < _PROGRESS_MIN_RECORDS):
        input_ids, labels = encode_record(record, tokenizer)
        if len(input_ids) > max_seq_len:
            n_truncated += 1
            input_ids, labels = input_ids[:max_seq_len], labels[:max_seq_len]
        # Such a sample would only add 0 to the loss and 0 to its token count.
        if all(label == IGNORE_INDEX for label in labels):
            n_dropped += 1
            continue
        rows.append((input_ids, labels))

    if not rows:
        raise PipellmError(f"no trainable sample in {[str(p) for p in _as_path_list(paths)]} "
                           f"({n_dropped} dropped by truncation); add data or raise max_seq_len")

    input_tensor = torch.full((len(rows), max_seq_len), pad_token_id(tokenizer), dtype=torch.long)
    label_tensor = torch.full((len(rows), max_seq_len), IGNORE_INDEX, dtype=torch.long)
    lengths = torch.empty(len(rows), dtype=torch.long)
    for i, (input_ids, labels) in enumerate(rows):
        input_tensor[i, :len(input_ids)] = torch.tensor(input_ids, dtype=torch.long)
        label_tensor[i, :len(labels)] = torch.tensor(labels, dtype=torch.long)
        lengths[i] = len(input_ids)
    return TokenizedDataset(input_ids=input_tensor, labels=label_tensor, lengths=lengths,
                            n_truncated=n_truncated, n_dropped=n_dropped)
