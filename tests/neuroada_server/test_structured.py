"""Structured outputs: texts held to a JSON schema, any JSON object, a regex, choices or a grammar,
through the real HTTP server; rows beside them unchanged; structures that do not compile refused."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
import torch

from neuroada_server.structured import Constraint, Grammar, Grammars, Structure, StructureError
from tests.helpers import tiny_tokenizer
from tests.neuroada_server.conftest import adapted_model, generate, metric

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "kind": {"enum": ["cow", "owl", "cat"]},
        "tame": {"type": "boolean"},
        "legs": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["name", "kind", "tame", "legs"],
}


CHOICES = ["yes", 'a "quoted"\nno', "\u00e9t\u00e9 \U0001f600", "maybe"]


def _nested_arrays(depth: int) -> str:
    """A schema of arrays in arrays, as JSON text (too deep for Python's json.dumps at thousands of levels)."""
    return '{"type": "array", "items": ' * depth + '{"type": "integer"}' + "}" * depth


@pytest.fixture(scope="module")
def grammars() -> Grammars:
    tokenizer = tiny_tokenizer()
    return Grammars(tokenizer, len(tokenizer), {tokenizer.eos_token_id})


def test_constraint_masks_every_token_the_grammar_does_not_allow_next(grammars):
    tokenizer = tiny_tokenizer()
    constraint = Constraint(grammars.compile(Structure("regex", "[ab]c")))
    logits = torch.randn(len(tokenizer))

    def allowed() -> set[str]:
        masked = constraint.masked(logits)
        return {tokenizer.decode([t]) for t in torch.nonzero(masked.isfinite())[:, 0].tolist()}

    assert allowed() == {"a", "b"}
    assert constraint.accept(tokenizer.convert_tokens_to_ids("b"))
    assert not constraint.accept(tokenizer.convert_tokens_to_ids("b"))  # refused: the matcher stays put
    assert allowed() == {"c"}
    assert constraint.accept(tokenizer.convert_tokens_to_ids("c"))
    assert allowed() == {"<eos>"}  # complete: only the end of sequence may follow


def test_a_json_string_refuses_raw_control_characters_and_surrogates(grammars):
    """xgrammar alone lets a string with a maxLength hold raw control characters (invalid JSON,
    mlc-ai/xgrammar#800), and any string UTF-8-encoded surrogates."""
    bounded = grammars.compile(Structure("json_schema", json.dumps({"type": "string", "maxLength": 3})))
    unbounded = grammars.compile(Structure("json_schema", json.dumps({"type": "string"})))
    byte_tokens = {token: i for i, token in enumerate(bounded.compiled.tokenizer_info.decoded_vocab)}

    def follows(grammar: Grammar, text: str) -> bool:  # its UTF-8 bytes, one token each (the tiny tokenizer's)
        constraint = Constraint(grammar)
        return all(constraint.accept(byte_tokens[bytes([b])]) for b in text.encode("utf-8", "surrogatepass"))

    assert follows(bounded, '"a\u00e9b"') and not follows(bounded, '"abcd')
    assert follows(unbounded, '"a\\nb \u00e9"')
    for grammar in [bounded, unbounded]:
        assert not follows(grammar, '"a\x07') and not follows(grammar, '"\ttab')
        assert not follows(grammar, '"\ud800')  # a surrogate: no character (Python decodes its bytes to U+FFFD)


@pytest.mark.parametrize(
    "structure, reason",
    [
        (Structure("json_schema", '{"type": "objectx"}'), "invalid schema at type: 'objectx' is not valid"),
        (Structure("json_schema", '{"anyOf": []}'), "invalid schema at anyOf: [] should be non-empty"),
        (Structure("json_schema", "nope"), "the schema is not JSON"),
        (Structure("json_schema", '{"enum": []}'), "enum array must not be empty"),  # xgrammar's own check
        (Structure("regex", "(a"), "parenthesis is not closed"),
        (Structure("grammar", "root ::= "), "EBNF parser error"),
        (Structure("grammar", "\u008eN"), "it does not parse"),  # found by benchmarks/fuzz.py: it was a 500
    ],
)
def test_a_structure_that_does_not_compile_raises_with_the_reason_alone(grammars, structure, reason):
    with pytest.raises(StructureError, match=re.escape(reason)) as raised:
        grammars.compile(structure)
    assert ".cc:" not in str(raised.value)  # xgrammar's source location is left out


def test_greedy_structured_text_is_the_masked_argmax_at_every_step(server, store):
    """The served text equals whole-sequence forwards with the grammar's mask applied at every step,
    for a structure that refuses the model's own choice at some steps and takes it at others (the
    server computes the mask only when it refuses)."""
    regex = r"[ -~]{8,40}\."  # printable ASCII, then a full stop
    tokenizer = tiny_tokenizer()
    model = adapted_model(store / "a.safetensors")
    constraint = Constraint(
        Grammars(tokenizer, len(tokenizer), {tokenizer.eos_token_id}).compile(Structure("regex", regex))
    )
    ids = tokenizer("hello there", add_special_tokens=False).input_ids
    generated, refused = [], 0
    with torch.no_grad():
        while not generated or generated[-1] != tokenizer.eos_token_id:
            logits = model(torch.tensor([ids + generated])).logits[0, -1]
            generated.append(int(constraint.masked(logits).argmax()))
            refused += generated[-1] != int(logits.argmax())
            assert constraint.accept(generated[-1]) and len(generated) <= 42
    assert 0 < refused < len(generated) - 1
    with server.client() as c:
        body = {"prompt": "hello there", "max_new_tokens": 60, "structured_outputs": {"regex": regex}}
        r = c.post("/generate", params={"adapter": "a"}, json=body)
    assert r.status_code == 200 and r.json()["text"] == tokenizer.decode(generated, skip_special_tokens=True)


def test_chat_json_schema_through_the_openai_client_streamed_or_not(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    asked = dict(
        model="a",
        messages=[{"role": "user", "content": "describe an animal"}],
        max_tokens=200,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "animal", "schema": PERSON}},
    )
    full = client.chat.completions.create(**asked)
    jsonschema.validate(json.loads(full.choices[0].message.content), PERSON)
    assert full.choices[0].finish_reason == "stop"  # it ended where the object did
    chunks = list(client.chat.completions.create(**asked, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == full.choices[0].message.content

    sampled = client.chat.completions.create(**asked | {"temperature": 1.0, "seed": 3, "n": 4})
    for choice in sampled.choices:
        jsonschema.validate(json.loads(choice.message.content), PERSON)


@pytest.mark.parametrize(
    "structured_outputs, follows",
    [
        ({"json_object": True}, lambda text: isinstance(json.loads(text), dict)),
        ({"json": json.dumps(PERSON)}, lambda text: jsonschema.validate(json.loads(text), PERSON) is None),
        ({"regex": r"[0-9]{3}-[a-z]{2,4}"}, lambda text: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", text)),
        ({"choice": CHOICES}, lambda text: text in CHOICES),
        ({"grammar": 'root ::= "(" [a-c]+ ")" | "none"'}, lambda text: re.fullmatch(r"\([a-c]+\)|none", text)),
    ],
)
def test_vllm_structured_outputs_hold_greedy_and_sampled_texts(server, structured_outputs, follows):
    with server.client() as c:
        for sampling in [{"temperature": 0}, {"temperature": 1.0, "seed": 5, "n": 3}]:
            body = {"model": "b", "prompt": "hello", "max_tokens": 300, "structured_outputs": structured_outputs}
            r = c.post("/v1/completions", json=body | sampling)
            assert r.status_code == 200, r.text
            for choice in r.json()["choices"]:
                assert follows(choice["text"]), choice["text"]
                assert choice["finish_reason"] == "stop"
        native = c.post(
            "/generate", json={"prompt": "hi", "max_new_tokens": 300, "structured_outputs": structured_outputs}
        )
        assert native.status_code == 200 and follows(native.json()["text"]), native.text


@pytest.mark.parametrize(
    "guided, structured_outputs",
    [
        ({"guided_json": PERSON}, {"json": PERSON}),
        ({"guided_regex": r"[0-9]{3}-[a-z]{2,4}"}, {"regex": r"[0-9]{3}-[a-z]{2,4}"}),
        ({"guided_choice": CHOICES}, {"choice": CHOICES}),
        ({"guided_grammar": 'root ::= "(" [a-c]+ ")"'}, {"grammar": 'root ::= "(" [a-c]+ ")"'}),
    ],
)
def test_vllms_old_guided_names_are_the_same_structures(server, guided, structured_outputs):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    asked = dict(model="b", prompt="hello", max_tokens=300, temperature=0)
    old = client.completions.create(**asked, extra_body=guided).choices[0]
    new = client.completions.create(**asked, extra_body={"structured_outputs": structured_outputs}).choices[0]
    assert old.text == new.text and old.finish_reason == "stop"


def test_constrained_rows_leave_the_rows_beside_them_unchanged(server):
    prompts = ["hello there", "what does the cow say?", "1 + 2 ="]
    with server.client() as c:
        solo = {p: generate(c, p, "a", n=24) for p in prompts}

        def constrained(i: int) -> str:
            body = {"prompt": f"animal {i}", "max_new_tokens": 200, "structured_outputs": {"json": PERSON}}
            r = c.post("/generate", params={"adapter": "a" if i % 2 else None}, json=body)
            assert r.status_code == 200, r.text
            return r.json()["text"]

        with ThreadPoolExecutor(8) as pool:
            plain = [pool.submit(generate, c, p, "a", 24) for p in prompts]
            structured = [pool.submit(constrained, i) for i in range(4)]
            assert {p: f.result() for p, f in zip(prompts, plain)} == solo
            for f in structured:
                jsonschema.validate(json.loads(f.result()), PERSON)


@pytest.mark.parametrize(
    "fields, named",
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
            "structured output (json_schema): invalid schema at type",
        ),
        ({"structured_outputs": {"regex": "(a"}}, "structured output (regex): Regex parsing error"),
        ({"structured_outputs": {"grammar": "root ::= ("}}, "structured output (grammar): EBNF parser error"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "exactly one of"),
        ({"structured_outputs": {"choice": []}}, "choice"),
        ({"structured_outputs": {"json_schema": {}}}, "json_schema"),  # vLLM's name is "json"
        ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}}, "not both"),
        ({"structured_outputs": {"regex": "a"}, "ignore_eos": True}, "ignore_eos"),
        ({"structured_outputs": {"choice": ["yes", "no"]}, "min_tokens": 3}, "min_tokens"),
        ({"guided_regex": "a", "guided_choice": ["b"]}, "give one structure, not guided_regex and guided_choice"),
        ({"guided_regex": "a", "structured_outputs": {"regex": "a"}}, "not guided_regex and structured_outputs"),
        ({"structured_outputs": {"json": json.loads(_nested_arrays(100))}}, "deeper than 64 levels"),
        ({"structured_outputs": {"json": _nested_arrays(2000)}}, "deeper than 64 levels"),
    ],
)
def test_structures_that_cannot_be_followed_are_refused_and_change_nothing(server, fields, named):
    with server.client() as c:
        before = generate(c, "hello there", None)
        refused = c.post("/v1/completions", json={"model": "a", "prompt": "hi", "max_tokens": 4} | fields)
        assert refused.status_code == 422 and named in refused.json()["error"]["message"], refused.text
        assert generate(c, "hello there", None) == before
        assert server.engine.base_weights_intact()


def test_a_structure_no_text_satisfies_fails_its_request_alone(server):
    impossible = 'root ::= "a" b\nb ::= b "c"'  # compiles; no token follows "a"
    with server.client() as c:
        solo = generate(c, "hello there", "a", n=24)
        with ThreadPoolExecutor(2) as pool:
            plain = pool.submit(generate, c, "hello there", "a", 24)
            body = {"prompt": "hi", "max_new_tokens": 50, "structured_outputs": {"grammar": impossible}}
            r = c.post("/generate", params={"adapter": "a"}, json=body)
            assert r.status_code == 500 and r.json()["error"]["code"] == "grammar", r.text
            assert "no token can continue" in r.json()["error"]["message"]
            assert plain.result() == solo


def test_structured_requests_are_counted_by_kind_with_their_compile_times(server):
    with server.client() as c:
        for structured_outputs in [{"regex": "[ab]{2}"}, {"regex": "[ab]{2}"}, {"choice": ["x", "y"]}]:
            body = {"prompt": "hi", "max_new_tokens": 8, "structured_outputs": structured_outputs}
            assert c.post("/generate", json=body).status_code == 200
        body = {"prompt": "hi", "max_new_tokens": 8, "structured_outputs": {"regex": "("}}
        assert c.post("/generate", json=body).status_code == 422  # refused: not counted
        assert metric(c, 'neuroada_structured_requests_total{kind="regex"}') == 2
        assert metric(c, 'neuroada_structured_requests_total{kind="choice"}') == 1
        assert metric(c, "neuroada_structure_compile_seconds_count") == 4
