"""POST /generate: our native generation endpoint (JSON, or server-sent events with stream=true)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request, Response

from neuroada_server.deps import get_engine, require_api_token
from neuroada_server.dispatch import submit, tokenize, with_structure
from neuroada_server.engine import Engine
from neuroada_server.errors import ApiError
from neuroada_server.generation import Finished, TextDelta
from neuroada_server.schemas import STREAMING_RESPONSE, GenerateRequest, GenerateResponse, Usage

router = APIRouter(dependencies=[Depends(require_api_token)])


@router.post("/generate", response_model=GenerateResponse, responses=STREAMING_RESPONSE)
async def generate(
    body: GenerateRequest,
    http: Request,
    response: Response,
    adapter: str | None = Query(None, description="adapter name (or 'adapter' in the body)"),
    engine: Engine = Depends(get_engine),
):
    if adapter and body.adapter and adapter != body.adapter:
        raise ApiError(422, f"adapter given twice: {adapter!r} in the query, {body.adapter!r} in the body")
    name = adapter or body.adapter
    prompt_ids = await tokenize(engine, body.prompt)
    params = await with_structure(engine, body.sampling(body.max_new_tokens), body.structure)
    job = submit(engine, [prompt_ids], name, params, body.timeout_s)
    if not body.stream:
        (done,) = await job.results(http)
        response.headers.update(job.headers)
        return GenerateResponse(text=done.text, adapter=name, finish_reason=done.finish_reason, usage=Usage.of([done]))

    def render(_: int, event: TextDelta | Finished) -> dict:
        if isinstance(event, TextDelta):
            return {"text": event.text}
        return {
            "text": "",
            "finish_reason": event.finish_reason,
            "adapter": name,
            "usage": Usage.of([event]).model_dump(),
        }

    return job.streaming_response(render)
