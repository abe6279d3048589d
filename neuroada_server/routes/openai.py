"""OpenAI-compatible endpoints: /v1/completions, /v1/chat/completions, /v1/models.

`model` names an adapter, or the base model by its name.
"""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from neuroada_server.deps import get_engine, require_api_token
from neuroada_server.dispatch import Submitted, check_prompt_chars, submit, tokenize
from neuroada_server.engine import Engine
from neuroada_server.errors import ApiError
from neuroada_server.generation import Finished, TextDelta
from neuroada_server.schemas import STREAMING_RESPONSE, ChatCompletionRequest, CompletionRequest, Usage

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_token)])


def _adapter_for(engine: Engine, model: str) -> str | None:
    if model == engine.model_name:
        return None
    if not engine.catalog.servable(model):
        raise ApiError(
            404,
            f"model {model!r} not found: use the base model {engine.model_name!r} or an adapter name",
            "model_not_found",
        )
    return model


@router.get("/models")
async def list_models(engine: Engine = Depends(get_engine)):
    created = int(time.time())
    data = [{"id": engine.model_name, "object": "model", "created": created, "owned_by": "neuroada"}]
    _, adapters = engine.catalog.page()
    data += [
        {
            "id": a["name"],
            "object": "model",
            "created": int(a["loaded_at"] or created),
            "owned_by": "neuroada",
            "parent": engine.model_name,
        }
        for a in adapters
    ]
    return {"object": "list", "data": data}


@router.post("/completions", responses=STREAMING_RESPONSE)
async def completions(body: CompletionRequest, http: Request, response: Response, engine: Engine = Depends(get_engine)):
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise ApiError(422, f"prompt: exactly one prompt per request is supported, got {len(prompts)}")
    adapter = _adapter_for(engine, body.model)
    ids = await tokenize(engine, prompts[0])
    job = submit(engine, ids, adapter, body.sampling(body.max_tokens), body.timeout_s)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:

        def chunk(text: str, finish: str | None) -> dict:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            return _envelope(rid, "text_completion", created, body.model, choice)

        return _stream(job, chunk)
    done = await job.result(http)
    response.headers.update(job.headers)
    choice = {"index": 0, "text": done.text, "logprobs": None, "finish_reason": _finish(done)}
    return _envelope(rid, "text_completion", created, body.model, choice, Usage.of(done).model_dump())


@router.post("/chat/completions", responses=STREAMING_RESPONSE)
async def chat_completions(
    body: ChatCompletionRequest, http: Request, response: Response, engine: Engine = Depends(get_engine)
):
    adapter = _adapter_for(engine, body.model)
    messages = [m.model_dump() for m in body.messages]
    check_prompt_chars(engine, sum(len(m["content"]) for m in messages))
    try:
        ids = await run_in_threadpool(
            engine.tokenizer.apply_chat_template, messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
    except Exception as e:  # a tokenizer without a chat template, or messages it refuses
        raise ApiError(422, f"messages: the tokenizer's chat template cannot render them: {e}") from None
    if isinstance(ids, dict):
        ids = ids["input_ids"]
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is None:  # as much as fits, up to a default
        room = engine.context_length - len(ids) if engine.context_length is not None else 256
        max_tokens = max(1, min(256, engine.settings.max_new_tokens, room))
    job = submit(engine, list(ids), adapter, body.sampling(max_tokens), body.timeout_s)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        first = True

        def chunk(text: str, finish: str | None) -> dict:
            nonlocal first
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            first = False
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            return _envelope(rid, "chat.completion.chunk", created, body.model, choice)

        return _stream(job, chunk)
    done = await job.result(http)
    response.headers.update(job.headers)
    choice = {"index": 0, "message": {"role": "assistant", "content": done.text}, "finish_reason": _finish(done)}
    return _envelope(rid, "chat.completion", created, body.model, choice, Usage.of(done).model_dump())


def _envelope(rid: str, kind: str, created: int, model: str, choice: dict, usage: dict | None = None) -> dict:
    """The OpenAI response (or stream chunk) around one choice."""
    body = {"id": rid, "object": kind, "created": created, "model": model, "choices": [choice]}
    if usage is not None:
        body["usage"] = usage
    return body


def _stream(job: Submitted, chunk) -> StreamingResponse:
    def render(event: TextDelta | Finished) -> dict:
        return chunk(event.text, None) if isinstance(event, TextDelta) else chunk("", _finish(event))

    return job.streaming_response(render)


def _finish(done: Finished) -> str:
    return "length" if done.finish_reason == "length" else "stop"
