"""POST /tokenize and /detokenize (vLLM's): the token ids the server would generate from, and back."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool

from neuroada_server.deps import get_engine, require_api_token
from neuroada_server.dispatch import adapter_for, check_token_ids, render_chat, tokenize
from neuroada_server.engine import Engine
from neuroada_server.schemas import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse

router = APIRouter(dependencies=[Depends(require_api_token)])


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize_text(body: TokenizeRequest, engine: Engine = Depends(get_engine)) -> TokenizeResponse:
    if body.model is not None:
        adapter_for(engine, body.model)
    if body.messages is not None:
        ids = await render_chat(engine, body.messages, add_generation_prompt=body.add_generation_prompt)
    else:
        ids = await tokenize(engine, body.prompt, add_special_tokens=body.add_special_tokens)
    strs = await run_in_threadpool(engine.tokenizer.convert_ids_to_tokens, ids) if body.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=engine.context_length, tokens=ids, token_strs=strs)


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, engine: Engine = Depends(get_engine)) -> DetokenizeResponse:
    if body.model is not None:
        adapter_for(engine, body.model)
    ids = check_token_ids(engine, body.tokens, "tokens")
    return DetokenizeResponse(prompt=await run_in_threadpool(engine.tokenizer.decode, ids))
