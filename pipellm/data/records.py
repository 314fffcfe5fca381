"""The five record formats of the training data: reading JSON / JSONL files and checking every record.

One JSON object per record, in a JSON list file (``[{...}, {...}]``) or one per line in a JSONL file (any
extension; a file whose first non-blank character is ``[`` is a JSON list). Records of all formats may be mixed
in one file. Keys other than the ones below are ignored (keep ids or sources there).

* ``pretrain``: ``text`` -- every token is trained.
* ``instruct``: ``instruct``, optional ``input`` (leave the key out when there is none), ``output``.
* ``conversation``: ``rounds``, a list of ``["ask", text]`` / ``["ans", text]``; several asks may follow each
  other, and an answer need not follow the last ask.
* ``conver_has_api``: ``api_desc`` (text documenting the tools) and ``rounds`` that may also hold
  ``["ans-api", {"actions": [{"inner_thought", "api_name", "api_param", "api_res"}, ...], "ans": text}]``: the
  model learns the thoughts, the calls and the final answer, never the tool results (``api_res``).
  ``api_param`` and ``api_res`` may be strings or JSON values (written as compact JSON).
* ``ref_qa``: ``reference`` and ``rounds`` (as ``conversation``): answers grounded in the reference.
* ``preference`` (``objective: dpo`` or ``reward`` only): ``rounds`` (as ``conversation``, ending with an ask),
  ``chosen`` and ``rejected`` (the preferred and the dispreferred next answer, different texts), optional
  ``reference`` (rendered as in ``ref_qa``) and optional ``margin`` (a number >= 0: how much higher a reward model
  must score ``chosen``, in place of ``reward.margin``; ``objective: reward`` only). It becomes two samples, the
  conversation with each answer, of which only that last answer is trained (``pipellm.data.preference``).

A bad record is reported as ``BadRecord(where, field, problem)``: ``where`` is ``file line N`` (JSONL) or
``file record N`` (0-based index in a JSON list), ``field`` the path of the offending field
(``rounds[3][1].actions[0].api_name``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence, Union

from pipellm.errors import PipellmError

FORMATS = ("pretrain", "instruct", "conversation", "conver_has_api", "ref_qa", "preference")
#: Round roles each format accepts.
ROLES = {"conversation": ("ask", "ans"), "ref_qa": ("ask", "ans"), "conver_has_api": ("ask", "ans", "ans-api"),
         "preference": ("ask", "ans")}
ACTION_FIELDS = ("inner_thought", "api_name", "api_param", "api_res")
#: Required top-level string fields of each format (besides ``rounds``).
TEXT_FIELDS = {"pretrain": ("text",), "instruct": ("instruct", "output"), "conversation": (),
               "conver_has_api": ("api_desc",), "ref_qa": ("reference",), "preference": ("chosen", "rejected")}

PathArg = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]


DATA_SUFFIXES = (".json", ".jsonl")


def data_files(entry: str | os.PathLike) -> list[Path]:
    """The files a ``data_path`` entry names: the file itself, or a directory's ``*.json`` and ``*.jsonl`` files
    (not its subdirectories), sorted by name."""
    path = Path(entry)
    if not path.is_dir():
        return [path]
    files = sorted(p for p in path.iterdir() if p.suffix in DATA_SUFFIXES and p.is_file())
    if not files:
        raise PipellmError(f"data directory {path} holds no *.json or *.jsonl file; put the data files there or "
                           f"name the files themselves")
    return files


def as_path_list(paths: PathArg) -> list[Path]:
    """The data files of one path or a list of paths, directories expanded (``data_files``)."""
    entries = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    return [file for entry in entries for file in data_files(entry)]


def empty_file_error(path: Path) -> PipellmError:
    """A data file without a single record (empty, only whitespace, or ``[]``): an error even among several."""
    return PipellmError(f"data file {path} holds no records (it is empty or only whitespace); add records to it or "
                        f"leave it out of the data paths")


@dataclass
class BadRecord(Exception):
    """One record that cannot be trained on: where it is, which field, what is wrong (ending in the fix)."""

    where: str
    field: str | None
    problem: str
    reason: str = "invalid"
    """Short category for the skip counts: invalid_json, unknown_type, missing_field, wrong_type, empty, ..."""

    def __str__(self) -> str:
        field = f'field "{self.field}": ' if self.field else ""
        return f"{self.where}: {field}{self.problem}"


class _Problem(Exception):
    def __init__(self, field: str | None, problem: str, reason: str):
        super().__init__(problem)
        self.field, self.problem, self.reason = field, problem, reason


def _text(record: dict, key: str, path: str, *, required_nonempty: bool) -> str:
    if key not in record:
        raise _Problem(path, "missing; " + _HELP[record["type"]], "missing_field")
    value = record[key]
    if not isinstance(value, str):
        raise _Problem(path, f"must be a string, got {type(value).__name__}", "wrong_type")
    if required_nonempty and not value.strip():
        raise _Problem(path, "is empty; every answer needs text to train on (remove the record or fill it)",
                       "empty")
    return value


def _json_text(value, path: str) -> str:
    """``api_param`` / ``api_res``: a string as is, any other JSON value as compact JSON."""
    if isinstance(value, str):
        return value
    if value is None:
        raise _Problem(path, "must be a string or a JSON value, got null", "wrong_type")
    return json.dumps(value, ensure_ascii=False)


_HELP = {
    "pretrain": 'a pretrain record is {"type": "pretrain", "text": "..."}',
    "instruct": 'an instruct record is {"type": "instruct", "instruct": "...", "input": "..." (optional), '
                '"output": "..."}',
    "conversation": 'a conversation record is {"type": "conversation", "rounds": [["ask", "..."], ["ans", "..."]]}',
    "conver_has_api": 'a conver_has_api record is {"type": "conver_has_api", "api_desc": "...", "rounds": '
                      '[["ask", "..."], ["ans-api", {"actions": [...], "ans": "..."}]]}',
    "ref_qa": 'a ref_qa record is {"type": "ref_qa", "reference": "...", "rounds": [["ask", "..."], ["ans", "..."]]}',
    "preference": 'a preference record is {"type": "preference", "rounds": [["ask", "..."]], "chosen": "...", '
                  '"rejected": "..."}',
}


def _check_action(action, path: str) -> dict:
    if not isinstance(action, dict):
        raise _Problem(path, f"must be an object with {', '.join(ACTION_FIELDS)}, got {type(action).__name__}",
                       "wrong_type")
    out = {}
    for key in ("inner_thought", "api_name"):
        if key not in action:
            raise _Problem(f"{path}.{key}", "missing; each action has " + ", ".join(ACTION_FIELDS), "missing_field")
        if not isinstance(action[key], str):
            raise _Problem(f"{path}.{key}", f"must be a string, got {type(action[key]).__name__}", "wrong_type")
        out[key] = action[key]
    if not out["api_name"].strip():
        raise _Problem(f"{path}.api_name", "is empty; name the tool that was called", "empty")
    for key in ("api_param", "api_res"):
        if key not in action:
            raise _Problem(f"{path}.{key}", "missing; each action has " + ", ".join(ACTION_FIELDS), "missing_field")
        out[key] = _json_text(action[key], f"{path}.{key}")
    return out


def _check_rounds(record: dict) -> list[tuple[str, object]]:
    kind = record["type"]
    if "rounds" not in record:
        raise _Problem("rounds", "missing; " + _HELP[kind], "missing_field")
    rounds = record["rounds"]
    if not isinstance(rounds, list) or not rounds:
        raise _Problem("rounds", f"must be a non-empty list of [role, text] pairs; {_HELP[kind]}",
                       "wrong_type" if not isinstance(rounds, list) else "empty")
    roles = ROLES[kind]
    out = []
    for i, item in enumerate(rounds):
        path = f"rounds[{i}]"
        if not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str):
            raise _Problem(path, f"must be a [role, content] pair with role one of {list(roles)}, got "
                                 f"{json.dumps(item, ensure_ascii=False)[:60]}", "wrong_type")
        role, content = item
        if role not in roles:
            hint = " (ans-api rounds belong to conver_has_api records)" if role == "ans-api" else ""
            raise _Problem(f"{path}[0]", f"unknown role {role!r}; use one of {list(roles)}{hint}", "unknown_role")
        if role == "ans-api":
            if not isinstance(content, dict):
                raise _Problem(f"{path}[1]", 'must be an object {"actions": [...], "ans": "..."}', "wrong_type")
            actions = content.get("actions")
            if not isinstance(actions, list) or not actions:
                raise _Problem(f"{path}[1].actions", "must be a non-empty list of actions (use an \"ans\" round "
                               "when no tool was called)", "missing_field" if actions is None else "wrong_type")
            checked = [_check_action(a, f"{path}[1].actions[{j}]") for j, a in enumerate(actions)]
            ans = _text(content, "ans", f"{path}[1].ans", required_nonempty=True) if "ans" in content else None
            if ans is None:
                raise _Problem(f"{path}[1].ans", "missing; the final answer after the tool calls", "missing_field")
            out.append((role, {"actions": checked, "ans": ans}))
        else:
            if not isinstance(content, str):
                raise _Problem(f"{path}[1]", f"must be a string, got {type(content).__name__}", "wrong_type")
            if role == "ans" and not content.strip():
                raise _Problem(f"{path}[1]", "is an empty answer; every answer needs text to train on", "empty")
            out.append((role, content))
    if kind == "preference":
        if out[-1][0] != "ask":
            raise _Problem(f"rounds[{len(out) - 1}]", "must be an ask: a preference record's rounds end with the ask "
                           "that `chosen` and `rejected` answer", "wrong_type")
    elif not any(role != "ask" for role, _ in out):
        raise _Problem("rounds", "has no answer: nothing to train on; add an [\"ans\", ...] round", "empty")
    return out


def _check_preference(record: dict, out: dict) -> None:
    if out["chosen"].strip() == out["rejected"].strip():
        raise _Problem("rejected", "is the same text as `chosen`; a pair needs two different answers (remove the "
                                   "record or fix one answer)", "identical_answers")
    if record.get("reference") is not None:
        out["reference"] = _text(record, "reference", "reference", required_nonempty=False)
    margin = record.get("margin")
    if margin is not None:
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < float("inf"):
            raise _Problem("margin", f"must be a number >= 0, got {margin!r}; leave the key out for the config's "
                                     f"`reward.margin`", "wrong_type")
        out["margin"] = float(margin)


def normalize(record) -> dict:
    """The record with its fields checked (raises ``_Problem``); ``rounds`` as checked (role, content) tuples."""
    if not isinstance(record, dict):
        raise _Problem(None, f"expected a JSON object, got {type(record).__name__}", "wrong_type")
    if "type" not in record:
        raise _Problem("type", f"missing; add \"type\": one of {', '.join(FORMATS)}", "missing_field")
    kind = record["type"]
    if kind not in FORMATS:
        raise _Problem("type", f"unknown type {kind!r}; use one of {', '.join(FORMATS)}", "unknown_type")
    out = {"type": kind}
    for key in TEXT_FIELDS[kind]:
        out[key] = _text(record, key, key, required_nonempty=key in ("text", "output", "chosen", "rejected"))
    if kind == "preference":
        _check_preference(record, out)
    if kind == "instruct" and record.get("input") is not None:
        if not isinstance(record["input"], str):
            raise _Problem("input", f"must be a string, got {type(record['input']).__name__}; leave the key out "
                                    f"when there is no input", "wrong_type")
        if record["input"]:
            out["input"] = record["input"]
    if kind in ROLES:
        out["rounds"] = _check_rounds(record)
    return out


def check_record(record, where: str) -> dict:
    """``normalize`` with problems raised as ``BadRecord`` naming ``where``."""
    try:
        return normalize(record)
    except _Problem as p:
        raise BadRecord(where, p.field, p.problem, p.reason) from None


def iter_raw(path: Path) -> Iterator[tuple[str, object]]:
    """``(where, parsed JSON or BadRecord)`` for each record of one file, streaming JSONL line by line.

    An unreadable file or an invalid JSON list raises ``PipellmError`` (nothing of it can be trained on); an
    invalid JSONL line yields a ``BadRecord`` (the other lines are fine).
    """
    try:
        handle = path.open("r", encoding="utf-8")
    except OSError as e:
        raise PipellmError(f"{path}: cannot read data file ({e.strerror}); pass an existing UTF-8 JSON or JSONL "
                           f"file") from None
    with handle:
        try:
            first = ""
            while not first:
                line = handle.readline()
                if not line:
                    return
                first = line.strip()
            if first.startswith("["):
                text = line + handle.read()
                try:
                    records = json.loads(text)
                except json.JSONDecodeError as e:
                    raise PipellmError(f"{path} line {e.lineno}: invalid JSON ({e.msg}); fix the JSON list or "
                                       f"write one JSON object per line (JSONL)") from None
                if not isinstance(records, list):
                    raise PipellmError(f"{path}: the top level must be a list of records")
                for i, record in enumerate(records):
                    yield f"{path} record {i}", record
                return
            lineno = 0
            while line:
                lineno += 1
                if line.strip():
                    try:
                        yield f"{path} line {lineno}", json.loads(line)
                    except json.JSONDecodeError as e:
                        yield f"{path} line {lineno}", BadRecord(
                            f"{path} line {lineno}", None, f"invalid JSON ({e.msg}); a JSONL file holds exactly one "
                            f"JSON object per line", "invalid_json")
                line = handle.readline()
        except UnicodeDecodeError as e:
            raise PipellmError(f"{path}: not UTF-8 ({e.reason} at byte {e.start}); save the file as UTF-8") from None


def iter_records(path: Path) -> Iterator[tuple[str, dict | BadRecord]]:
    """``(where, checked record or BadRecord)`` for each record of one file."""
    for where, raw in iter_raw(path):
        if isinstance(raw, BadRecord):
            yield where, raw
            continue
        try:
            yield where, check_record(raw, where)
        except BadRecord as bad:
            yield where, bad


def load_records(paths: PathArg, skip_bad_records: bool = False) -> list[dict]:
    """Read and check every record of one or more files, in file order (small data, tests; training streams)."""
    path_list = as_path_list(paths)
    if not path_list:
        raise PipellmError("no data files given; pass at least one JSON or JSONL file")
    out = []
    for path in path_list:
        for where, record in iter_records(path):
            if isinstance(record, BadRecord):
                if skip_bad_records:
                    continue
                raise PipellmError(f"{record}; fix the record or set `skip_bad_records: true`")
            out.append(record)
    return out
