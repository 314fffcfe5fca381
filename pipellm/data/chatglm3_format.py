"""ChatGLM3's own conversation format, used for every non-pretrain record when the tokenizer is ChatGLM3's and
``template`` is ``auto`` or ``chat`` (``pipellm.data.templates.Encoder``).

As chatglm3's tokenizer builds it (``build_single_message`` / ``build_chat_input``) and its fine-tuning code
trains it (``finetune/preprocess_utils.py`` of THUDM/ChatGLM3)::

    [gMASK] sop  then per message  <|role|> ids(metadata + "\\n") ids(content)  ...  then </s>

``ids(text)`` is sentencepiece's encoding of that piece alone (so each piece starts with sentencepiece's dummy
prefix, and role token names in a record's text stay plain characters). Roles: ``system``, ``user``,
``assistant``, ``observation``. A token is trained when the token before it belongs to an assistant message: the
model learns the metadata, the newline and the content after ``<|assistant|>``, and the token that follows its
message, which ends its turn: the next ``<|user|>`` / ``<|observation|>`` / ``<|assistant|>`` or the final
``</s>``. Generation prompts end with ``<|assistant|>`` and stop at ``</s>``, ``<|user|>`` or ``<|observation|>``.

Records -> messages:

* ``instruct``: user ``{instruct}`` (``\\n\\n{input}`` appended when there is one), assistant ``{output}``.
* ``conversation`` / ``ref_qa``: each ask a user message, each answer an assistant message; ``ref_qa`` starts
  with a system message ``Answer using this reference:\\n{reference}``.
* ``conver_has_api``: a system message ``TOOLS_SYSTEM_PREFIX + api_desc``; an ``ans-api`` round becomes, per
  action, an assistant message with the thought (left out when empty), an assistant message whose metadata is
  ``api_name`` and whose content is ``tool_call_text(api_param)``, and an observation message with ``api_res``
  (not trained); then an assistant message with the answer.
* ``pretrain`` records do not come here: ``[gMASK] sop text </s>``, every token after the prefix trained.
"""
from __future__ import annotations

import json

#: ChatGLM3's fine-tuning code puts this in front of the tool documentation in the system message.
TOOLS_SYSTEM_PREFIX = "Answer the following questions as best as you can. You have access to the following tools:\n"
REFERENCE_SYSTEM = "Answer using this reference:\n{reference}"


def tool_call_text(api_param: str) -> str:
    """The content of a tool-call message, in ChatGLM3's form: a JSON object of parameters becomes Python
    keyword arguments (``tool_call(city='Paris')``); any other ``api_param`` goes between the parentheses as is."""
    try:
        params = json.loads(api_param)
    except ValueError:
        params = None
    if isinstance(params, dict) and all(isinstance(k, str) and k.isidentifier() for k in params):
        # Python literals, as ChatGLM3's fine-tuning code writes them (true -> True, null -> None)
        arguments = ", ".join(f"{name}={value!r}" for name, value in params.items())
    else:
        arguments = api_param
    return f"```python\ntool_call({arguments})\n```"


def chatglm3_messages(record: dict, for_generation: bool = False) -> list[tuple[str, str, str]]:
    """The record as ``(role, metadata, content)`` messages."""
    kind = record["type"]
    if kind == "instruct":
        user = record["instruct"] + (f"\n\n{record['input']}" if record.get("input") else "")
        messages = [("user", "", user)]
        if not (for_generation and "output" not in record):
            messages.append(("assistant", "", record["output"]))
        return messages
    messages = []
    if kind == "conver_has_api":
        messages.append(("system", "", TOOLS_SYSTEM_PREFIX + record["api_desc"]))
    elif kind == "ref_qa":
        messages.append(("system", "", REFERENCE_SYSTEM.format(reference=record["reference"])))
    for role, content in record["rounds"]:
        if role == "ask":
            messages.append(("user", "", content))
        elif role == "ans":
            messages.append(("assistant", "", content))
        else:
            for action in content["actions"]:
                if action["inner_thought"]:
                    messages.append(("assistant", "", action["inner_thought"]))
                messages.append(("assistant", action["api_name"], tool_call_text(action["api_param"])))
                messages.append(("observation", "", action["api_res"]))
            messages.append(("assistant", "", content["ans"]))
    return messages


class ChatGLM3Format:
    """Encodes checked records in ChatGLM3's format with a ``pipellm.data.tokenizer.ChatGLM3Tokenizer``."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.prefix_ids = [tokenizer.command_id("[gMASK]"), tokenizer.command_id("sop")]
        self.eos_id = int(tokenizer.eos_token_id)

    def describe(self) -> dict:
        """What determines the encoding besides the tokenizer (part of the data cache key)."""
        return {"format": "chatglm3", "tools": TOOLS_SYSTEM_PREFIX, "reference": REFERENCE_SYSTEM,
                "tool_call": tool_call_text('{"a": 1}')}

    def stop_token_ids(self) -> list[int]:
        return [self.eos_id, self.tokenizer.command_id("<|user|>"), self.tokenizer.command_id("<|observation|>")]

    def _message_ids(self, messages: list[tuple[str, str, str]]) -> list[list[int]]:
        pieces = [text for _, metadata, content in messages for text in (metadata + "\n", content)]
        encoded = self.tokenizer.sp_model.encode(pieces)  # one batched call; each piece on its own
        return [[self.tokenizer.command_id(f"<|{role}|>")] + encoded[2 * i] + encoded[2 * i + 1]
                for i, (role, _, _) in enumerate(messages)]

    def encode(self, record: dict) -> tuple[list[int], list[bool]]:
        """Token ids and, per token, whether it is trained (its previous token is in an assistant message)."""
        messages = chatglm3_messages(record)
        ids = list(self.prefix_ids)
        predicts_next = [False] * len(ids)  # does this token's prediction of the next one carry a label
        for (role, _, _), message_ids in zip(messages, self._message_ids(messages)):
            ids += message_ids
            predicts_next += [role == "assistant"] * len(message_ids)
        ids.append(self.eos_id)
        return ids, [False] + predicts_next

    def prompt_ids(self, record: dict) -> list[int]:
        """What training put before the answer to the record's last ask: the messages, then ``<|assistant|>``."""
        messages = chatglm3_messages(record, for_generation=True)
        ids = list(self.prefix_ids)
        for message_ids in self._message_ids(messages):
            ids += message_ids
        return ids + [self.tokenizer.command_id("<|assistant|>")]
