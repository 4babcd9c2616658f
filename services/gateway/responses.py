"""Response bodies and SSE chunks shaped exactly as OpenAI's, so its client works unmodified.

Plain dicts, built here and nowhere else: `text_completion` for /v1/completions,
`chat.completion` / `chat.completion.chunk` for /v1/chat/completions.
"""

from __future__ import annotations

import json
import math
from typing import Any, Optional

from services.gateway.generation import ChoiceText, Generation
from services.gateway.served_model import ServedModel
from services.gateway.tool_calls import ChatPlan
from services.gateway.tool_parsers import ToolCallStream

DONE = b"data: [DONE]\n\n"
MIN_LOGPROB = -9999.0  # what a -inf logprob is reported as (JSON has no infinity), as vLLM


def sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class CompletionFormat:
    object_name = "text_completion"

    def __init__(self, model: ServedModel, gen: Generation):
        self.model = model
        self.gen = gen

    def _envelope(self, obj: str, choices: list[dict], **usage: Any) -> dict[str, Any]:
        return {"id": self.gen.plan.request_id, "object": obj, "created": self.gen.created,
                "model": self.model.name, "choices": choices, "system_fingerprint": None, **usage}

    def _stream_usage(self) -> dict[str, None]:
        """A streamed chunk carries `usage: null` when the client asked for usage at the end."""
        return {"usage": None} if self.gen.plan.include_usage else {}

    def opening_chunks(self) -> list[dict]:
        return []

    def chunk(self, delta: ChoiceText) -> dict:
        return self._envelope(self.object_name, [self._choice(delta.index, delta.text, delta, delta.finish_reason)],
                              **self._stream_usage())

    def response(self, results: list[ChoiceText]) -> dict:
        return self._envelope(self.object_name, [self._choice(r.index, r.text, r, r.finish_reason) for r in results],
                              usage=self.gen.usage())

    def usage_chunk(self) -> dict:
        return self._envelope(self.object_name, [], usage=self.gen.usage())

    def _choice(self, index: int, text: str, lp, finish_reason: Optional[str]) -> dict:
        return {"index": index, "text": text, "logprobs": self._logprobs(lp), "finish_reason": finish_reason}

    def _logprobs(self, lp) -> Optional[dict]:
        if self.gen.plan.logprobs is None:
            return None
        tt = self.model.token_text
        return {
            "tokens": [tt(e.token_id) for e in lp.logprobs],
            "token_logprobs": [_finite(e.logprob) for e in lp.logprobs],
            "top_logprobs": [{tt(t): _finite(v) for t, v in e.top} for e in lp.logprobs],
            "text_offset": list(lp.text_offsets),
        }


class ChatFormat(CompletionFormat):
    """Chat shapes; each choice's text goes through its ToolCallStream (tool_parsers.py), which
    turns calls into `tool_calls` and passes the rest on as content."""

    object_name = "chat.completion.chunk"

    def __init__(self, model: ServedModel, gen: Generation):
        super().__init__(model, gen)
        self.chat = gen.plan.chat or ChatPlan()
        self._tools = [ToolCallStream(self.chat) for _ in gen.choices]

    def opening_chunks(self) -> list[dict]:
        return [self._envelope(self.object_name, [{"index": c.index, "delta": delta, "logprobs": None,
                                                   "finish_reason": None}], **self._stream_usage())
                for c in self.gen.choices for delta in self._openings(c.index)]

    def _openings(self, index: int) -> list[dict]:
        """OpenAI's first chunk of a choice announces the role; then come the echoed last
        message (chat echo) and a named call's id and name, as vLLM sends them."""
        deltas = [{"role": "assistant", "content": ""}]
        if self.chat.echo:
            deltas.append({"content": self.chat.echo})
        if self.chat.tool_choice == "named":
            deltas.append(self._tools[index].named_header())
        return deltas

    def response(self, results: list[ChoiceText]) -> dict:
        return self._envelope("chat.completion", [self._message_choice(r) for r in results], usage=self.gen.usage())

    def _message_choice(self, r: ChoiceText) -> dict:
        tools = self._tools[r.index]
        content, calls = tools.message(r.text)
        if self.chat.echo:
            content = self.chat.echo + (content or "")
        return {"index": r.index, "message": {"role": "assistant", "content": content, "refusal": None,
                                              "tool_calls": [c.as_dict() for c in calls]},
                "logprobs": self._logprobs(r), "finish_reason": tools.finish_reason(r.finish_reason)}

    def _choice(self, index: int, text: str, lp, finish_reason: Optional[str]) -> dict:
        tools = self._tools[index]
        return {"index": index, "delta": tools.feed(text, finish_reason is not None), "logprobs": self._logprobs(lp),
                "finish_reason": tools.finish_reason(finish_reason)}

    def _logprobs(self, lp) -> Optional[dict]:
        if self.gen.plan.logprobs is None:
            return None
        return {"content": [{**self._token(e.token_id, e.logprob),
                             "top_logprobs": [self._token(t, v) for t, v in e.top]} for e in lp.logprobs],
                "refusal": None}

    def _token(self, token_id: int, logprob: float) -> dict:
        return {"token": self.model.token_text(token_id), "logprob": _finite(logprob),
                "bytes": self.model.token_bytes(token_id)}


def _finite(x: float) -> float:
    return x if math.isfinite(x) else MIN_LOGPROB
