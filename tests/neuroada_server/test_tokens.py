"""POST /tokenize and /detokenize (vLLM's) against the real HTTP server: the ids generation uses."""

from __future__ import annotations

import pytest

from tests.helpers import tiny_tokenizer
from tests.neuroada_server.conftest import RunningServer, make_settings

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "weather in Oslo?"}]


def test_a_prompts_tokens_are_those_generation_uses_and_come_back_as_its_text(server):
    with server.client() as c:
        tokenized = c.post("/tokenize", json={"prompt": "hello there, cow", "return_token_strs": True}).json()
        ids = tiny_tokenizer()("hello there, cow", add_special_tokens=False).input_ids
        assert tokenized["tokens"] == ids and tokenized["count"] == len(ids)
        assert tokenized["token_strs"] == tiny_tokenizer().convert_ids_to_tokens(ids)
        assert tokenized["max_model_len"] == server.engine.context_length
        generated = c.post("/generate", json={"prompt": "hello there, cow", "max_new_tokens": 1}).json()
        assert generated["usage"]["prompt_tokens"] == len(ids)
        assert c.post("/detokenize", json={"tokens": ids}).json() == {"prompt": "hello there, cow"}
        assert c.post("/detokenize", json={"tokens": []}).json() == {"prompt": ""}


def test_a_conversations_tokens_are_those_chat_generation_uses(server):
    with server.client() as c:
        tokenized = c.post("/tokenize", json={"model": "a", "messages": MESSAGES}).json()
        chat = c.post("/v1/chat/completions", json={"model": "a", "messages": MESSAGES, "max_tokens": 1}).json()
        assert tokenized["count"] == chat["usage"]["prompt_tokens"] == len(tokenized["tokens"])
        closed = c.post("/tokenize", json={"messages": MESSAGES, "add_generation_prompt": False}).json()
        assert closed["count"] < tokenized["count"]  # the assistant's turn is not opened
        assert tokenized["token_strs"] is None


@pytest.mark.parametrize(
    "path, body, status, named",
    [
        ("/tokenize", {"prompt": "hi", "messages": MESSAGES}, 422, "exactly one of prompt, messages"),
        ("/tokenize", {}, 422, "exactly one of prompt, messages"),
        ("/tokenize", {"prompt": "hi", "model": "nope"}, 404, "model 'nope' not found"),
        ("/tokenize", {"prompt": "hi", "truncate": 3}, 422, "truncate"),
        ("/detokenize", {"tokens": [1, 10**6]}, 422, "tokens: token id 1000000 is out of range"),
        ("/detokenize", {"tokens": [-1]}, 422, "tokens"),
    ],
)
def test_what_cannot_be_tokenized_is_refused_by_name(server, path, body, status, named):
    with server.client() as c:
        refused = c.post(path, json=body)
        assert refused.status_code == status and named in refused.json()["error"]["message"], refused.text


def test_tokenizing_needs_the_generation_token_when_one_is_set(tiny_model_dir, store):
    with RunningServer(make_settings(tiny_model_dir, store, api_token="gen-key")) as s, s.client() as c:
        assert c.post("/tokenize", json={"prompt": "hi"}).status_code == 401
        assert c.post("/detokenize", json={"tokens": [1]}).status_code == 401
        allowed = c.post("/tokenize", json={"prompt": "hi"}, headers={"Authorization": "Bearer gen-key"})
        assert allowed.status_code == 200
