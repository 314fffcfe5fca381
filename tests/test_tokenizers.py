"""Baichuan2's and ChatGLM3's remote-code tokenizers, loaded without running their code: ids equal sentencepiece's
own encoding (ChatGLM3's special tokens right after its pieces), BOS/EOS as the tokenizer config says, and ChatGLM3
records rendered in ChatGLM3's format with exact label masks, written out here token by token."""
from __future__ import annotations

import json
import pickle
import shutil

import pytest
import sentencepiece as spm

from conftest import REPO
from pipellm.errors import PipellmError
from pipellm.data import IGNORE_INDEX
from pipellm.data.records import normalize
from pipellm.data.templates import Encoder
from pipellm.data.tokenizer import ChatGLM3Tokenizer, SentencePieceTokenizer, load_tokenizer
from remote_tokenizers import write_baichuan2_tokenizer, write_chatglm3_tokenizer

TEXTS = ["What is 5 minus 1?", " leading and  double  spaces ", "line one\nline two\n\n", "你好，世界。流水线并行",
         "digits 12345 and emoji 🙂 and rare ŧ", "a literal <|user|> and [gMASK] stay text", ""]
GLM_SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>",
                "<|observation|>"]


@pytest.fixture(scope="module")
def glm_dir(tmp_path_factory):
    return write_chatglm3_tokenizer(tmp_path_factory.mktemp("chatglm3"))


@pytest.fixture(scope="module")
def glm(glm_dir):
    return load_tokenizer(glm_dir)


def sp_of(directory) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))


def test_baichuan2_tokenizer_is_sentencepiece_without_remote_code(tmp_path):
    from transformers import AutoTokenizer

    directory = write_baichuan2_tokenizer(tmp_path / "baichuan2")
    with pytest.raises(ValueError, match="trust_remote_code"):  # the layout is really remote code to transformers
        AutoTokenizer.from_pretrained(directory)
    tok = load_tokenizer(directory)  # tokenization_baichuan.py raises if it is ever run
    sp = sp_of(directory)
    assert isinstance(tok, SentencePieceTokenizer) and len(tok) == sp.get_piece_size() == 1000
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id) == (1, 2, 0, 0)
    for text in TEXTS:
        ids = sp.encode(text)
        assert tok.encode(text, add_special_tokens=False) == ids
        assert tok.encode(text) == ids  # Baichuan2: add_bos_token and add_eos_token false
        assert tok.decode(ids) == sp.decode(ids)
    assert tok.decode([1] + sp.encode("hi") + [2]) == "<s>hi</s>"
    assert tok.decode([1] + sp.encode("hi") + [2], skip_special_tokens=True) == "hi"
    # BaichuanTokenizer's defaults when the config does not say: BOS in front, no EOS; and EOS when asked.
    default = load_tokenizer(write_baichuan2_tokenizer(tmp_path / "default", add_bos_token=None, add_eos_token=None))
    both = load_tokenizer(write_baichuan2_tokenizer(tmp_path / "both", add_bos_token=True, add_eos_token=True))
    for text in TEXTS:
        assert default.encode(text) == [1] + sp_of(tmp_path / "default").encode(text)
        assert both.encode(text) == [1] + sp_of(tmp_path / "both").encode(text) + [2]
    assert pickle.loads(pickle.dumps(tok)).encode(TEXTS[3]) == sp.encode(TEXTS[3])  # tokenizing workers
    # The built-in template: no BOS in front of the prompt (the tokenizer adds none), EOS after the answer.
    ids, trained = Encoder(tok).encode(normalize({"type": "instruct", "instruct": "Say hi.", "output": "hi"}))
    assert ids == sp.encode("### Instruction:\nSay hi.\n\n### Response:\n") + sp.encode("hi") + [2]
    assert sum(trained) == len(sp.encode("hi")) + 1 and all(trained[-len(sp.encode("hi")) - 1:])


def test_chatglm3_tokenizer_appends_its_special_tokens(glm_dir, glm):
    from transformers import AutoTokenizer

    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoTokenizer.from_pretrained(glm_dir)
    sp = sp_of(glm_dir)
    n = sp.get_piece_size()
    assert isinstance(glm, ChatGLM3Tokenizer) and len(glm) == n + 9
    assert glm.convert_tokens_to_ids(GLM_SPECIALS) == list(range(n, n + 9))
    assert glm.convert_ids_to_tokens(list(range(n, n + 9))) == GLM_SPECIALS
    assert (glm.bos_token_id, glm.eos_token_id, glm.pad_token_id) == (None, 2, 0)
    for text in TEXTS:
        ids = sp.encode(text)  # role-token names in a text are characters, as chatglm3's tokenizer encodes them
        assert glm.encode(text, add_special_tokens=False) == ids
        assert glm.encode(text) == [n + 1, n + 3] + ids  # [gMASK] sop
        assert glm.decode(ids) == sp.decode(ids)
    assert glm.decode([n + 1, n + 3] + sp.encode("hi") + [2]) == "[gMASK]sophi</s>"
    assert glm.decode([n + 1, n + 3] + sp.encode("hi") + [2], skip_special_tokens=True) == "hi"
    assert pickle.loads(pickle.dumps(glm)).encode(TEXTS[3]) == glm.encode(TEXTS[3])


class Expected:
    """A sample written out in ChatGLM3's format: pieces of ids, each trained or not."""

    def __init__(self, tok: ChatGLM3Tokenizer, sp: spm.SentencePieceProcessor):
        self.tok, self.sp = tok, sp
        self.ids, self.trained = [tok.convert_tokens_to_ids("[gMASK]"), tok.convert_tokens_to_ids("sop")], [False] * 2

    def add(self, ids: list[int], trained: bool) -> "Expected":
        self.ids += ids
        self.trained += [trained] * len(ids)
        return self

    def role(self, role: str, trained: bool) -> "Expected":
        return self.add([self.tok.convert_tokens_to_ids(f"<|{role}|>")], trained)

    def text(self, text: str, trained: bool) -> "Expected":
        return self.add(self.sp.encode(text), trained)


def test_chatglm3_conversation_sample(glm_dir, glm):
    record = {"type": "conversation", "rounds": [["ask", "Hi"], ["ans", "Hello! 你好"], ["ask", "What is 2 plus 2?"],
                                                 ["ask", "Quickly."], ["ans", "4"]]}
    encoder = Encoder(glm)  # template auto: ChatGLM3's own format, not its jinja chat template
    assert encoder.template == "chatglm3" and Encoder(glm, "chat").template == "chatglm3"
    # The answer, the newline before it and the token after it (the next role token or </s>) are trained.
    want = (Expected(glm, sp_of(glm_dir))
            .role("user", False).text("\n", False).text("Hi", False)
            .role("assistant", False).text("\n", True).text("Hello! 你好", True)
            .role("user", True).text("\n", False).text("What is 2 plus 2?", False)
            .role("user", False).text("\n", False).text("Quickly.", False)
            .role("assistant", False).text("\n", True).text("4", True)
            .add([2], True))
    assert encoder.encode(normalize(record)) == (want.ids, want.trained)
    ids, labels = encoder.labels(normalize(record))
    assert labels == [i if t else IGNORE_INDEX for i, t in zip(want.ids, want.trained)]
    # Generation: the prompt is exactly what training put before the last answer; it stops at </s> or a role.
    prompt = encoder.prompt_ids(normalize({"type": "conversation", "rounds": record["rounds"][:-1]}))
    assert prompt == want.ids[:len(prompt)] and prompt[-1] == glm.convert_tokens_to_ids("<|assistant|>")
    assert len(prompt) == len(want.ids) - len(sp_of(glm_dir).encode("\n") + sp_of(glm_dir).encode("4")) - 1
    assert encoder.stop_token_ids() == [2] + glm.convert_tokens_to_ids(["<|user|>", "<|observation|>"])


def test_chatglm3_tool_sample(glm_dir, glm):
    record = {"type": "conver_has_api", "api_desc": "get_weather: weather now in a city.",
              "rounds": [["ask", "Rain in Paris or Rome?"],
                         ["ans-api", {"actions": [
                             {"inner_thought": "Check Paris.", "api_name": "get_weather",
                              "api_param": {"city": "Paris", "metric": True}, "api_res": {"sky": "rain"}},
                             {"inner_thought": "", "api_name": "get_weather", "api_param": "Rome",
                              "api_res": "sun"}],
                             "ans": "Paris."}]]}
    want = (Expected(glm, sp_of(glm_dir))
            .role("system", False).text("\n", False)
            .text("Answer the following questions as best as you can. You have access to the following tools:\n"
                  "get_weather: weather now in a city.", False)
            .role("user", False).text("\n", False).text("Rain in Paris or Rome?", False)
            .role("assistant", False).text("\n", True).text("Check Paris.", True)
            .role("assistant", True).text("get_weather\n", True)
            .text("```python\ntool_call(city='Paris', metric=True)\n```", True)
            .role("observation", True).text("\n", False).text('{"sky": "rain"}', False)
            .role("assistant", False).text("get_weather\n", True).text("```python\ntool_call(Rome)\n```", True)
            .role("observation", True).text("\n", False).text("sun", False)
            .role("assistant", False).text("\n", True).text("Paris.", True)
            .add([2], True))
    assert Encoder(glm).encode(normalize(record)) == (want.ids, want.trained)


def test_chatglm3_other_records_and_builtin(glm_dir, glm):
    sp = sp_of(glm_dir)
    instruct = {"type": "instruct", "instruct": "Add.", "input": "3 and 4", "output": "7"}
    want = (Expected(glm, sp).role("user", False).text("\n", False).text("Add.\n\n3 and 4", False)
            .role("assistant", False).text("\n", True).text("7", True).add([2], True))
    assert Encoder(glm).encode(normalize(instruct)) == (want.ids, want.trained)
    ref_qa = {"type": "ref_qa", "reference": "The sky is blue.", "rounds": [["ask", "Sky?"], ["ans", "Blue."]]}
    want = (Expected(glm, sp).role("system", False).text("\n", False)
            .text("Answer using this reference:\nThe sky is blue.", False)
            .role("user", False).text("\n", False).text("Sky?", False)
            .role("assistant", False).text("\n", True).text("Blue.", True).add([2], True))
    assert Encoder(glm).encode(normalize(ref_qa)) == (want.ids, want.trained)
    # pretrain: [gMASK] sop text </s>, as the tokenizer encodes a text; the text and </s> trained.
    want = Expected(glm, sp).text("The snow is white.", True).add([2], True)
    assert Encoder(glm).encode(normalize({"type": "pretrain", "text": "The snow is white."})) == \
        (want.ids, want.trained)
    # template builtin: the built-in templates after [gMASK] sop.
    want = (Expected(glm, sp).text("### Instruction:\nAdd.\n\n### Input:\n3 and 4\n\n### Response:\n", False)
            .text("7", True).add([2], True))
    assert Encoder(glm, "builtin").encode(normalize(instruct)) == (want.ids, want.trained)


def test_load_errors_name_the_file_and_the_fix(tmp_path):
    directory = write_baichuan2_tokenizer(tmp_path / "no_model")
    (directory / "tokenizer.model").unlink()
    with pytest.raises(PipellmError, match=r"no_model/tokenizer\.model is missing: .*names BaichuanTokenizer.*copy "
                                           r"tokenizer\.model from the original checkpoint"):
        load_tokenizer(directory)
    other = tmp_path / "other"
    other.mkdir()
    (other / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": ["tokenization_x.XTokenizer", None]}, "tokenizer_class": "XTokenizer"}))
    with pytest.raises(PipellmError, match=r"names the remote-code tokenizer XTokenizer, which pipellm does not run"):
        load_tokenizer(other)
    shutil.copy(REPO / "pipellm" / "assets" / "tiny_llama" / "tokenizer.json", other)
    with pytest.raises(PipellmError) as error:  # the fast tokenizer is there: not asked for again
        load_tokenizer(other)
    assert "add a tokenizer.json" not in str(error.value)
    assert "remove `auto_map` and `tokenizer_class` from tokenizer_config.json" in str(error.value)
    config = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items()
                                                             if k not in ("auto_map", "tokenizer_class")}))
    assert load_tokenizer(other)("hello").input_ids  # the advice works
    (other / "tokenizer_config.json").write_text("{broken")
    with pytest.raises(PipellmError, match=r"other/tokenizer_config\.json: not valid JSON"):
        load_tokenizer(other)
