"""ASGI middleware: the API key check, and 413 for bodies larger than max_body_bytes, both
before any parsing. Plain ASGI (not BaseHTTPMiddleware), so streams and `http.disconnect`
pass through untouched: the body is handed on as one message, later `receive()`s go
straight to the server.
"""

from __future__ import annotations

import hmac
import json

from services.gateway.errors import error_body


class BodySizeLimit:
    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._too_large(send, declared)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # gone before sending its body: nothing to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(send, None)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        whole = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():  # the whole body once, then the server's own messages
            return whole.pop() if whole else await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send, declared) -> None:
        size = f"{declared} bytes" if declared is not None else "more than that"
        payload = json.dumps(
            error_body(
                413,
                f"request body too large: {size}; the limit is {self.max_bytes} bytes (max_body_bytes)",
                code="request_too_large",
            )
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})


def _content_length(scope) -> int | None:
    value = dict(scope.get("headers", [])).get(b"content-length")
    try:
        return None if value is None else int(value)
    except ValueError:
        return None


class ApiKeyAuth:
    """When an API key is set, every /v1/ request needs `Authorization: Bearer <key>`;
    /health and /metrics stay open for probes and scrapers. Checked before the body is
    read, so an unauthenticated client learns nothing else."""

    def __init__(self, app, api_key: str | None):
        self.app = app
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if self.api_key is None or scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers", [])).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key):
            await self.app(scope, receive, send)
            return
        reason = "missing API key" if not header else "wrong API key"
        payload = json.dumps(
            error_body(
                401, f"{reason}: send the header 'Authorization: Bearer <key>'", code="invalid_api_key"
            )
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                    (b"www-authenticate", b"Bearer"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})
