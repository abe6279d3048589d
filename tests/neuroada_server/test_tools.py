"""Tool calls: named and required function calling through structured outputs, auto through a model
family's call format, through the official openai client against the real HTTP server; what cannot
be followed is refused."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from neuroada_server.tools import CALL_FORMATS, tool_calls, tool_structure
from tests.neuroada_server.conftest import RunningServer, make_settings

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 8}}, "required": ["zone"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "the weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
    {"type": "function", "function": {"name": "ping"}},  # no parameters
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME, "ping": {"type": "object", "properties": {}}}
ASKED = dict(model="a", messages=[{"role": "user", "content": "weather in Oslo?"}], max_tokens=200, temperature=0)


def _valid(call) -> None:
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_calls_are_a_list_of_calls_to_the_tools_and_read_back_as_tool_calls():
    functions = {"get_weather": json.dumps(WEATHER), "ping": None}
    schema = json.loads(tool_structure(functions, None, parallel=True).spec)
    calls = [
        {"name": "ping", "parameters": {}},
        {"name": "get_weather", "parameters": {"city": "Oslo", "unit": "celsius"}},
    ]
    jsonschema.validate(calls, schema)
    for wrong in [[], [{"name": "nope", "parameters": {}}], [{"name": "get_weather", "parameters": {"city": 1}}]]:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, schema)
    single = json.loads(tool_structure(functions, None, parallel=False).spec)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(calls, single)
    assert json.loads(tool_structure(functions, "get_weather", parallel=True).spec) == WEATHER

    read = tool_calls(json.dumps(calls), None)
    assert [(c["type"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in read] == [
        ("function", call["name"], call["parameters"]) for call in calls
    ]
    assert len({c["id"] for c in read}) == 2
    assert tool_calls('{"city": "Os', "get_weather") is None  # cut short by max_tokens


def test_a_named_function_is_called_with_arguments_its_schema_validates(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    named = {"type": "function", "function": {"name": "get_weather"}}
    full = client.chat.completions.create(**ASKED, tools=TOOLS, tool_choice=named)
    choice = full.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    _valid(call)

    # Streamed, the call goes out as it is generated: its id and name once, then its arguments' text.
    stream = client.chat.completions.create(**ASKED, tools=TOOLS, tool_choice=named, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [tc for ch in chunks for tc in ch.choices[0].delta.tool_calls or []]
    assert len(deltas) > 2 and {d.index for d in deltas} == {0}
    assert [d.function.name for d in deltas if d.function.name] == ["get_weather"] == [deltas[0].function.name]
    assert [d.id for d in deltas if d.id] == [deltas[0].id] and deltas[0].id.startswith("call_")
    assert "".join(d.function.arguments for d in deltas) == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    required = client.chat.completions.create(**ASKED, tools=TOOLS, tool_choice="required", stream=True)
    whole = [ch.choices[0].delta.tool_calls for ch in required if ch.choices[0].delta.tool_calls]
    assert len(whole) == 1  # "required" calls arrive whole, in the last chunk
    for streamed in whole[0]:
        _valid(streamed)


def test_required_gives_valid_calls_greedy_and_sampled(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    greedy = client.chat.completions.create(**ASKED | {"max_tokens": 400}, tools=TOOLS, tool_choice="required")
    assert greedy.choices[0].finish_reason == "tool_calls"
    for call in greedy.choices[0].message.tool_calls:
        _valid(call)
    sampled = client.chat.completions.create(
        **ASKED | {"temperature": 1.0}, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, n=3, seed=1
    )
    for choice in sampled.choices:
        (call,) = choice.message.tool_calls
        assert choice.finish_reason == "tool_calls"
        _valid(call)


def test_a_conversation_with_calls_and_their_results_goes_on_and_none_answers_in_text(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    call = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'}}
    messages = ASKED["messages"] + [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "12:00"}]},
    ]
    again = client.chat.completions.create(**ASKED | {"messages": messages}, tools=TOOLS, tool_choice="required")
    assert again.choices[0].message.tool_calls
    plain = client.chat.completions.create(**ASKED | {"max_tokens": 12})
    answered = client.chat.completions.create(**ASKED | {"max_tokens": 12}, tools=TOOLS, tool_choice="none")
    assert answered.choices[0].message.content == plain.choices[0].message.content
    assert answered.choices[0].message.tool_calls is None


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"tools": TOOLS}, 'tool_choice: "auto"'),
        ({"tools": TOOLS, "tool_choice": "auto"}, 'tool_choice: "auto"'),
        ({"tool_choice": "required"}, "no tools to choose from"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "no tool is named 'nope'",
        ),
        ({"tools": TOOLS + TOOLS[:1], "tool_choice": "required"}, "two functions share a name"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "not both"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}],
                "tool_choice": "required",
            },
            "invalid schema",
        ),
        ({"messages": [{"role": "user"}]}, "content: a user message needs it"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "content"),
    ],
)
def test_tool_calls_that_cannot_be_followed_are_refused(server, fields, named):
    with server.client() as c:
        refused = c.post("/v1/chat/completions", json=ASKED | fields)
        assert refused.status_code == 422 and named in refused.json()["error"]["message"], refused.text


HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}\n</tool_call>'
OSLO = ("get_weather", {"city": "Oslo", "unit": "celsius"})


@pytest.mark.parametrize(
    "parser, text, read",
    [
        ("hermes", HERMES_CALL, (None, [OSLO])),
        (
            "hermes",
            f'Let me look.\n{HERMES_CALL}\n<tool_call>{{"name": "ping"}}',
            ("Let me look.", [OSLO, ("ping", {})]),
        ),
        ("hermes", "It is sunny in Oslo.", None),
        ("hermes", '<tool_call>\n{"name": "get_weather", "argu', None),  # cut short: the text stands
        ("hermes", '<tool_call>["get_weather"]</tool_call>', None),  # no name: no call
        ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "celsius"}}', (None, [OSLO])),
        (
            "llama3_json",
            '<|python_tag|>{"name": "ping", "parameters": {}}; {"name": "ping"}',
            (None, [("ping", {})] * 2),
        ),
        ("llama3_json", "It is sunny in Oslo.", None),
        ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Os', None),
    ],
)
def test_each_call_format_reads_the_calls_its_models_write(parser, text, read):
    assert CALL_FORMATS[parser].read(text) == read


@pytest.mark.parametrize(
    "parser, text, held_from",
    [
        ("hermes", "Let me look.", 12),
        ("hermes", "Let me look. <tool_", 13),  # may be the marker's first characters
        ("hermes", f"Let me look. {HERMES_CALL}", 13),
        ("llama3_json", "  ", 0),  # not yet known
        ("llama3_json", ' {"name"', 0),
        ("llama3_json", "<|python", 0),
        ("llama3_json", "It is", 5),
    ],
)
def test_a_partial_text_is_content_up_to_where_a_call_may_begin(parser, text, held_from):
    assert CALL_FORMATS[parser].held_from(text) == held_from


CITY = '\\{"city": "[a-z]{1,8}", "unit": "celsius"\\}'
# What each format's models write, held by a regex (the tiny model writes no calls of its own accord):
# the text, the content read before the calls (non-streamed, streamed) and the functions called.
WRITTEN = {
    "hermes": (
        'Sure\\. <tool_call>\\n\\{"name": "get_weather", "arguments": ' + CITY + "\\}\\n</tool_call>",
        ("Sure.", "Sure. "),
        ["get_weather"],
    ),
    "llama3_json": (
        '\\{"name": "get_weather", "parameters": ' + CITY + '\\}; \\{"name": "ping", "parameters": \\{\\}\\}',
        (None, ""),
        ["get_weather", "ping"],
    ),
}


@pytest.fixture(params=sorted(WRITTEN))
def auto_server(request, tiny_model_dir, store):
    with RunningServer(make_settings(tiny_model_dir, store, tool_call_parser=request.param)) as running:
        yield running


def test_auto_reads_the_calls_the_text_writes_in_the_models_format(auto_server):
    client = openai.OpenAI(base_url=f"{auto_server.url}/v1", api_key="unused")
    regex, (content, streamed_content), functions = WRITTEN[auto_server.settings.tool_call_parser]
    held = {"structured_outputs": {"regex": regex}}
    full = client.chat.completions.create(**ASKED, tools=TOOLS, extra_body=held).choices[0]
    assert full.finish_reason == "tool_calls" and full.message.content == content
    assert [call.function.name for call in full.message.tool_calls] == functions
    assert all(call.id.startswith("call_") for call in full.message.tool_calls)
    for call in full.message.tool_calls:
        _valid(call)

    chunks = list(client.chat.completions.create(**ASKED, tools=TOOLS, extra_body=held, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == streamed_content  # sent as generated
    calls = [c for ch in chunks for c in ch.choices[0].delta.tool_calls or ()]
    assert [(c.index, c.function.name, c.function.arguments) for c in calls] == [
        (i, call.function.name, call.function.arguments) for i, call in enumerate(full.message.tool_calls)
    ]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    # Text that writes no call is the answer, streamed or not; "auto" is the default with tools.
    plain = client.chat.completions.create(**ASKED | {"max_tokens": 12}, tools=TOOLS).choices[0]
    assert plain.message.tool_calls is None and plain.message.content and plain.finish_reason == "length"
    streamed = client.chat.completions.create(**ASKED | {"max_tokens": 12}, tools=TOOLS, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed) == plain.message.content
