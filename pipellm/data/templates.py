"""From a checked record to token ids and an exact loss mask, through a built-in template or the tokenizer's own
chat template. The generation demo builds its prompts with the same code, so a model is prompted exactly as it
was trained.

``template`` (config key):

* ``auto`` (default): the tokenizer's chat template when it has one, else the built-in templates.
* ``builtin``: the built-in templates below, whatever the tokenizer has.
* ``chat``: the tokenizer's chat template (an error if it has none).

With ChatGLM3's tokenizer (``pipellm.tokenizer.ChatGLM3Tokenizer``), ``auto`` and ``chat`` use ChatGLM3's own
format instead of a chat template (``pipellm.data.chatglm3_format``: ``[gMASK]sop``, role tokens); ``builtin`` puts
the built-in templates after ``[gMASK]sop``.

``pretrain`` records never go through a chat template: ``[BOS] text [EOS]``, every token trained.

**Built-in templates.** A sample is a list of segments, each trained or not; adjacent segments of one kind are
joined, each joined piece is tokenized on its own (``add_special_tokens=False``) and BOS/EOS are inserted as ids,
so the mask is exact by construction (no string search). BOS is whatever the tokenizer itself puts in front of a
text (``encode(text)`` vs ``encode(text, add_special_tokens=False)``): Llama's ``<s>``, nothing for tokenizers
without a BOS. Every answer ends with EOS, trained, so generation stops there. Trained parts in ``[[ ]]``::

    instruct         [BOS]### Instruction:\\n{instruct}\\n\\n### Input:\\n{input}\\n\\n### Response:\\n[[{output}EOS]]
                     (no Input block when the record has no input)
    conversation     [BOS]### User:\\n{ask}\\n\\n### Assistant:\\n[[{ans}EOS]]### User:\\n...
                     (each ask is its own User block; consecutive asks give consecutive blocks)
    ref_qa           [BOS]### Reference:\\n{reference}\\n\\n then the rounds as in conversation
    conver_has_api   [BOS]### Tools:\\n{api_desc}\\n\\n then the rounds; an ans-api round is
        ### Assistant:\\n[[Thought: {inner_thought}\\nAction: {api_name}\\nAction Input: {api_param}\\nEOS]]
        Observation: {api_res}\\n   (one call + observation per action, observations untrained)
        [[{ans}EOS]]

The model ends each tool call with EOS: a runtime stops there, runs the tool, appends ``Observation: ...\\n``
and generates again, until the model answers (text that is not a ``Thought:`` block).

**Chat templates.** Rounds become messages (``ask`` -> user, ``ans`` -> assistant; consecutive asks are joined
into one user message with a blank line, since many templates require alternating roles); ``api_desc`` and
``reference`` go into a system message (prefixed to the first user message when the template drops system
messages); each tool call is an assistant message (``Thought/Action/Action Input`` as above) and each result a
``tool`` message (a user message ``Observation: ...`` when the template has no tool role). The conversation is
rendered once with ``apply_chat_template``; the character span of every assistant message is found by rendering
the conversation up to it with and without it (so repeated text cannot confuse it), and the rendered text is
tokenized once with character offsets: a token is trained when it overlaps an assistant span. The span runs
from the end of the generation prompt to the end of the message as the template writes it, end-of-turn token
included, trailing whitespace excluded. Generation stops at EOS or at that end-of-turn token.
"""
from __future__ import annotations

import functools

import numpy as np

from pipellm.data.chatglm3_format import ChatGLM3Format
from pipellm.errors import PipellmError

TEMPLATES = ("auto", "builtin", "chat")

#: Built-in prompt for ``instruct`` records that have an ``input``; the output follows the prompt.
INSTRUCT_TEMPLATE = "### Instruction:\n{instruct}\n\n### Input:\n{input}\n\n### Response:\n"
#: The same prompt without the Input block, for records with no ``input``.
INSTRUCT_TEMPLATE_NO_INPUT = "### Instruction:\n{instruct}\n\n### Response:\n"
USER_TEMPLATE = "### User:\n{text}\n\n"
ASSISTANT_HEADER = "### Assistant:\n"
TOOLS_TEMPLATE = "### Tools:\n{api_desc}\n\n"
REFERENCE_TEMPLATE = "### Reference:\n{reference}\n\n"
ACTION_TEMPLATE = "Thought: {inner_thought}\nAction: {api_name}\nAction Input: {api_param}\n"
OBSERVATION_TEMPLATE = "Observation: {api_res}\n"
#: Every fixed string of the built-in templates (the tiny tokenizer is trained on them).
BUILTIN_STRINGS = (INSTRUCT_TEMPLATE, INSTRUCT_TEMPLATE_NO_INPUT, USER_TEMPLATE, ASSISTANT_HEADER, TOOLS_TEMPLATE,
                   REFERENCE_TEMPLATE, ACTION_TEMPLATE, OBSERVATION_TEMPLATE)

# Chat-template texts for the fields that have no message of their own.
CHAT_TOOLS_SYSTEM = "You can call these tools:\n{api_desc}"
CHAT_REFERENCE_SYSTEM = "Answer using this reference:\n{reference}"
CHAT_OBSERVATION = "Observation: {api_res}"

IGNORE_INDEX = -100
_EOS, _BOS = object(), object()


class TemplateError(Exception):
    """A record the chat template cannot render (reported like a bad record)."""


def _action_text(action: dict) -> str:
    return ACTION_TEMPLATE.format(**action)


class Encoder:
    """Encodes checked records (``pipellm.records.normalize``) into ``(ids, trained)`` with one template."""

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
                for text, trained in _merge(builtin_segments(record)):
                    refs.append((None if text is _EOS else len(texts), trained))
                    if text is not _EOS:
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
                    ids, trained = piece_ids, _overlapping(offsets, spans)
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
        for text, is_trained in _merge(segments):
            piece = [self.eos_id] if text is _EOS else self.tokenizer.encode(text, add_special_tokens=False)
            ids += piece
            trained += [is_trained] * len(piece)
        return ids, trained

    def prompt_ids(self, record: dict) -> list[int]:
        """Token ids that prompt the model for the answer to the record's last ask (the generation demo).

        ``record`` is checked like training data but may end with asks (a conversation-like record) or be an
        ``instruct`` record without ``output``. The ids are exactly what training put before that answer.
        """
        if self.template == "builtin" or record["type"] == "pretrain":
            segments = builtin_segments(record, for_generation=True)
            ids, _ = self._encode_segments(segments)
            return ids
        if self.template == "chatglm3":
            return self._format.prompt_ids(record)
        return self._chat.prompt_ids(chat_messages(record, self._chat, for_generation=True))


def _merge(segments):
    """Join adjacent text segments of one kind (EOS markers stay apart)."""
    out = []
    for text, trained in segments:
        if text == "":
            continue
        if out and text is not _EOS and out[-1][0] is not _EOS and out[-1][1] == trained:
            out[-1] = (out[-1][0] + text, trained)
        else:
            out.append((text, trained))
    return out


def _overlapping(offsets: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """Tokens whose character range overlaps a span (an empty range counts when it lies inside one)."""
    starts, ends = offsets[:, 0], offsets[:, 1]
    trained = np.zeros(len(offsets), dtype=bool)
    for s, e in spans:
        trained |= ((starts < e) & (ends > s)) | ((starts == ends) & (starts >= s) & (starts < e))
    return trained


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


def builtin_segments(record: dict, for_generation: bool = False) -> list[tuple[object, bool]]:
    """The record as ``(text or EOS marker, trained)`` segments of the built-in template."""
    kind = record["type"]
    if kind == "pretrain":
        return [(record["text"], True), (_EOS, True)]
    if kind == "instruct":
        if record.get("input"):
            prompt = INSTRUCT_TEMPLATE.format(instruct=record["instruct"], input=record["input"])
        else:
            prompt = INSTRUCT_TEMPLATE_NO_INPUT.format(instruct=record["instruct"])
        if for_generation and "output" not in record:
            return [(prompt, False)]
        return [(prompt, False), (record["output"], True), (_EOS, True)]
    segments: list[tuple[object, bool]] = []
    if kind == "conver_has_api":
        segments.append((TOOLS_TEMPLATE.format(api_desc=record["api_desc"]), False))
    elif kind == "ref_qa":
        segments.append((REFERENCE_TEMPLATE.format(reference=record["reference"]), False))
    for role, content in record["rounds"]:
        if role == "ask":
            segments.append((USER_TEMPLATE.format(text=content), False))
            continue
        segments.append((ASSISTANT_HEADER, False))
        if role == "ans-api":
            for action in content["actions"]:
                segments += [(_action_text(action), True), (_EOS, True),
                             (OBSERVATION_TEMPLATE.format(api_res=action["api_res"]), False)]
            content = content["ans"]
        segments += [(content, True), (_EOS, True)]
    if for_generation and record["rounds"][-1][0] == "ask":
        segments.append((ASSISTANT_HEADER, False))
    return segments


# ----- chat templates -----

def chat_messages(record: dict, renderer: "ChatRenderer", for_generation: bool = False) -> list[dict]:
    """The record as chat messages; ``trained`` marks the assistant messages the model learns."""
    kind = record["type"]
    context = None
    if kind == "instruct":
        user = record["instruct"] + (f"\n\n{record['input']}" if record.get("input") else "")
        messages = [{"role": "user", "content": user}]
        if not (for_generation and "output" not in record):
            messages.append({"role": "assistant", "content": record["output"], "trained": True})
        return messages
    if kind == "conver_has_api":
        context = CHAT_TOOLS_SYSTEM.format(api_desc=record["api_desc"])
    elif kind == "ref_qa":
        context = CHAT_REFERENCE_SYSTEM.format(reference=record["reference"])
    messages: list[dict] = []
    for role, content in record["rounds"]:
        if role == "ask":
            if messages and messages[-1]["role"] == "user" and not messages[-1].get("observation"):
                messages[-1]["content"] += "\n\n" + content
            else:
                messages.append({"role": "user", "content": content})
        elif role == "ans":
            messages.append({"role": "assistant", "content": content, "trained": True})
        else:
            for action in content["actions"]:
                messages.append({"role": "assistant", "content": _action_text(action).rstrip("\n"),
                                 "trained": True})
                if renderer.has_tool_role:
                    messages.append({"role": "tool", "content": action["api_res"], "name": action["api_name"]})
                else:
                    messages.append({"role": "user", "content": CHAT_OBSERVATION.format(api_res=action["api_res"]),
                                     "observation": True})
            messages.append({"role": "assistant", "content": content["ans"], "trained": True})
    if context is not None:
        if renderer.has_system_role:
            messages.insert(0, {"role": "system", "content": context})
        else:
            first_user = next((m for m in messages if m["role"] == "user"), None)
            if first_user is None:
                messages.insert(0, {"role": "user", "content": context})
            else:
                first_user["content"] = context + "\n\n" + first_user["content"]
    return messages


class ChatRenderer:
    """Renders messages with ``tokenizer.apply_chat_template`` and finds the exact tokens of assistant messages."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.has_system_role = self._keeps_role("system")
        self.has_tool_role = self._keeps_role("tool")

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        plain = [{k: v for k, v in m.items() if k not in ("trained", "observation")} for m in messages]
        try:
            return self.tokenizer.apply_chat_template(plain, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except Exception as e:  # jinja2 raises TemplateError / TypeError from inside the template
            raise TemplateError(f"the tokenizer's chat template rejected it ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}); fix the record or set "
                                f"`template: builtin`") from None

    def _keeps_role(self, role: str) -> bool:
        probe = "PROBE-7f3a"
        base = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
        messages = [{"role": role, "content": probe}] + base if role == "system" else base + [
            {"role": role, "content": probe, "name": "f"}]
        try:
            return probe in self.render(messages)
        except TemplateError:
            return False

    def spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character span of each trained message."""
        full = self.render(messages)
        spans = []
        for i, message in enumerate(messages):
            if not message.get("trained"):
                continue
            before = self._prompt_prefix(messages, i)
            upto = self.render(messages[:i + 1])
            if not (full.startswith(before) and full.startswith(upto.rstrip()) and len(upto.rstrip()) > len(before)):
                raise PipellmError("the tokenizer's chat template renders a conversation differently from its "
                                   "beginnings (it rewrites earlier turns), so the answer tokens cannot be found "
                                   "exactly; set `template: builtin`")
            spans.append((len(before), len(upto.rstrip())))
        return full, spans

    def _prompt_prefix(self, messages: list[dict], i: int) -> str:
        if i:
            return self.render(messages[:i], add_generation_prompt=True)
        # An assistant message first: its prompt is what the template writes for no message at all, if anything.
        try:
            return self.render([], add_generation_prompt=True)
        except TemplateError:
            return ""

    def encode(self, messages: list[dict]) -> tuple[list[int], list[bool]]:
        full, spans = self.spans(messages)
        return self.tokenize_spans(full, spans)

    def tokenize_spans(self, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
        tok = self.tokenizer
        if getattr(tok, "is_fast", False):
            enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
            offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
            return list(enc["input_ids"]), _overlapping(offsets, spans).tolist()
        # No offsets: tokenize the pieces between span boundaries separately.
        ids, trained, pos = [], [], 0
        for s, e in spans:
            for piece, flag in ((text[pos:s], False), (text[s:e], True)):
                if piece:
                    piece_ids = tok.encode(piece, add_special_tokens=False)
                    ids += piece_ids
                    trained += [flag] * len(piece_ids)
            pos = e
        if text[pos:]:
            piece_ids = tok.encode(text[pos:], add_special_tokens=False)
            ids += piece_ids
            trained += [False] * len(piece_ids)
        return ids, trained

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        text = self.render(messages, add_generation_prompt=True)
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    @functools.cache
    def end_of_turn_ids(self) -> tuple[int, ...]:
        """The last trained token of a probe answer, when it is a special token (``<|im_end|>``, ``<|eot_id|>``)."""
        ids, trained = self.encode([{"role": "user", "content": "hi"},
                                    {"role": "assistant", "content": "hello", "trained": True}])
        last = max((i for i, t in enumerate(trained) if t), default=None)
        if last is None:
            return ()
        special = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        added = set(getattr(self.tokenizer, "added_tokens_decoder", {}) or {})
        return (ids[last],) if ids[last] in special | added else ()

