"""Tool calls: vLLM's named, required and auto function calling.

`tool_choice` naming a function holds the text to that function's parameter schema; `"required"`
holds it to a JSON array of one or more `{"name", "parameters"}` calls of the given tools. The text
is then read back as OpenAI `tool_calls`. Any model can be held to them: the calls always parse, and
are as good as the model's answer under the constraint. `"auto"` leaves the model free to answer in
text or with calls written in its own format, which a `CallFormat` (vLLM's tool-call parsers, chosen
with `--tool-call-parser`) reads back: `hermes` (Qwen2.5, Qwen3, Hermes: `<tool_call>{...}</tool_call>`
blocks after any text) and `llama3_json` (Llama 3.1 and 3.2: the whole answer one or more `{"name",
"parameters"}` objects separated by `;`).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Callable

from neuroada_server.structured import Structure

NO_PARAMETERS = {"type": "object", "properties": {}}  # a function declared without parameters


def tool_structure(functions: dict[str, str | None], named: str | None, parallel: bool) -> Structure:
    """The structure of a call to `named` (its parameters' JSON), or else of a list of calls to any
    of `functions` (name -> parameter schema as JSON text), one call only unless `parallel`."""
    parameters = {name: json.loads(schema) if schema else NO_PARAMETERS for name, schema in functions.items()}
    if named is not None:
        return Structure("json_schema", json.dumps(parameters[named]))
    call = [
        {
            "type": "object",
            "properties": {"name": {"enum": [name]}, "parameters": schema},
            "required": ["name", "parameters"],
        }
        for name, schema in parameters.items()
    ]
    calls = {"type": "array", "minItems": 1, "items": {"anyOf": call}} | ({} if parallel else {"maxItems": 1})
    return Structure("json_schema", json.dumps(calls))


def call_id() -> str:
    """A new tool call's id, OpenAI-shaped."""
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_calls(text: str, named: str | None) -> list[dict] | None:
    """OpenAI `tool_calls` from a text held to `tool_structure`: None if it does not parse (cut
    short by max_tokens)."""
    try:
        calls = [{"name": named, "parameters": json.loads(text)}] if named is not None else json.loads(text)
    except json.JSONDecodeError:
        return None
    return openai_calls([(call["name"], call["parameters"]) for call in calls])


Call = tuple[str, object]  # a function's name and its arguments (a JSON value, or their text)


@dataclass(frozen=True)
class CallFormat:
    """How a model family writes tool calls in its text."""

    read: Callable[[str], tuple[str | None, list[Call]] | None]  # (text before the calls, calls); None: no call
    held_from: Callable[[str], int]  # where a call may begin in a partial text: what comes before is content


HERMES_OPEN = "<tool_call>"
_HERMES_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)\Z", re.S)  # the last may be unclosed
LLAMA3_TAG = "<|python_tag|>"


def _call(value: object) -> Call | None:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    return value["name"], value.get("arguments", value.get("parameters", {}))


def _read_hermes(text: str) -> tuple[str | None, list[Call]] | None:
    start = text.find(HERMES_OPEN)
    if start < 0:
        return None
    calls = []
    for closed, unclosed in _HERMES_BLOCK.findall(text, start):
        try:
            call = _call(json.loads(closed or unclosed))
        except json.JSONDecodeError:
            return None
        if call is None:
            return None
        calls.append(call)
    return text[:start].strip() or None, calls


def _hermes_held_from(text: str) -> int:
    start = text.find(HERMES_OPEN)
    if start >= 0:
        return start
    # The text may end in the first characters of the marker.
    partial = next((n for n in range(len(HERMES_OPEN) - 1, 0, -1) if text.endswith(HERMES_OPEN[:n])), 0)
    return len(text) - partial


def _read_llama3(text: str) -> tuple[str | None, list[Call]] | None:
    body = text.strip().removeprefix(LLAMA3_TAG).strip()
    if not body.startswith("{"):
        return None
    decoder, calls, at = json.JSONDecoder(), [], 0
    while at < len(body):
        try:
            value, at = decoder.raw_decode(body, at)
        except json.JSONDecodeError:
            return None
        call = _call(value)
        if call is None:
            return None
        calls.append(call)
        while at < len(body) and body[at] in " \t\n;":
            at += 1
    return None, calls


def _llama3_held_from(text: str) -> int:
    begun = text.lstrip()
    if not begun or begun.startswith(("{", LLAMA3_TAG)) or LLAMA3_TAG.startswith(begun):
        return 0  # a call, or not yet known: held
    return len(text)


CALL_FORMATS = {
    "hermes": CallFormat(_read_hermes, _hermes_held_from),
    "llama3_json": CallFormat(_read_llama3, _llama3_held_from),
}


def openai_calls(calls: list[Call]) -> list[dict]:
    """OpenAI `tool_calls` of (name, arguments) pairs; arguments as JSON text."""
    return [
        {
            "id": call_id(),
            "type": "function",
            "function": {
                "name": name,
                "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False),
            },
        }
        for name, arguments in calls
    ]
