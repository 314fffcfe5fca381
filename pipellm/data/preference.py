"""Preference pairs (``objective: dpo`` / ``reward``): a ``preference`` record becomes two samples, chosen then
rejected, stored next to each other, so sample ``2k`` and ``2k + 1`` of a file are always a pair.

Each answer is rendered by the same templates as supervised data (built-in, the tokenizer's chat template or
ChatGLM3's format): the record's ``rounds`` followed by ``["ans", chosen]`` (resp. ``rejected``), as a
``conversation`` record (``ref_qa`` when it has a ``reference``). Of the label mask only the last trained run is
kept, which is the final answer (with its EOS / end-of-turn token): earlier answers of the conversation are
context, not part of the preference. The two samples are truncated and dropped together: when either loses every
label to truncation the record is a bad record naming that field, when either is over-long with ``overlong:
drop`` both are dropped.

Under a pairwise objective every record must be a preference record; under the others none may be (both are bad
records of field ``type``).
"""
from __future__ import annotations

import numpy as np

from pipellm.data.records import BadRecord

ANSWERS = ("chosen", "rejected")


def answer_records(record: dict) -> list[dict]:
    """The record rendered twice: its conversation followed by the chosen answer, then by the rejected one."""
    out = []
    for answer in ANSWERS:
        rendered = {"type": "ref_qa" if "reference" in record else "conversation",
                    "rounds": [*record["rounds"], ("ans", record[answer])]}
        if "reference" in record:
            rendered["reference"] = record["reference"]
        out.append(rendered)
    return out


def final_answer_only(trained: np.ndarray) -> np.ndarray:
    """``trained`` with only its last contiguous run of trained tokens kept (the final answer)."""
    positions = np.flatnonzero(trained)
    if not len(positions):
        return trained
    last = positions[-1]
    untrained_before = np.flatnonzero(~trained[:last + 1])
    start = untrained_before[-1] + 1 if len(untrained_before) else 0
    out = np.zeros_like(trained)
    out[start:last + 1] = True
    return out


def type_problem(record: dict, where: str, pairs: bool) -> BadRecord | None:
    """The bad record a record of the wrong kind for the objective is (None when it fits)."""
    is_pair = record["type"] == "preference"
    if is_pair == pairs:
        return None
    if pairs:
        return BadRecord(where, "type", f"is {record['type']!r}, but a pairwise objective (dpo, reward) trains on "
                                        f"preference records only; move the record to supervised data",
                         "not_preference")
    return BadRecord(where, "type", "preference records train with `objective: dpo` or `objective: reward`; set "
                                    "the objective or move the record out of this data", "preference_needs_dpo")


def encode_pairs(encoder, records: list[dict], wheres: list[str], fit) -> list:
    """Per record, the two ``(ids, trained)`` samples (chosen, rejected) fitted by ``fit(ids, trained, where,
    field)`` (which returns None for a dropped sample and raises ``BadRecord``), or the ``BadRecord`` / template
    error of the record, or None when the pair is dropped."""
    rendered = [r for record in records for r in answer_records(record)]
    encoded = encoder.encode_many(rendered)
    out = []
    for i, where in enumerate(wheres):
        pair = []
        try:
            for field, result in zip(ANSWERS, encoded[2 * i:2 * i + 2]):
                if isinstance(result, Exception):
                    raise BadRecord(where, field, str(result), "chat_template")
                ids, trained = result
                pair.append(fit(ids, final_answer_only(trained), where, field))
        except BadRecord as bad:
            out.append(bad)
            continue
        out.append(None if any(p is None for p in pair) else pair)
    return out
