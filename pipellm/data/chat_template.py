"""A record through the tokenizer's own chat template, and the exact tokens of its answers.

Rounds become messages (``ask`` -> user, ``ans`` -> assistant; consecutive asks are joined into one user message
with a blank line, since many templates require alternating roles); ``api_desc`` and ``reference`` go into a system
message (prefixed to the first user message when the template drops system messages); each tool call is an
assistant message (``Thought/Action/Action Input`` as in the built-in template) and each result a ``tool`` message
(a user message ``Observation: ...`` when the template has no tool role). The conversation is rendered once with
``apply_chat_template``; the character span of every assistant message is found by rendering the conversation up to
it with and without it (so repeated text cannot confuse it), and the rendered text is tokenized once with character
offsets: a token is trained when it overlaps an assistant span. The span runs from the end of the generation prompt
to the end of the message as the template writes it, end-of-turn token included, trailing whitespace excluded.
Generation stops at EOS or at that end-of-turn token.
"""
from __future__ import annotations

import functools

import numpy as np

from pipellm.data.builtin_template import ACTION_TEMPLATE
from pipellm.errors import PipellmError

# Chat-template texts for the fields that have no message of their own.
CHAT_TOOLS_SYSTEM = "You can call these tools:\n{api_desc}"
CHAT_REFERENCE_SYSTEM = "Answer using this reference:\n{reference}"
CHAT_OBSERVATION = "Observation: {api_res}"


class TemplateError(Exception):
    """A record the chat template cannot render (reported like a bad record)."""


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
                messages.append({"role": "assistant", "content": ACTION_TEMPLATE.format(**action).rstrip("\n"),
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
            return list(enc["input_ids"]), overlapping(offsets, spans).tolist()
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


def overlapping(offsets: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """Tokens whose character range overlaps a span (an empty range counts when it lies inside one)."""
    starts, ends = offsets[:, 0], offsets[:, 1]
    trained = np.zeros(len(offsets), dtype=bool)
    for s, e in spans:
        trained |= ((starts < e) & (ends > s)) | ((starts == ends) & (starts >= s) & (starts < e))
    return trained
