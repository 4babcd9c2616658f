"""vLLM's utility endpoints: POST /tokenize (a prompt, or chat messages rendered exactly as
/v1/chat/completions renders them), POST /detokenize, GET /version, in vLLM's shapes."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter
from pydantic import Field

from services.gateway import fields
from services.gateway.errors import bad_request
from services.gateway.protocol import ChatCompletionRequest, StrictBody
from services.gateway.served_model import ContextLimits, ServedModel
from services.gateway.validation import chat_prompt, check_model_name

# What a chat /tokenize body may carry besides its messages, passed to the chat prompt's builder.
_CHAT_FIELDS = (
    "add_generation_prompt",
    "continue_final_message",
    "chat_template",
    "chat_template_kwargs",
    "tools",
    "add_special_tokens",
)


class TokenizeRequest(StrictBody):
    model: str | None = None
    prompt: str | None = None
    messages: list[Any] | None = None
    add_special_tokens: bool | None = Field(
        None, description="default: true for a prompt, false for messages"
    )
    return_token_strs: bool = False


class DetokenizeRequest(StrictBody):
    model: str | None = None
    tokens: list[int]


def tokenize_routes(model: ServedModel, limits: Callable[[], Awaitable[ContextLimits]]) -> APIRouter:
    router = APIRouter()

    @router.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        check_model_name(body.model, model)
        ids = _tokens(body, model)
        strs = model.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return {
            "count": len(ids),
            "max_model_len": (await limits()).max_model_len,
            "tokens": ids,
            "token_strs": strs,
        }

    @router.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        check_model_name(body.model, model)
        known = await limits()
        for i, t in enumerate(body.tokens):
            fields.check_token(t, f"tokens[{i}]", known)
        return {"prompt": model.decode(body.tokens, skip_special_tokens=False)}

    @router.get("/version")
    async def version() -> dict:
        return {"version": importlib.metadata.version("conveyor")}

    return router


def _tokens(body: TokenizeRequest, model: ServedModel) -> list[int]:
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("send either prompt or messages", "prompt" if body.prompt is None else "messages")
    if body.prompt is not None:
        return model.encode(body.prompt, body.add_special_tokens is not False)
    extra = body.model_extra or {}
    chat = {"messages": body.messages, **{k: extra[k] for k in _CHAT_FIELDS if k in extra}}
    if body.add_special_tokens is not None:
        chat["add_special_tokens"] = body.add_special_tokens
    try:
        request = ChatCompletionRequest.model_validate(chat)
    except ValueError as e:  # pydantic's ValidationError: the same checks as the chat route's
        raise bad_request(f"messages: {e}", "messages") from None
    return chat_prompt(request, model)
