"""Records, templates and label masks: for every format, the labelled tokens are exactly the model's own words.

Three tokenizers: the embedded byte-level BPE (built-in templates), a sentencepiece model trained here, and
tokenizers with a chat template (ChatML-style; one that rejects system and tool roles; a slow one without
offsets). Labelled spans are decoded and compared with the answers the record holds.
"""
from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoTokenizer

from pipellm.data.cache import build_dataset, pad_token_id
from pipellm.errors import PipellmError
from pipellm.data.records import FORMATS, load_records, normalize
from pipellm.data import IGNORE_INDEX
from pipellm.data.builtin_template import (ACTION_TEMPLATE, INSTRUCT_TEMPLATE, INSTRUCT_TEMPLATE_NO_INPUT,
                                          builtin_segments)
from pipellm.data.templates import Encoder

ASSETS = Path(__file__).resolve().parents[1] / "pipellm" / "assets"
MODEL_DIR = ASSETS / "tiny_llama"
DATA = ASSETS / "data"
SAMPLE = DATA / "sample.jsonl"

PRETRAIN = {"type": "pretrain", "text": "The cat says meow. The dog says woof."}
INSTRUCT = {"type": "instruct", "instruct": "What is 3 plus 4?", "output": "7"}
INSTRUCT_INPUT = {"type": "instruct", "instruct": "Add the two numbers.", "input": "3 and 4", "output": "7"}
# The answers repeat text of the prompt on purpose: a mask found by searching for the answer would go wrong.
CONVERSATION = {"type": "conversation", "rounds": [
    ["ask", "hello"], ["ans", "hello"], ["ask", "what is 3 plus 4?"], ["ask", "and 3 plus 4?"],
    ["ans", "3 plus 4 is 7"], ["ask", "thanks"]]}
API = {"type": "conver_has_api", "api_desc": "search: find a word.\nParameters: {\"q\": \"string\"}", "rounds": [
    ["ask", "hi"], ["ans", "hi"], ["ask", "find cat"],
    ["ans-api", {"actions": [
        {"inner_thought": "search for cat", "api_name": "search", "api_param": "{\"q\": \"cat\"}",
         "api_res": "cat: meow"},
        {"inner_thought": "search again", "api_name": "search", "api_param": {"q": "dog"},
         "api_res": {"dog": "woof"}}],
        "ans": "The cat says meow."}],
    ["ask", "ok"], ["ans", "ok"]]}
REF_QA = {"type": "ref_qa", "reference": "The sky is blue. The grass is green.",
          "rounds": [["ask", "What colour is the sky?"], ["ans", "The sky is blue."], ["ask", "And the grass?"],
                     ["ans", "green"]]}
CHINESE = {"type": "conversation", "rounds": [["ask", "你好"], ["ans", "你好，有什么可以帮你？"], ["ask", "明天星期几？"],
                                              ["ans", "星期四。"]]}
RECORDS = [PRETRAIN, INSTRUCT, INSTRUCT_INPUT, CONVERSATION, API, REF_QA, CHINESE]

CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Only user and assistant, strictly alternating, like Llama-2's template.
STRICT = ("{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}{{ raise_exception('roles must be "
          "user/assistant') }}{% endif %}{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception("
          "'roles must alternate') }}{% endif %}{% if m.role == 'user' %}[INST] {{ m.content }} [/INST]{% else %}"
          " {{ m.content }}</s>{% endif %}{% endfor %}")


def expected_runs(record: dict, end: str) -> list[str]:
    """The trained text of a record, run by run (a run: consecutive trained tokens), ``end`` closing each turn."""
    kind = record["type"]
    if kind == "pretrain":
        return [record["text"] + end]
    if kind == "instruct":
        return [record["output"] + end]
    runs = []
    for role, content in normalize(record)["rounds"]:
        if role == "ans":
            runs.append(content + end)
        elif role == "ans-api":
            runs += [ACTION_TEMPLATE.format(**a) + end for a in content["actions"]] + [content["ans"] + end]
    return runs


def trained_runs(ids: list[int], trained: list[bool]) -> list[list[int]]:
    runs, current = [], []
    for token, flag in zip(ids, trained):
        if flag:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(MODEL_DIR)


def chat_tokenizer(template: str):
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = template
    return tokenizer


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    """A sentencepiece BPE model trained on a few lines, saved as a Llama tokenizer directory."""
    import sentencepiece as spm

    corpus = [json.dumps(r, ensure_ascii=False) for r in RECORDS] * 20 + list(map(str, range(100)))
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=model, vocab_size=500,
                                   model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=3, byte_fallback=True,
                                   character_coverage=1.0, minloglevel=2)
    path = tmp_path_factory.mktemp("sp")
    (path / "tokenizer.model").write_bytes(model.getvalue())
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "<pad>", "add_bos_token": True}))
    return path


def write_jsonl(path: Path, lines: list) -> Path:
    """Write JSONL; a str item is written verbatim (to plant broken lines)."""
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)) + "\n"
                            for x in lines), encoding="utf-8")
    return path


def write_json(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records, indent=1, ensure_ascii=False), encoding="utf-8")
    return path


# ----- built-in templates: exact masks -----

@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r["type"])
def test_builtin_masks_are_the_answers(tok, record):
    encoder = Encoder(tok, "auto")
    assert encoder.template == "builtin"  # the tiny tokenizer has no chat template
    ids, trained = encoder.encode(normalize(record))
    assert ids[0] == tok.bos_token_id and not trained[0]
    runs = [tok.decode(run) for run in trained_runs(ids, trained)]
    assert runs == expected_runs(record, "</s>")
    # The untrained tokens are the template, the prompts, the user turns and the tool results.
    untrained = tok.decode([t for t, m in zip(ids, trained) if not m], skip_special_tokens=True)
    for role, content in normalize(record).get("rounds", []):
        if role == "ask":
            assert content in untrained
        if role == "ans-api":
            assert all(a["api_res"] in untrained for a in content["actions"])


def test_builtin_template_text(tok):
    segments = builtin_segments(normalize(API))
    text = "".join(s if isinstance(s, str) else "<EOS>" for s, _ in segments)
    assert text == (
        "### Tools:\nsearch: find a word.\nParameters: {\"q\": \"string\"}\n\n"
        "### User:\nhi\n\n### Assistant:\nhi<EOS>"
        "### User:\nfind cat\n\n### Assistant:\nThought: search for cat\nAction: search\nAction Input: {\"q\": \"cat\"}"
        "\n<EOS>Observation: cat: meow\nThought: search again\nAction: search\nAction Input: {\"q\": \"dog\"}\n<EOS>"
        "Observation: {\"dog\": \"woof\"}\nThe cat says meow.<EOS>### User:\nok\n\n### Assistant:\nok<EOS>")
    assert INSTRUCT_TEMPLATE.format(instruct="I", input="X") == \
        "### Instruction:\nI\n\n### Input:\nX\n\n### Response:\n"
    assert INSTRUCT_TEMPLATE_NO_INPUT.format(instruct="I") == "### Instruction:\nI\n\n### Response:\n"


@pytest.mark.parametrize("record, prompt", [
    (INSTRUCT, INSTRUCT_TEMPLATE_NO_INPUT.format(instruct="What is 3 plus 4?")),
    (INSTRUCT_INPUT, INSTRUCT_TEMPLATE.format(instruct="Add the two numbers.", input="3 and 4")),
    ({**INSTRUCT, "input": ""}, INSTRUCT_TEMPLATE_NO_INPUT.format(instruct="What is 3 plus 4?")),  # empty = none
])
def test_instruct_prompt_and_labels(tok, record, prompt):
    ids, labels = Encoder(tok).labels(normalize(record))
    n_prompt = 1 + len(tok.encode(prompt, add_special_tokens=False))
    assert tok.decode(ids[1:n_prompt]) == prompt
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == tok.eos_token_id


def test_bos_follows_the_tokenizer(tok):
    no_bos = copy.deepcopy(tok)
    no_bos.backend_tokenizer.post_processor = None  # this tokenizer adds nothing in front of a text
    ids, trained = Encoder(no_bos).encode(normalize(PRETRAIN))
    assert ids == tok.encode(PRETRAIN["text"], add_special_tokens=False) + [tok.eos_token_id]
    assert trained == [False] + [True] * (len(ids) - 1)  # the first token is never a target


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r["type"])
def test_sentencepiece_masks(sp_dir, record):
    sp = AutoTokenizer.from_pretrained(sp_dir)
    encoder = Encoder(sp, "builtin")
    ids, trained = encoder.encode(normalize(record))
    assert ids[0] == sp.bos_token_id == 1
    runs = trained_runs(ids, trained)
    expected = expected_runs(record, "")
    assert len(runs) == len(expected)
    for run, text in zip(runs, expected):
        assert run[-1] == sp.eos_token_id
        # sentencepiece marks the start of each separately encoded piece with a space
        assert sp.decode(run, skip_special_tokens=True).strip() == text.strip()


# ----- chat templates -----

@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r["type"])
def test_chat_template_masks_are_the_answers(record):
    tokenizer = chat_tokenizer(CHATML)
    encoder = Encoder(tokenizer, "auto")
    assert encoder.template == "chat"
    ids, trained = encoder.encode(normalize(record))
    runs = [tokenizer.decode(run) for run in trained_runs(ids, trained)]
    if record["type"] == "pretrain":
        assert runs == [record["text"] + "</s>"]
        return
    # Each tool call is an assistant message of its own: no trailing newline inside the message.
    expected = [r.replace("\n<|im_end|>", "<|im_end|>") for r in expected_runs(record, "<|im_end|>")]
    assert runs == expected
    # Tokens are those of the template's own rendering, tokenized as a whole.
    from pipellm.data.chat_template import chat_messages

    messages = chat_messages(normalize(record), encoder._chat)
    plain = [{k: v for k, v in m.items() if k in ("role", "content", "name")} for m in messages]
    rendered = tokenizer.apply_chat_template(plain, tokenize=False)
    assert ids == tokenizer.encode(rendered, add_special_tokens=False)
    assert encoder.stop_token_ids() == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_chat_template_roles(tok):
    chatml = Encoder(chat_tokenizer(CHATML), "chat")
    assert chatml._chat.has_system_role and chatml._chat.has_tool_role
    strict_tok = chat_tokenizer(STRICT)
    strict = Encoder(strict_tok, "chat")
    assert not strict._chat.has_system_role and not strict._chat.has_tool_role
    # Context goes into the first user message; tool results become user "Observation:" messages; consecutive
    # asks are joined, so the roles alternate.
    ids, trained = strict.encode(normalize(API))
    text = strict_tok.decode(ids)
    assert text.startswith("[INST] You can call these tools:\nsearch: find a word.")
    assert "[INST] Observation: cat: meow [/INST]" in text
    runs = [strict_tok.decode(r).strip() for r in trained_runs(ids, trained)]
    assert runs == [r.strip().replace("\n</s>", "</s>") for r in expected_runs(API, "</s>")]
    ids, trained = strict.encode(normalize(CONVERSATION))
    assert "[INST] what is 3 plus 4?\n\nand 3 plus 4? [/INST]" in strict_tok.decode(ids)


def test_chat_template_without_offsets(sp_dir):
    """A slow (python) tokenizer gives no character offsets: the pieces between span boundaries are tokenized
    apart, and the masks are still the answers."""
    from transformers import SentencePieceBackend

    slow = SentencePieceBackend(vocab_file=str(sp_dir / "tokenizer.model"), bos_token="<s>", eos_token="</s>",
                                unk_token="<unk>", pad_token="<pad>")
    slow.chat_template = STRICT
    assert not slow.is_fast
    encoder = Encoder(slow, "chat")
    ids, trained = encoder.encode(normalize(CONVERSATION))
    runs = [slow.decode(r, skip_special_tokens=True).strip() for r in trained_runs(ids, trained)]
    assert runs == ["hello", "3 plus 4 is 7"]


def test_template_choice(tok):
    assert Encoder(chat_tokenizer(CHATML), "builtin").template == "builtin"
    with pytest.raises(PipellmError, match="no chat template"):
        Encoder(tok, "chat")
    with pytest.raises(PipellmError, match="template"):
        Encoder(tok, "alpaca")


@pytest.mark.parametrize("make", ["builtin", "chat"])
@pytest.mark.parametrize("record", [INSTRUCT, CONVERSATION, REF_QA, API], ids=lambda r: r["type"])
def test_generation_prompt_is_what_training_saw(tok, make, record):
    """The demo's prompt for the last answer is exactly the training tokens before that answer."""
    tokenizer = tok if make == "builtin" else chat_tokenizer(CHATML)
    encoder = Encoder(tokenizer, make)
    full = normalize(record)
    ids, trained = encoder.encode(full)
    if full["type"] == "instruct":
        prompt_record = {k: v for k, v in full.items() if k != "output"}
    else:
        rounds = list(full["rounds"])
        while rounds[-1][0] == "ask":
            rounds.pop()
        full = {**full, "rounds": rounds}
        ids, trained = encoder.encode(full)
        prompt_record = {**full, "rounds": rounds[:-1]}
    prompt = encoder.prompt_ids(prompt_record)
    last_run_start = max(i for i in range(1, len(ids)) if trained[i] and not trained[i - 1])
    assert prompt == ids[:last_run_start]


# ----- records: reading and checking -----

def test_json_list_and_jsonl_read_alike(tmp_path):
    a = write_json(tmp_path / "a.json", RECORDS)
    b = write_jsonl(tmp_path / "b.txt", [RECORDS[0], "", *RECORDS[1:3], "   ", *RECORDS[3:]])  # blank lines skipped
    assert load_records(a) == load_records(str(b)) == [normalize(r) for r in RECORDS]
    assert load_records([str(b), a])[len(RECORDS):] == load_records(a)


def test_every_example_file_holds_its_format(tok):
    for kind in FORMATS:
        records = load_records(DATA / f"{kind}.jsonl")
        assert records and {r["type"] for r in records} == {kind}
        text = json.dumps(records, ensure_ascii=False)
        assert any("\u4e00" <= ch <= "\u9fff" for ch in text), f"{kind}: no Chinese example"
        assert any(ch.isascii() and ch.isalpha() for ch in text)


def test_embedded_sample_data_and_config_match_the_tokenizer(tok):
    ds = build_dataset(SAMPLE, tok, max_seq_len=128)
    assert len(ds) == 300 and ds.n_truncated == 0 and ds.n_dropped == 0
    config = AutoConfig.from_pretrained(MODEL_DIR)
    assert config.model_type == "llama" and config.vocab_size == len(tok)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 3) == \
        (config.bos_token_id, config.eos_token_id, config.pad_token_id)
    assert pad_token_id(tok) == 3


def test_build_dataset_pads_right_and_counts(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [PRETRAIN, INSTRUCT_INPUT])
    ds = build_dataset(path, tok, max_seq_len=64)
    for i, record in enumerate([PRETRAIN, INSTRUCT_INPUT]):
        ids, labels = Encoder(tok).labels(normalize(record))
        n = len(ids)
        assert ds.lengths[i] == n and ds.input_ids[i, :n].tolist() == ids and ds.labels[i, :n].tolist() == labels
        assert (ds.input_ids[i, n:] == tok.pad_token_id).all() and (ds.labels[i, n:] == IGNORE_INDEX).all()
    assert ds.fill_ratio == pytest.approx(ds.lengths.sum().item() / 128)


def test_truncation_keeps_the_beginning_and_drop_drops(tmp_path, tok):
    long = {"type": "pretrain", "text": " ".join(["one two three four five six seven eight nine ten."] * 5)}
    short = {"type": "pretrain", "text": "cat cat cat."}
    full_ids, full_labels = Encoder(tok).labels(normalize(long))
    path = write_jsonl(tmp_path / "d.jsonl", [long, short])
    ds = build_dataset(path, tok, max_seq_len=16)
    assert len(ds) == 2 and ds.n_truncated == 1 and ds.n_dropped == 0
    assert ds.input_ids[0].tolist() == full_ids[:16] and ds.labels[0].tolist() == full_labels[:16]
    assert tok.eos_token_id not in ds.input_ids[0].tolist()  # the cut answer is not taught to stop
    dropped = build_dataset(path, tok, max_seq_len=16, overlong="drop")
    assert len(dropped) == 1 and dropped.n_dropped == 1 and dropped.n_truncated == 0


# ----- bad input: an error naming file:line (or record index) and field, or skipped and counted -----

BAD_CASES = {
    "invalid_json": ('{"type": "pretrain", "text": ', "line 2", "invalid JSON"),
    "unknown_type": ({"type": "chat", "text": "hi"}, "line 2", "unknown type 'chat'"),
    "missing_type": ({"text": "hi"}, "line 2", 'field "type": missing'),
    "missing_output": ({"type": "instruct", "instruct": "x"}, "line 2", 'field "output": missing'),
    "mistyped_text": ({"type": "pretrain", "text": 5}, "line 2", 'field "text": must be a string, got int'),
    "mistyped_input": ({**INSTRUCT, "input": ["a"]}, "line 2", 'field "input": must be a string'),
    "empty_output": ({**INSTRUCT, "output": "  "}, "line 2", 'field "output": is empty'),
    "empty_answer": ({"type": "conversation", "rounds": [["ask", "hi"], ["ans", ""]]}, "line 2",
                     'field "rounds[1][1]": is an empty answer'),
    "no_answer": ({"type": "conversation", "rounds": [["ask", "hi"]]}, "line 2", 'field "rounds": has no answer'),
    "bad_role": ({"type": "conversation", "rounds": [["ask", "hi"], ["ans-api", {}]]}, "line 2",
                 "rounds[1][0]\": unknown role 'ans-api'"),
    "bad_round": ({"type": "ref_qa", "reference": "r", "rounds": [["ask"]]}, "line 2", 'field "rounds[0]"'),
    "action_field": ({**API, "rounds": [["ask", "x"], ["ans-api", {"actions": [
        {"inner_thought": "t", "api_name": 3, "api_param": "p", "api_res": "r"}], "ans": "a"}]]}, "line 2",
        'field "rounds[1][1].actions[0].api_name": must be a string, got int'),
    "missing_api_res": ({**API, "rounds": [["ask", "x"], ["ans-api", {"actions": [
        {"inner_thought": "t", "api_name": "s", "api_param": "p"}], "ans": "a"}]]}, "line 2",
        'actions[0].api_res": missing'),
    "missing_desc": ({"type": "conver_has_api", "rounds": [["ask", "x"], ["ans", "y"]]}, "line 2",
                     'field "api_desc": missing'),
    "not_object": ([1, 2], "line 2", "expected a JSON object"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_record_names_file_line_and_field(tmp_path, tok, case):
    bad, where, fragment = BAD_CASES[case]
    path = write_jsonl(tmp_path / f"{case}.jsonl", [PRETRAIN, bad, INSTRUCT])
    with pytest.raises(PipellmError) as info:
        build_dataset(path, tok, max_seq_len=64)
    message = str(info.value)
    assert "\n" not in message and f"{case}.jsonl {where}" in message and fragment in message, message
    assert "skip_bad_records" in message
    # With skip_bad_records the two good records remain and the bad one is counted.
    ds = build_dataset(path, tok, max_seq_len=64, skip_bad_records=True)
    assert len(ds) == 2 and ds.n_bad == 1


def test_bad_record_in_json_list_names_its_index(tmp_path, tok):
    path = write_json(tmp_path / "list.json", [PRETRAIN, INSTRUCT, {"type": "pretrain"}])
    with pytest.raises(PipellmError, match=r"list.json record 2: field \"text\": missing"):
        build_dataset(path, tok, max_seq_len=64)
    broken = tmp_path / "broken.json"
    broken.write_text('[\n {"type": "pretrain", "text": "a"},\n {"type": "pretrain" "text": "b"}\n]\n')
    with pytest.raises(PipellmError, match="broken.json line 3: invalid JSON"):
        build_dataset(broken, tok, max_seq_len=64)


def test_all_labels_masked_after_truncation(tmp_path, tok):
    long_prompt = {"type": "instruct", "instruct": "Please tell me how this works and why it matters. " * 4,
                   "output": "ok"}
    path = write_jsonl(tmp_path / "long.jsonl", [PRETRAIN, long_prompt])
    with pytest.raises(PipellmError, match=r"long.jsonl line 2: nothing left to train on after truncation to "
                                           r"max_seq_len 12"):
        build_dataset(path, tok, max_seq_len=12)
    ds = build_dataset(path, tok, max_seq_len=12, skip_bad_records=True)
    assert len(ds) == 1 and ds.n_bad == 1 and ds.n_truncated == 1


def test_chat_template_rejection_is_a_bad_record(tmp_path):
    tokenizer = chat_tokenizer(STRICT)
    # An answer first: this template insists on a user message first.
    path = write_jsonl(tmp_path / "c.jsonl", [CONVERSATION, {"type": "conversation", "rounds": [["ans", "hi"]]}])
    with pytest.raises(PipellmError, match=r"c.jsonl line 2: the tokenizer's chat template rejected it .*roles "
                                           r"must alternate"):
        build_dataset(path, tokenizer, max_seq_len=256)
    assert len(build_dataset(path, tokenizer, max_seq_len=256, skip_bad_records=True)) == 1


def test_unreadable_files(tmp_path, tok):
    with pytest.raises(PipellmError, match="nope.jsonl does not exist"):
        build_dataset(tmp_path / "nope.jsonl", tok, max_seq_len=64)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"type": "pretrain", "text": "caf\xe9"}\n')
    with pytest.raises(PipellmError, match="latin.jsonl line 1: not UTF-8"):
        build_dataset(latin, tok, max_seq_len=64)


def test_ignore_index_is_the_cross_entropy_convention():
    # README, transformers and torch's cross entropy all mean -100: labels written by pipellm load anywhere.
    assert IGNORE_INDEX == -100


def test_directory_as_data_path_and_empty_files(tmp_path, tok):
    from pipellm.config import load_config, validate_environment
    from pipellm.data.cache import tokenize_file
    from pipellm.data.samples import DataOptions

    data = tmp_path / "data"
    data.mkdir()
    (data / "b.jsonl").write_text(json.dumps(PRETRAIN) + "\n")
    (data / "a.json").write_text(json.dumps([INSTRUCT]))
    (data / "notes.txt").write_text("not data")
    assert build_dataset(data, tok, 64).input_ids.shape[0] == 2  # a.json and b.jsonl, not notes.txt
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "more.jsonl").write_text(json.dumps(PRETRAIN) + "\n")
    config = tmp_path / "c.yml"
    config.write_text(json.dumps({"model_path": str(tmp_path / "model"), "save_path": str(tmp_path / "save"),
                                  "data_path": [str(data), str(tmp_path / "more.jsonl")], "data_weights": [2, 0.5],
                                  "train_batch_size": 2, "use_tensorboard": False}))
    cfg = load_config(config)
    validate_environment(cfg, 1)
    assert cfg.data_path == [str(data / "a.json"), str(data / "b.jsonl"), str(tmp_path / "more.jsonl")]
    assert cfg.data_weights == [2, 2, 0.5]

    (data / "c.jsonl").write_text("  \n\n")  # only whitespace: an error, even among other files
    with pytest.raises(PipellmError, match=f"data file {data / 'c.jsonl'} holds no records"):
        build_dataset(data, tok, 64)
    with pytest.raises(PipellmError, match=f"data file {data / 'c.jsonl'} holds no records"):
        tokenize_file(data / "c.jsonl", tok, DataOptions(64), cache_dir=tmp_path / "cache")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PipellmError, match=f"data directory {empty} holds no \\*.json or \\*.jsonl file"):
        build_dataset(empty, tok, 64)
