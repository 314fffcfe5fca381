"""The one way pipellm loads the tokenizer of a model directory: ``load_tokenizer(path)``.

A tokenizer transformers knows is loaded by ``AutoTokenizer`` (never with remote code). Baichuan2 and ChatGLM3
ship theirs as remote code: ``tokenizer_config.json`` names ``BaichuanTokenizer`` / ``ChatGLMTokenizer`` (its
``tokenizer_class``, or its ``auto_map`` into ``tokenization_baichuan.py`` / ``tokenization_chatglm.py``), which
``AutoTokenizer`` cannot load without running the checkpoint's code. pipellm never runs it: it reads
``tokenizer_config.json`` as data and builds the same tokenizer from the shipped sentencepiece file
``tokenizer.model``, encoding every text with sentencepiece itself, so the ids are the remote tokenizer's:

* ``BaichuanTokenizer`` -> ``SentencePieceTokenizer``: sentencepiece's ids of the text, BOS in front when
  ``add_bos_token`` (default true, as in BaichuanTokenizer), EOS after it when ``add_eos_token`` (default false);
  the special tokens are the config's (``<s>``, ``</s>``, ``<unk>``; Baichuan2 pads with ``<unk>``).
* ``ChatGLMTokenizer`` -> ``ChatGLM3Tokenizer``: sentencepiece's pieces, then ``CHATGLM3_SPECIAL_TOKENS``
  appended after the last piece in that order (chatglm3-6b: ids 64789 ... 64797). A text encoded with special
  tokens is ``[gMASK] sop`` + its ids; EOS is ``</s>``, padding ``<unk>``; no BOS. Its data format (role tokens)
  is ``pipellm.data.chatglm3_format``.

Decoding writes the sentencepiece decoding of each run of ordinary ids and the name of each special token
(left out with ``skip_special_tokens``). The tokenizer files are never rewritten: converters and training copy
them unchanged, remote code included, so exported checkpoints still load in transformers with
``trust_remote_code`` for those who want it.
"""
from __future__ import annotations

import json
from pathlib import Path

from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

from pipellm.errors import PipellmError

#: ChatGLM3's tokens after the sentencepiece vocabulary, in id order.
CHATGLM3_SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>",
                           "<|observation|>")
#: Keys of tokenizer_config.json that pipellm passes to its own tokenizers (everything else is the remote
#: class's business: its auto_map, padding side, ...).
_CONFIG_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "add_bos_token", "add_eos_token",
                "model_max_length", "clean_up_tokenization_spaces", "chat_template")


class SentencePieceTokenizer(SentencePieceBackend):
    """A sentencepiece model's own encoding, with BOS / EOS added as ``add_bos_token`` / ``add_eos_token`` say
    (Baichuan2's ``BaichuanTokenizer``)."""

    def __init__(self, vocab_file: str, add_bos_token: bool = True, add_eos_token: bool = False, **kwargs):
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        super().__init__(vocab_file=vocab_file, legacy=True, **kwargs)

    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: list[int] | None = None):
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        ids = bos + token_ids_0 + eos
        return ids if token_ids_1 is None else ids + bos + token_ids_1 + eos

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return len(self.build_inputs_with_special_tokens([], [] if pair else None))

    def _special_ids(self) -> set[int]:
        return set(self.all_special_ids)

    def _decode(self, token_ids, skip_special_tokens: bool = False, **kwargs) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        special = self._special_ids()
        text, run = "", []
        for token_id in ids:
            if token_id not in special:
                run.append(token_id)
                continue
            text += self.sp_model.decode(run)
            run = []
            if not skip_special_tokens:
                text += self.convert_ids_to_tokens(token_id)
        return text + self.sp_model.decode(run)


class ChatGLM3Tokenizer(SentencePieceTokenizer):
    """ChatGLM3's ``ChatGLMTokenizer``: sentencepiece plus ``CHATGLM3_SPECIAL_TOKENS`` after its pieces.

    The special tokens are not added tokens: a text that contains ``<|user|>`` is encoded as the characters
    (as chatglm3's tokenizer does by default); the data layer inserts their ids (``command_id``)."""

    #: The family's own prompt format, which the data layer uses (``pipellm.data.chatglm3_format``).
    chat_format = "chatglm3"

    def __init__(self, vocab_file: str, **kwargs):
        import sentencepiece as spm

        first = spm.SentencePieceProcessor(model_file=vocab_file).get_piece_size()
        self.command_ids = {token: first + i for i, token in enumerate(CHATGLM3_SPECIAL_TOKENS)}
        self._command_tokens = {i: token for token, i in self.command_ids.items()}
        kwargs.update(add_bos_token=False, add_eos_token=False, bos_token=None)
        # chatglm3's jinja chat_template does not give build_single_message's ids (each piece of a message is
        # encoded on its own there); pipellm.data.chatglm3_format does, so the template is not used.
        kwargs.pop("chat_template", None)
        kwargs.setdefault("eos_token", "</s>")
        kwargs.setdefault("unk_token", "<unk>")
        kwargs.setdefault("pad_token", "<unk>")
        super().__init__(vocab_file, **kwargs)

    @property
    def vocab_size(self) -> int:
        return self.sp_model.get_piece_size() + len(self.command_ids)

    def command_id(self, token: str) -> int:
        """The id of one of ``CHATGLM3_SPECIAL_TOKENS``."""
        return self.command_ids[token]

    def _convert_token_to_id(self, token):
        return self.command_ids[token] if token in self.command_ids else self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index):
        return self._command_tokens[index] if index in self._command_tokens else self.sp_model.IdToPiece(index)

    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: list[int] | None = None):
        ids = [self.command_ids["[gMASK]"], self.command_ids["sop"]] + token_ids_0
        return ids if token_ids_1 is None else ids + token_ids_1 + [self.eos_token_id]

    def _special_ids(self) -> set[int]:
        return set(self.all_special_ids) | set(self._command_tokens)


#: Remote tokenizer class named by a checkpoint -> the class pipellm builds in its place.
_REMOTE_CLASSES = {"BaichuanTokenizer": SentencePieceTokenizer, "ChatGLMTokenizer": ChatGLM3Tokenizer}


def remote_tokenizer_class(config: dict) -> str | None:
    """The remote-code tokenizer class a tokenizer_config.json names (``auto_map`` first), else None."""
    auto = (config.get("auto_map") or {}).get("AutoTokenizer")
    if isinstance(auto, (list, tuple)):
        auto = auto[0]
    if isinstance(auto, str):
        return auto.rsplit(".", 1)[-1]
    name = config.get("tokenizer_class")
    return name if name in _REMOTE_CLASSES else None


def load_tokenizer(path: str | Path):
    """The tokenizer of the model directory ``path``, without running any code from it."""
    path = Path(path)
    config_file = path / "tokenizer_config.json"
    config = {}
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise PipellmError(f"{config_file}: not valid JSON ({e}); restore the file from the original "
                               f"checkpoint") from None
    remote = remote_tokenizer_class(config)
    if remote in _REMOTE_CLASSES:
        vocab_file = path / "tokenizer.model"
        if not vocab_file.is_file():
            raise PipellmError(f"{vocab_file} is missing: {config_file} names {remote}, which pipellm builds from "
                               f"the sentencepiece file; copy tokenizer.model from the original checkpoint")
        kwargs = {key: _config_value(config[key]) for key in _CONFIG_KEYS if key in config}
        return _REMOTE_CLASSES[remote](str(vocab_file), **kwargs)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as e:
        if remote is not None:
            fix = (f"transformers loads its tokenizer.json only through that class: to use tokenizer.json as a plain "
                   f"fast tokenizer, remove `auto_map` and `tokenizer_class` from {config_file.name}"
                   if (path / "tokenizer.json").is_file() else f"add a tokenizer.json (a fast tokenizer) to {path}")
            raise PipellmError(f"{config_file} names the remote-code tokenizer {remote}, which pipellm does not run "
                               f"(it builds only {', '.join(_REMOTE_CLASSES)} without remote code); {fix}") from None
        raise PipellmError(f"cannot load the tokenizer of {path} ({str(e).splitlines()[0]}); put the model's "
                           f"tokenizer files (tokenizer.json or tokenizer.model + tokenizer_config.json) there") from None


def _config_value(value):
    """A special token written as an ``AddedToken`` object in tokenizer_config.json -> that AddedToken (its
    ``single_word`` / ``lstrip`` / ``rstrip`` decide how a literal ``</s>`` in a text splits); anything else as is."""
    if isinstance(value, dict) and "content" in value:
        from tokenizers import AddedToken

        return AddedToken(value["content"], single_word=value.get("single_word", False),
                          lstrip=value.get("lstrip", False), rstrip=value.get("rstrip", False),
                          normalized=value.get("normalized", True), special=True)
    return value
