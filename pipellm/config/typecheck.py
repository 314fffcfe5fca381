"""Values read from YAML held to the annotations of the config's dataclasses, and the words for the errors."""
from __future__ import annotations

import difflib
import types
import typing


def type_ok(value, annotation) -> bool:
    """isinstance against the annotations the config uses: scalars, unions, ``list[...]``, ``Literal[...]`` and
    ``Annotated[...]`` (its wording aside)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return type_ok(value, typing.get_args(annotation)[0])
    if origin is typing.Literal:
        # `True == 1` in Python: a bool is only the bool choices, a number only the number choices.
        return any(type(value) is type(choice) and value == choice for choice in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return any(type_ok(value, arg) for arg in typing.get_args(annotation))
    if origin is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(type_ok(v, item) for v in value)
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def type_name(annotation) -> str:
    """``annotation`` as the error says it: ``int``, ``a list of int``, ``one of auto, builtin, chat``."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return typing.get_args(annotation)[1]
    if origin is typing.Literal:
        return "one of " + ", ".join(str(choice) for choice in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(arg) for arg in typing.get_args(annotation))
    if origin is list:
        return f"a list of {type_name(typing.get_args(annotation)[0])}"
    return "null" if annotation is type(None) else annotation.__name__


def suggest(key: str, known) -> str:
    """``; did you mean `KEY`?`` for the known key closest to a misspelt one, or nothing."""
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f"; did you mean `{close[0]}`?" if close else ""
