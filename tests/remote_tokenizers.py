"""Tokenizer files laid out as Baichuan2's and ChatGLM3's checkpoints ship them: a sentencepiece
``tokenizer.model`` (a tiny one, trained here on the example data in well under a second), ``tokenizer_config.json``
naming the remote-code class through ``auto_map``, and the remote ``tokenization_*.py``, which raises if run."""
from __future__ import annotations

import io
import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REMOTE_CODE = 'raise RuntimeError("pipellm ran the checkpoint\'s tokenizer code")\n'


def _corpus() -> list[str]:
    """The example data's lines (every record format, English and Chinese) and the built-in templates' text."""
    from pipellm.data.builtin_template import BUILTIN_STRINGS

    lines = []
    for path in sorted((REPO / "pipellm" / "assets" / "data").glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            lines.append(" ".join(str(v) for v in json.loads(line).values()))
    return lines + list(BUILTIN_STRINGS) * 20


def train_sentencepiece(vocab_size: int, *, dummy_prefix: bool) -> bytes:
    """A BPE sentencepiece model with byte fallback (any text encodes), ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, no pad
    piece; ``dummy_prefix`` as ChatGLM3's (true: each encoded piece starts with "▁") or Baichuan2's (false)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_corpus()), model_writer=model, vocab_size=vocab_size,
                                   model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
                                   character_coverage=1.0, add_dummy_prefix=dummy_prefix,
                                   remove_extra_whitespaces=False, normalization_rule_name="identity",
                                   split_digits=True, minloglevel=2)
    return model.getvalue()


def _added_token(content: str) -> dict:
    """A special token as Baichuan2's tokenizer_config.json writes it."""
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
            "single_word": True}


def write_baichuan2_tokenizer(dest: Path, vocab_size: int = 1000, **config) -> Path:
    """Baichuan2's tokenizer files; ``config`` overrides tokenizer_config.json keys (None removes one)."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "tokenizer.model").write_bytes(train_sentencepiece(vocab_size, dummy_prefix=False))
    (dest / "tokenization_baichuan.py").write_text(REMOTE_CODE)
    tokenizer_config = {
        "add_bos_token": False, "add_eos_token": False,
        "auto_map": {"AutoTokenizer": ["tokenization_baichuan.BaichuanTokenizer", None]},
        "bos_token": _added_token("<s>"), "eos_token": _added_token("</s>"), "pad_token": _added_token("<unk>"),
        "unk_token": _added_token("<unk>"), "clean_up_tokenization_spaces": False, "model_max_length": 4096,
        "sp_model_kwargs": {}, "tokenizer_class": "BaichuanTokenizer", **config}
    tokenizer_config = {k: v for k, v in tokenizer_config.items() if v is not None}
    (dest / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return dest


def write_chatglm3_tokenizer(dest: Path, vocab_size: int = 1000) -> Path:
    """ChatGLM3's tokenizer files (its special tokens live in the remote code, after the sentencepiece pieces)."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "tokenizer.model").write_bytes(train_sentencepiece(vocab_size, dummy_prefix=True))
    (dest / "tokenization_chatglm.py").write_text(REMOTE_CODE)
    (dest / "tokenizer_config.json").write_text(json.dumps({
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
        "chat_template": "{% for message in messages %}{% if loop.first %}[gMASK]sop<|{{ message['role'] }}|>\n "
                         "{{ message['content'] }}{% else %}<|{{ message['role'] }}|>\n {{ message['content'] }}"
                         "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}",
        "clean_up_tokenization_spaces": False, "do_lower_case": False, "eos_token": "</s>",
        "model_max_length": 1000000000000000019884624838656, "pad_token": "<unk>", "padding_side": "left",
        "remove_space": False, "tokenizer_class": "ChatGLMTokenizer", "unk_token": "<unk>"}, indent=2))
    return dest
