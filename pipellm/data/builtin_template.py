"""The built-in templates: a record as segments of text, each trained or not.

A sample is a list of segments, each trained or not; adjacent segments of one kind are
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
"""
from __future__ import annotations

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

EOS = object()
"""The marker of an EOS token in a list of segments (inserted as an id, never tokenized as text)."""


def builtin_segments(record: dict, for_generation: bool = False) -> list[tuple[object, bool]]:
    """The record as ``(text or EOS marker, trained)`` segments of the built-in template."""
    kind = record["type"]
    if kind == "pretrain":
        return [(record["text"], True), (EOS, True)]
    if kind == "instruct":
        if record.get("input"):
            prompt = INSTRUCT_TEMPLATE.format(instruct=record["instruct"], input=record["input"])
        else:
            prompt = INSTRUCT_TEMPLATE_NO_INPUT.format(instruct=record["instruct"])
        if for_generation and "output" not in record:
            return [(prompt, False)]
        return [(prompt, False), (record["output"], True), (EOS, True)]
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
                segments += [(ACTION_TEMPLATE.format(**action), True), (EOS, True),
                             (OBSERVATION_TEMPLATE.format(api_res=action["api_res"]), False)]
            content = content["ans"]
        segments += [(content, True), (EOS, True)]
    if for_generation and record["rounds"][-1][0] == "ask":
        segments.append((ASSISTANT_HEADER, False))
    return segments


def merge_segments(segments):
    """Join adjacent text segments of one kind (EOS markers stay apart)."""
    out = []
    for text, trained in segments:
        if text == "":
            continue
        if out and text is not EOS and out[-1][0] is not EOS and out[-1][1] == trained:
            out[-1] = (out[-1][0] + text, trained)
        else:
            out.append((text, trained))
    return out
