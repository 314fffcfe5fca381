"""From a checked record to token ids and an exact loss mask, through a built-in template or the tokenizer's own
chat template. The chat CLI builds its prompts with the same code, so a model is prompted exactly as it
was trained.

``template`` (config key):

* ``auto`` (default): the tokenizer's chat template when it has one, else the built-in templates.
* ``builtin``: the built-in templates below, whatever the tokenizer has.
* ``chat``: the tokenizer's chat template (an error if it has none).

With ChatGLM3's tokenizer (``pipellm.data.tokenizer.ChatGLM3Tokenizer``), ``auto`` and ``chat`` use ChatGLM3's own
format instead of a chat template (``pipellm.data.chatglm3_format``: ``[gMASK]sop``, role tokens); ``builtin`` puts
the built-in templates after ``[gMASK]sop``.

``pretrain`` records never go through a chat template: ``[BOS] text [EOS]``, every token trained.

The built-in templates are in ``pipellm.data.builtin_template``; chat templates are rendered by
``pipellm.data.chat_template``.
"""
from __future__ import annotations

import typing

import numpy as np

from pipellm.config.schema import Template
from pipellm.data import IGNORE_INDEX
from pipellm.data.builtin_template import BUILTIN_STRINGS, EOS, builtin_segments, merge_segments
from pipellm.data.chat_template import ChatRenderer, TemplateError, chat_messages, overlapping
from pipellm.data.chatglm3_format import ChatGLM3Format
from pipellm.errors import PipellmError

TEMPLATES = typing.get_args(Template)


class Encoder:
    """Encodes checked records (``pipellm.data.records.normalize``) into ``(ids, trained)`` with one template."""

    def __init__(self, tokenizer, template: str = "auto"):
        if template not in TEMPLATES:
            raise PipellmError(f"`template` must be one of {', '.join(TEMPLATES)}, got {template!r}")
        if tokenizer.eos_token_id is None:
            raise PipellmError("the tokenizer has no EOS token; use a tokenizer that defines eos_token")
        # A family's own format (ChatGLM3's tokenizer) takes the place of a jinja chat template.
        own_format = getattr(tokenizer, "chat_format", None)
        has_chat = bool(own_format or getattr(tokenizer, "chat_template", None))
        if template == "chat" and not has_chat:
            raise PipellmError("`template: chat` but the tokenizer has no chat template; use `template: builtin` "
                               "(or auto) or a tokenizer with one")
        self.tokenizer = tokenizer
        self.template = "chat" if template == "chat" or (template == "auto" and has_chat) else "builtin"
        if self.template == "chat" and own_format:
            self.template = own_format
        self.eos_id = int(tokenizer.eos_token_id)
        self.prefix_ids = _leading_special_ids(tokenizer)
        self._backend = _rust_backend(tokenizer)
        if self.template == "chat":
            self._chat = ChatRenderer(tokenizer)
        elif self.template == "chatglm3":
            self._format = ChatGLM3Format(tokenizer)

    # ----- identity, for the cache key -----

    def describe(self) -> dict:
        """What determines the encoding besides the tokenizer's vocabulary (part of the data cache key)."""
        out = {"template": self.template, "prefix_ids": self.prefix_ids, "eos": self.eos_id}
        if self.template == "chat":
            out["chat_template"] = self.tokenizer.chat_template
        elif self.template == "chatglm3":
            out["chatglm3"] = self._format.describe()
        else:
            out["builtin"] = list(BUILTIN_STRINGS)
        return out

    def stop_token_ids(self) -> list[int]:
        """Token ids at which generation must stop: EOS, and with a chat template its end-of-turn token (ChatGLM3:
        also ``<|user|>`` and ``<|observation|>``)."""
        if self.template == "chatglm3":
            return self._format.stop_token_ids()
        ids = [self.eos_id]
        if self.template == "chat":
            ids += [t for t in self._chat.end_of_turn_ids() if t not in ids]
        return ids

    # ----- encoding -----

    def encode(self, record: dict) -> tuple[list[int], list[bool]]:
        """Token ids and, per token, whether it is trained. Not truncated. Raises ``TemplateError``."""
        (result,) = self.encode_many([record])
        if isinstance(result, TemplateError):
            raise result
        ids, trained = result
        return ids.tolist(), trained.tolist()

    def labels(self, record: dict) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` with labels ``-100`` where not trained."""
        ids, trained = self.encode(record)
        return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, trained)]

    def encode_many(self, records: list[dict]) -> list:
        """``encode`` for many records at once (one batched tokenizer call): per record ``(ids int32 array,
        trained bool array)`` or the ``TemplateError`` that the chat template raised."""
        texts: list[str] = []
        plans: list = []
        for record in records:
            if record["type"] == "pretrain" or self.template == "builtin":
                refs = []
                for text, trained in merge_segments(builtin_segments(record)):
                    refs.append((None if text is EOS else len(texts), trained))
                    if text is not EOS:
                        texts.append(text)
                plans.append(("segments", refs))
                continue
            if self.template == "chatglm3":
                plans.append(("encoded", self._format.encode(record)))
                continue
            try:
                full, spans = self._chat.spans(chat_messages(record, self._chat))
            except TemplateError as e:
                plans.append(("error", e))
                continue
            plans.append(("chat", len(texts), spans))
            texts.append(full)
        offsets_for = {plan[1] for plan in plans if plan[0] == "chat"}
        encoded = self._tokenize(texts, offsets_for)
        out = []
        for plan in plans:
            if plan[0] == "error":
                out.append(plan[1])
                continue
            if plan[0] == "encoded":
                ids, trained = np.array(plan[1][0], dtype=np.int32), np.array(plan[1][1], dtype=bool)
            elif plan[0] == "segments":
                ids = list(self.prefix_ids)
                flags = [False] * len(ids)
                for index, flag in plan[1]:
                    piece = [self.eos_id] if index is None else encoded[index][0]
                    ids += piece
                    flags += [flag] * len(piece)
                ids, trained = np.array(ids, dtype=np.int32), np.array(flags, dtype=bool)
            else:
                _, index, spans = plan
                piece_ids, offsets = encoded[index]
                if offsets is None:
                    ids, trained = self._chat.tokenize_spans(texts[index], spans)
                else:
                    ids, trained = piece_ids, overlapping(offsets, spans)
                ids, trained = np.asarray(ids, dtype=np.int32), np.asarray(trained, dtype=bool)
                if not trained.any():
                    out.append(TemplateError("the chat template rendered no token of the answers; set "
                                             "`template: builtin`"))
                    continue
            if len(trained):
                trained[0] = False  # nothing precedes the first token: never a target
            out.append((ids, trained))
        return out

    def _tokenize(self, texts: list[str], offsets_for: set[int]) -> list[tuple[list[int], np.ndarray | None]]:
        """Token ids of each text (no special tokens), and the character offsets of texts ``offsets_for``
        where the tokenizer gives them."""
        if not texts:
            return []
        if self._backend is None:
            return [(list(self.tokenizer.encode(t, add_special_tokens=False)), None) for t in texts]
        if not offsets_for:
            fast = getattr(self._backend, "encode_batch_fast", None)  # skips computing offsets
            encodings = (fast or self._backend.encode_batch)(texts, add_special_tokens=False)
            return [(e.ids, None) for e in encodings]
        return [(e.ids, np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2) if i in offsets_for else None)
                for i, e in enumerate(self._backend.encode_batch(texts, add_special_tokens=False))]

    def _encode_segments(self, segments: list[tuple[object, bool]]) -> tuple[list[int], list[bool]]:
        ids: list[int] = list(self.prefix_ids)
        trained: list[bool] = [False] * len(ids)
        for text, is_trained in merge_segments(segments):
            piece = [self.eos_id] if text is EOS else self.tokenizer.encode(text, add_special_tokens=False)
            ids += piece
            trained += [is_trained] * len(piece)
        return ids, trained

    def prompt_ids(self, record: dict, system: str | None = None) -> list[int]:
        """Token ids that prompt the model for the answer to the record's last ask (the chat CLI).

        ``record`` is checked like training data but may end with asks (a conversation-like record) or be an
        ``instruct`` record without ``output``. The ids are exactly what training put before that answer.
        ``system`` (the chat CLI's ``--system``) is a system message in front, for chat templates with that role.
        """
        if system is not None:
            if self.template != "chat" or not self._chat.has_system_role:
                raise PipellmError("--system needs a chat template with a system role; this model is prompted "
                                   f"with the {self.template} template: drop --system")
            messages = chat_messages(record, self._chat, for_generation=True)
            return self._chat.prompt_ids([{"role": "system", "content": system}, *messages])
        if self.template == "builtin" or record["type"] == "pretrain":
            segments = builtin_segments(record, for_generation=True)
            ids, _ = self._encode_segments(segments)
            return ids
        if self.template == "chatglm3":
            return self._format.prompt_ids(record)
        return self._chat.prompt_ids(chat_messages(record, self._chat, for_generation=True))


_PROBE_TEXT = " Hello, world!\n\n### Response:\n  你好，世界。 x"


def _rust_backend(tokenizer):
    """The fast tokenizer's Rust object when encoding through it gives exactly ``tokenizer.encode``'s ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None:
        return None
    try:
        same = backend.encode(_PROBE_TEXT, add_special_tokens=False).ids == \
            list(tokenizer.encode(_PROBE_TEXT, add_special_tokens=False))
    except Exception:
        return None
    return backend if same else None


def _leading_special_ids(tokenizer) -> list[int]:
    """What the tokenizer itself puts before a text (its BOS, usually), from its own post-processing."""
    probe = "a"
    with_special = list(tokenizer.encode(probe, add_special_tokens=True))
    without = list(tokenizer.encode(probe, add_special_tokens=False))
    for start in range(len(with_special) - len(without) + 1):
        if with_special[start:start + len(without)] == without:
            return with_special[:start]
    return []
