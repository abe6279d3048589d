"""Tool calls through structured outputs (vLLM's named and required function calling).

`tool_choice` naming a function holds the text to that function's parameter schema; `"required"`
holds it to a JSON array of one or more `{"name", "parameters"}` calls of the given tools. The text
is then read back as OpenAI `tool_calls`. Any model can be held to them: the calls always parse, and
are as good as the model's answer under the constraint. `"auto"` (the model deciding between text and
a call) needs a parser for the model's own tool-call format, which is not built.
"""

from __future__ import annotations

import json
import uuid

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
    return [
        {
            "id": call_id(),
            "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["parameters"], ensure_ascii=False)},
        }
        for call in calls
    ]
