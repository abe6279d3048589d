"""OpenAI-compatible endpoints: /v1/completions, /v1/chat/completions, /v1/models.

`model` names an adapter, or the base model by its name.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse
from transformers import PreTrainedTokenizerBase

from neuroada_server.deps import get_engine, require_api_token
from neuroada_server.dispatch import (
    Submitted,
    adapter_for,
    check_token_ids,
    render_chat,
    submit,
    tokenize,
    with_structure,
)
from neuroada_server.engine import Engine
from neuroada_server.errors import ApiError
from neuroada_server.generation import Finished, PromptLogprobs, TextDelta, TokenLogprob
from neuroada_server.schemas import (
    STREAMING_RESPONSE,
    ChatCompletionRequest,
    CompletionRequest,
    OpenAISamplingFields,
    Usage,
)
from neuroada_server.tools import CALL_FORMATS, CallFormat, call_id, openai_calls, tool_calls

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_token)])


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
    adapter = adapter_for(engine, body.model)
    prompts = [await tokenize(engine, p) if isinstance(p, str) else check_token_ids(engine, p) for p in body.prompts]
    # echo with logprobs: the prompt's tokens' logprobs too (vLLM's prompt_logprobs), the same number of alternatives.
    prompt_logprobs = body.logprobs if body.echo else None
    params = await with_structure(
        engine, body.sampling(body.max_tokens, body.logprobs, prompt_logprobs), body.structure
    )
    job = submit(engine, prompts, adapter, params, body.timeout_s, body.n)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    choices = len(prompts) * body.n  # choice i is a generation of prompt i // n
    echoes = [_prompt_text(engine, p) if body.echo else "" for p in body.prompts for _ in range(body.n)]
    # Per choice: its text_offset counts on across a stream's chunks.
    logprobs = [CompletionLogprobs(engine.tokenizer) for _ in range(choices)] if body.logprobs is not None else None

    def choice(index: int, text: str, finish: str | None, tokens: tuple[TokenLogprob, ...] | None) -> dict:
        rendered = logprobs[index].render(tokens) if logprobs is not None else None
        return {"index": index, "text": text, "logprobs": rendered, "finish_reason": finish}

    if body.stream:

        def chunk(index: int, text: str, finish: str | None, tokens: tuple[TokenLogprob, ...]) -> dict:
            return _envelope(rid, "text_completion", created, body.model, [choice(index, text, finish, tokens)])

        # The echo leads each choice's text: with its tokens' logprobs when they arrive (first), else at once.
        first = [chunk(i, echoes[i], None, ()) for i in range(choices)] if body.echo and prompt_logprobs is None else []
        usage = _usage_chunk(body, rid, "text_completion", created)
        return _stream(job, chunk, first, echoes, usage)
    done = await job.results(http)
    response.headers.update(job.headers)
    rendered = [
        choice(i, echoes[i] + d.text, _finish(d), (d.prompt_logprobs or ()) + d.logprobs if logprobs else None)
        for i, d in enumerate(done)
    ]
    return _envelope(rid, "text_completion", created, body.model, rendered, Usage.of(done, body.n).model_dump())


def _prompt_text(engine: Engine, prompt: str | list[int]) -> str:
    """A prompt as `echo` shows it: as sent, or its token ids' text."""
    return prompt if isinstance(prompt, str) else engine.tokenizer.decode(prompt)


@router.post("/chat/completions", responses=STREAMING_RESPONSE)
async def chat_completions(
    body: ChatCompletionRequest, http: Request, response: Response, engine: Engine = Depends(get_engine)
):
    adapter = adapter_for(engine, body.model)
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(422, "top_logprobs: set logprobs to true to use it")
    call_format = None
    if body.auto_tools:
        parser = engine.settings.tool_call_parser
        if parser is None:
            raise ApiError(
                422,
                'tool_choice: "auto" (the default with tools) reads calls in the model\'s own format: start the '
                'server with --tool-call-parser (hermes or llama3_json), or use "required", a named function or "none"',
            )
        call_format = CALL_FORMATS[parser]
    ids = await render_chat(engine, body.messages, body.template_tools)
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is None:  # as much as fits, up to a default
        room = engine.context_length - len(ids) if engine.context_length is not None else 256
        max_tokens = max(1, min(256, engine.settings.max_new_tokens, room))
    params = await with_structure(engine, body.sampling(max_tokens, body.logprobs_n), body.structure)
    job = submit(engine, [list(ids)], adapter, params, body.timeout_s, body.n)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def logprobs(tokens: tuple[TokenLogprob, ...] | None) -> dict | None:
        return _chat_logprobs(engine.tokenizer, tokens) if body.logprobs else None

    if body.stream:
        started = set()  # the choices whose role has been sent (in their first chunk)
        held = {}  # per choice, the text of its tool calls so far (auto: the whole text so far)
        sent = {}  # auto: per choice, the characters of its text sent as content

        def chunk(index: int, text: str, finish: str | None, tokens: tuple[TokenLogprob, ...]) -> dict:
            first = index not in started
            started.add(index)
            if body.calls_tools:
                delta, finish = _tool_call_delta(body.named_tool, held, index, text, finish)
            elif call_format is not None:
                delta, finish = _auto_delta(call_format, held, sent, index, text, finish)
            else:
                delta = {"content": text} if text or first else {}
            delta = ({"role": "assistant"} if first else {}) | delta
            choice = {"index": index, "delta": delta, "logprobs": logprobs(tokens), "finish_reason": finish}
            return _envelope(rid, "chat.completion.chunk", created, body.model, [choice])

        return _stream(job, chunk, last=_usage_chunk(body, rid, "chat.completion.chunk", created))
    done = await job.results(http)
    response.headers.update(job.headers)
    choices = []
    for i, d in enumerate(done):
        if body.calls_tools:
            message, finish = _answered(d.text, _finish(d), body.named_tool)
        elif call_format is not None:
            message, finish = _answered_auto(d.text, _finish(d), call_format)
        else:
            message, finish = {"content": d.text}, _finish(d)
        message = {"role": "assistant"} | message
        choices.append({"index": i, "message": message, "logprobs": logprobs(d.logprobs), "finish_reason": finish})
    return _envelope(rid, "chat.completion", created, body.model, choices, Usage.of(done, body.n).model_dump())


def _answered(text: str, finish: str, named: str | None) -> tuple[dict, str]:
    """A tool-calling choice's message fields and finish reason: the calls read from its text, or
    the text itself where it does not parse (cut short)."""
    calls = tool_calls(text, named)
    if calls is None:
        return {"content": text}, finish
    return {"content": None, "tool_calls": calls}, "tool_calls"


def _answered_auto(text: str, finish: str, call_format: CallFormat) -> tuple[dict, str]:
    """A choice under tool_choice "auto": the calls its text writes in the model's format (and the text
    before them as content), or the text itself."""
    read = call_format.read(text)
    if read is None:
        return {"content": text}, finish
    content, calls = read
    return {"content": content, "tool_calls": openai_calls(calls)}, "tool_calls"


def _auto_delta(
    call_format: CallFormat, held: dict[int, str], sent: dict[int, int], index: int, text: str, finish: str | None
) -> tuple[dict, str | None]:
    """A streamed choice's delta under tool_choice "auto": its text goes out as content up to where a
    call may begin; from there it is held, and at the end sent as the calls it writes (whole), or as
    content where it writes none."""
    whole = held[index] = held.get(index, "") + text
    done = sent.get(index, 0)
    if finish is None:
        safe = max(done, call_format.held_from(whole))
        sent[index] = safe
        return ({"content": whole[done:safe]} if safe > done else {}), None
    read = call_format.read(whole)
    if read is None:
        return ({"content": whole[done:]} if len(whole) > done else {}), finish
    return {"tool_calls": _indexed(openai_calls(read[1]))}, "tool_calls"


def _tool_call_delta(
    named: str | None, held: dict[int, str], index: int, text: str, finish: str | None
) -> tuple[dict, str | None]:
    """A streamed choice's delta of tool calls and its finish reason. A named function's call goes
    out as it is generated (its id and name first, then its arguments' text); "required" calls are
    held until the choice ends, then sent whole. A text that ends unparsed is cut short: content
    for "required", the arguments sent so far for a named function; finish_reason "length"."""
    start = index not in held
    held[index] = held.get(index, "") + text
    if named is not None:
        call = {"index": 0, "function": {"arguments": text}}
        if start:
            call = {"index": 0, "id": call_id(), "type": "function"} | call
            call["function"] = {"name": named} | call["function"]
        delta = {"tool_calls": [call]} if start or text else {}
        if finish is not None and tool_calls(held[index], named) is not None:
            finish = "tool_calls"
        return delta, finish
    if finish is None:
        return {}, None
    message, finish = _answered(held[index], finish, None)
    if "tool_calls" in message:
        return {"tool_calls": _indexed(message["tool_calls"])}, finish
    return message, finish


def _indexed(calls: list[dict]) -> list[dict]:
    """Tool calls as a streamed delta lists them: each with its index."""
    return [{"index": i} | call for i, call in enumerate(calls)]


def _token_texts(tokenizer: PreTrainedTokenizerBase, tokens: tuple[TokenLogprob, ...]) -> dict[int, str]:
    """Each token's own text (as vLLM lists them: a token that is part of a character shows as
    U+FFFD), for the generated tokens and their alternatives, in one tokenizer call."""
    ids = list({i for t in tokens for i in (t.token, *(alt for alt, _ in t.top))})
    return dict(zip(ids, tokenizer.batch_decode([[i] for i in ids])))


class CompletionLogprobs:
    """/v1/completions' logprobs object (OpenAI's legacy shape), chunk by chunk in a stream:
    `text_offset` counts on from the tokens rendered before."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self.offset = 0  # characters of the tokens rendered so far

    def render(self, tokens: tuple[TokenLogprob, ...]) -> dict:
        text = _token_texts(self.tokenizer, tokens)
        offsets = []
        for t in tokens:
            offsets.append(self.offset)
            self.offset += len(text[t.token])
        return {
            "tokens": [text[t.token] for t in tokens],
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [None if t.logprob is None else _most_likely_per_text(t.top, text) for t in tokens],
            "text_offset": offsets,
        }


def _most_likely_per_text(top: tuple[tuple[int, float], ...], text: dict[int, str]) -> dict[str, float]:
    """The legacy shape's {text: logprob}, most likely first. Tokens of one text (parts of characters
    show as U+FFFD) share a key: the most likely of them keeps it."""
    by_text: dict[str, float] = {}
    for token, logprob in top:
        by_text.setdefault(text[token], logprob)
    return by_text


def _chat_logprobs(tokenizer: PreTrainedTokenizerBase, tokens: tuple[TokenLogprob, ...]) -> dict:
    """/v1/chat/completions' logprobs object: per token its text, bytes, logprob and alternatives."""
    text = _token_texts(tokenizer, tokens)

    def entry(token: int, logprob: float) -> dict:
        return {"token": text[token], "logprob": logprob, "bytes": list(text[token].encode())}

    return {"content": [entry(t.token, t.logprob) | {"top_logprobs": [entry(*alt) for alt in t.top]} for t in tokens]}


def _envelope(rid: str, kind: str, created: int, model: str, choices: list[dict], usage: dict | None = None) -> dict:
    """The OpenAI response (or stream chunk) around its choices."""
    body = {"id": rid, "object": kind, "created": created, "model": model, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body


def _usage_chunk(body: OpenAISamplingFields, rid: str, kind: str, created: int):
    """`stream_options.include_usage`'s last chunk (no choices, the request's usage), or None."""
    if body.stream_options is None or not body.stream_options.include_usage:
        return None
    n = body.n
    return lambda done: _envelope(rid, kind, created, body.model, [], Usage.of(done, n).model_dump())


def _stream(
    job: Submitted,
    chunk,
    first: list[dict] = (),
    echoes: list[str] | None = None,
    last: Callable[[list[Finished]], dict] | None = None,
) -> StreamingResponse:
    """`first`, then `chunk(choice, text, finish_reason, logprobs)` per event: a prompt's logprobs
    with its echo (`echoes[choice]`), a text delta's text and logprobs; a choice's final chunk
    carries the logprobs of its tokens no text delta did (a stop string's, a token with no text of its
    own); then `last` (the usage chunk)."""
    sent = [0] * len(job.requests)  # per choice, logprobs sent in its deltas

    def render(index: int, event: PromptLogprobs | TextDelta | Finished) -> dict:
        if isinstance(event, PromptLogprobs):
            return chunk(index, echoes[index], None, event.logprobs)
        if isinstance(event, TextDelta):
            sent[index] += len(event.logprobs)
            return chunk(index, event.text, None, event.logprobs)
        return chunk(index, "", _finish(event), (event.logprobs or ())[sent[index] :])

    return job.streaming_response(render, first, last)


def _finish(done: Finished) -> str:
    return "length" if done.finish_reason == "length" else "stop"
