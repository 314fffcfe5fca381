"""Tests for pipellm.data with the embedded tiny tokenizer: label masks, loading, truncation, padding, errors."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

from pipellm.data import (INSTRUCT_TEMPLATE, INSTRUCT_TEMPLATE_NO_INPUT, build_dataset, encode_record,
                          load_records, pad_token_id)
from pipellm.errors import PipellmError

ASSETS = Path(__file__).resolve().parents[1] / "pipellm" / "assets"
MODEL_DIR = ASSETS / "tiny_llama"
SAMPLE = ASSETS / "data" / "sample.jsonl"

PRETRAIN = {"type": "pretrain", "text": "The cat says meow. The dog says woof."}
INSTRUCT = {"type": "instruct", "instruct": "What is 3 plus 4?", "output": "7"}
INSTRUCT_INPUT = {"type": "instruct", "instruct": "Add the two numbers.", "input": "3 and 4", "output": "7"}


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(MODEL_DIR)


def write_jsonl(path: Path, lines: list) -> Path:
    """Write JSONL; a str item is written verbatim (to plant broken lines)."""
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


def write_json(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return path


def text_ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


# ----- encode_record: exact label masks -----

def test_pretrain_every_token_after_bos_is_labelled(tok):
    ids, labels = encode_record(PRETRAIN, tok)
    assert ids == [tok.bos_token_id] + text_ids(tok, PRETRAIN["text"]) + [tok.eos_token_id]
    assert labels == [-100] + ids[1:]
    assert tok.decode(ids[1:]) == PRETRAIN["text"] + "</s>"


@pytest.mark.parametrize("record, prompt", [
    (INSTRUCT, INSTRUCT_TEMPLATE_NO_INPUT.format(instruct="What is 3 plus 4?")),
    (INSTRUCT_INPUT, INSTRUCT_TEMPLATE.format(instruct="Add the two numbers.", input="3 and 4")),
    # An empty input means no input: no empty Input block in the prompt.
    ({**INSTRUCT, "input": ""}, INSTRUCT_TEMPLATE_NO_INPUT.format(instruct="What is 3 plus 4?")),
])
def test_instruct_prompt_masked_output_and_eos_labelled(tok, record, prompt):
    ids, labels = encode_record(record, tok)
    n_prompt = 1 + len(text_ids(tok, prompt))
    assert len(ids) == len(labels) == n_prompt + len(text_ids(tok, record["output"])) + 1
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids[1:n_prompt]) == prompt
    assert labels[:n_prompt] == [-100] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == tok.eos_token_id
    assert tok.decode([t for t in labels if t != -100]) == record["output"] + "</s>"


def test_template_has_input_block_only_with_input():
    assert "### Input:" in INSTRUCT_TEMPLATE and "### Input:" not in INSTRUCT_TEMPLATE_NO_INPUT
    assert INSTRUCT_TEMPLATE.format(instruct="I", input="X") == "### Instruction:\nI\n\n### Input:\nX\n\n### Response:\n"
    assert INSTRUCT_TEMPLATE_NO_INPUT.format(instruct="I") == "### Instruction:\nI\n\n### Response:\n"


def test_no_bos_when_tokenizer_has_none(tok):
    no_bos = SimpleNamespace(bos_token_id=None, eos_token_id=tok.eos_token_id,
                             encode=lambda text, add_special_tokens: text_ids(tok, text))
    ids, labels = encode_record(PRETRAIN, no_bos)
    assert ids == text_ids(tok, PRETRAIN["text"]) + [tok.eos_token_id]
    # The first token has nothing before it, so it is never a target.
    assert labels == [-100] + ids[1:]


def test_pad_token_id_fallbacks(tok):
    assert pad_token_id(tok) == tok.pad_token_id == 3
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=2)) == 2
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0


# ----- load_records -----

def test_json_list_and_jsonl_load_the_same(tmp_path):
    records = [PRETRAIN, INSTRUCT, INSTRUCT_INPUT]
    a = write_json(tmp_path / "a.json", records)
    # Extension does not matter, and blank lines in JSONL are skipped.
    b = write_jsonl(tmp_path / "b.txt", [PRETRAIN, "", INSTRUCT, "   ", INSTRUCT_INPUT])
    assert load_records(str(a)) == records
    assert load_records(b) == records


def test_several_files_in_order(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [PRETRAIN])
    b = write_json(tmp_path / "b.json", [INSTRUCT, INSTRUCT_INPUT])
    assert load_records([str(b), str(a)]) == [INSTRUCT, INSTRUCT_INPUT, PRETRAIN]


# ----- build_dataset -----

def test_padding_is_right_padding_with_pad_id(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [PRETRAIN, INSTRUCT_INPUT])
    ds = build_dataset(path, tok, max_seq_len=64)
    assert len(ds) == 2 and ds.n_truncated == 0 and ds.n_dropped == 0
    assert ds.input_ids.shape == ds.labels.shape == (2, 64)
    assert ds.input_ids.dtype == ds.labels.dtype == torch.int64
    for i, record in enumerate([PRETRAIN, INSTRUCT_INPUT]):
        ids, labels = encode_record(record, tok)
        n = len(ids)
        assert ds.lengths[i].item() == n
        assert ds.input_ids[i, :n].tolist() == ids and ds.labels[i, :n].tolist() == labels
        assert (ds.input_ids[i, n:] == tok.pad_token_id).all()
        assert (ds.labels[i, n:] == -100).all()
    assert ds.fill_ratio == pytest.approx(ds.lengths.sum().item() / 128)


def test_fill_ratio_value(tmp_path, tok):
    n_a = len(encode_record(PRETRAIN, tok)[0])
    n_b = len(encode_record(INSTRUCT, tok)[0])
    path = write_jsonl(tmp_path / "d.jsonl", [PRETRAIN, INSTRUCT])
    ds = build_dataset(path, tok, max_seq_len=40)
    assert ds.fill_ratio == pytest.approx((n_a + n_b) / 80)
    assert 0 < ds.fill_ratio < 1


def test_truncation_keeps_the_beginning(tmp_path, tok):
    long = {"type": "pretrain", "text": " ".join(["one two three four five six seven eight nine ten."] * 5)}
    full_ids, full_labels = encode_record(long, tok)
    max_len = 16
    assert len(full_ids) > max_len
    short = {"type": "pretrain", "text": "cat cat cat."}
    path = write_jsonl(tmp_path / "d.jsonl", [long, short])
    ds = build_dataset(path, tok, max_seq_len=max_len)
    assert len(ds) == 2 and ds.n_truncated == 1 and ds.n_dropped == 0
    assert ds.input_ids[0].tolist() == full_ids[:max_len]
    assert ds.labels[0].tolist() == full_labels[:max_len]
    assert ds.lengths[0].item() == max_len
    assert tok.eos_token_id not in ds.input_ids[0].tolist()  # the EOS was cut with the end
    assert ds.input_ids[1, :ds.lengths[1]].tolist() == encode_record(short, tok)[0]


def test_sample_without_trained_token_after_truncation_is_dropped(tmp_path, tok):
    # The prompt alone is longer than max_seq_len: nothing labelled survives.
    long_prompt = {"type": "instruct", "instruct": "Please tell me how this works and why it matters. " * 4,
                   "output": "ok"}
    kept = {"type": "pretrain", "text": "cat cat cat."}
    path = write_jsonl(tmp_path / "d.jsonl", [long_prompt, kept, long_prompt])
    ds = build_dataset(path, tok, max_seq_len=12)
    assert len(ds) == 1
    assert ds.n_dropped == 2 and ds.n_truncated == 2  # dropped samples were cut first, so they count as cut
    assert ds.input_ids[0, :ds.lengths[0]].tolist() == encode_record(kept, tok)[0]


def test_all_dropped_is_an_error(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{**INSTRUCT, "instruct": "Explain this. " * 20}])
    with pytest.raises(PipellmError, match="no trainable sample.*1 dropped"):
        build_dataset(path, tok, max_seq_len=8)


def test_embedded_sample_data_and_config_match_the_tokenizer(tok):
    ds = build_dataset(SAMPLE, tok, max_seq_len=128)
    assert len(ds) == 300 and ds.n_truncated == 0 and ds.n_dropped == 0
    kinds = {(r["type"], "input" in r) for r in load_records(SAMPLE)}
    assert kinds == {("pretrain", False), ("instruct", False), ("instruct", True)}
    config = AutoConfig.from_pretrained(MODEL_DIR)
    assert config.model_type == "llama" and config.vocab_size == len(tok)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 3)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 3)


# ----- errors: one line, naming the file and the line / record -----

def assert_error(paths, *fragments):
    with pytest.raises(PipellmError) as info:
        load_records(paths)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_unknown_type_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad_type.jsonl", [PRETRAIN, {"type": "chat", "text": "hi"}])
    assert_error(path, "bad_type.jsonl", "line 2", "'chat'", '"pretrain" or "instruct"')


def test_missing_field_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "no_output.jsonl", [PRETRAIN, INSTRUCT, {"type": "instruct", "instruct": "x"}])
    assert_error(path, "no_output.jsonl", "line 3", 'missing field "output"')
    path = write_jsonl(tmp_path / "no_type.jsonl", [{"text": "x"}])
    assert_error(path, "no_type.jsonl", "line 1", 'missing field "type"')


def test_missing_field_in_json_list_names_record_index(tmp_path):
    path = write_json(tmp_path / "list.json", [PRETRAIN, {"type": "pretrain"}])
    assert_error(path, "list.json", "record 1", 'missing field "text"')


def test_bad_json_line_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "broken.jsonl", [PRETRAIN, INSTRUCT, '{"type": "pretrain", "text": '])
    assert_error(path, "broken.jsonl", "line 3", "invalid JSON")


def test_bad_json_list_names_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n {"type": "pretrain", "text": "a"},\n {"type": "pretrain" "text": "b"}\n]\n')
    assert_error(path, "broken.json", "line 3", "invalid JSON")


def test_non_string_field_and_missing_file(tmp_path):
    path = write_jsonl(tmp_path / "num.jsonl", [{"type": "pretrain", "text": 5}])
    assert_error(path, "num.jsonl", "line 1", 'field "text" must be a string')
    assert_error(tmp_path / "nope.jsonl", "nope.jsonl", "cannot read")
