"""Errors in the OpenAI API's JSON shape: `{"error": {"message", "type", "param", "code"}}`.

Everything a client can get wrong is raised as an `ApiError` naming the field (`param`)
and the limit; the handlers here also turn FastAPI's own errors (422 validation errors,
malformed JSON, unknown routes) into that shape, so a client never sees another one.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.messages import ErrorCode

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # queue full, or nothing to serve yet: worth asking again soon
RETRY_AFTER_QUEUE_TIMEOUT_S = 5  # it waited its whole queue timeout already: back off longer


def retry_after(seconds: int = RETRY_AFTER_S) -> dict[str, str]:
    """The headers of an answer the client should retry."""
    return {"Retry-After": str(seconds)}


# OpenAI's error `type` of an HTTP status, where it is neither invalid_request_error (4xx) nor server_error.
_TYPES = {429: "rate_limit_exceeded", 503: "service_unavailable"}


class ApiError(Exception):
    """A request the gateway refuses; `param` names the offending field (dotted path)."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)


# How a request the scheduler ended with an error is answered:
# error code -> (HTTP status, the field at fault, Retry-After seconds).
_SCHEDULER_ERRORS: dict[ErrorCode, tuple[int, str | None, int | None]] = {
    ErrorCode.TOO_LONG: (400, "max_tokens", None),  # longer than any worker can hold
    ErrorCode.INVALID_REQUEST: (400, None, None),
    ErrorCode.QUEUE_TIMEOUT: (503, None, RETRY_AFTER_QUEUE_TIMEOUT_S),  # overloaded
    ErrorCode.GATEWAY_GONE: (503, None, RETRY_AFTER_S),  # its gateway was declared gone, or shut down first
    ErrorCode.REQUEST_TIMEOUT: (504, None, None),
    ErrorCode.WORKER_FAILED: (500, None, None),
    ErrorCode.INTERNAL: (500, None, None),
}


def scheduler_error(code: ErrorCode | None, message: str | None) -> ApiError:
    """The answer to a request that ended with `code` (None: an older scheduler's, taken
    as INTERNAL); `message` is for the person reading it, never parsed."""
    status, param, seconds = _SCHEDULER_ERRORS[code or ErrorCode.INTERNAL]
    text = message or "the request failed in the scheduler"
    if status == 400:
        text = f"the request was refused: {text}"
    elif status == 500:
        text = f"generation failed: {text}"
    return ApiError(
        status,
        text,
        param,
        code=(code or ErrorCode.INTERNAL).value,
        headers=retry_after(seconds) if seconds else None,
    )


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def field_path(loc: tuple) -> str | None:
    """('body', 'messages', 0, 'content') -> 'messages[0].content'."""
    out = ""
    for p in loc:
        if p != "body":
            out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or None


def validation_error(exc: RequestValidationError) -> ApiError:
    """The first few problems, each prefixed with its field; `param` is the first field."""
    errors = list(exc.errors())
    if not errors:
        return bad_request("invalid request body")
    if errors[0].get("type") == "json_invalid":
        ctx = errors[0].get("ctx") or {}
        return bad_request(f"malformed JSON body: {ctx.get('error', errors[0].get('msg'))}")
    messages = []
    for e in errors[:3]:
        path = field_path(tuple(e.get("loc", ())))
        msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
        if e.get("type") == "missing":
            msg = "this field is required" if path else "missing: send a JSON object"
        elif path is None:
            msg = "must be a JSON object (Content-Type: application/json)"
        messages.append(f"{path}: {msg}" if path else f"request body: {msg}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return bad_request("; ".join(messages) + more, field_path(tuple(errors[0].get("loc", ()))))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            message = "no such route; the API is under /v1 (completions, chat/completions, models)"
        return error_response(ApiError(exc.status_code, message, headers=getattr(exc, "headers", None)))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # A bug, never the client's fault: log it with its traceback, answer in the same shape.
        log.exception("internal error")
        return error_response(ApiError(500, f"internal error: {type(exc).__name__}"))
