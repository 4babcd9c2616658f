"""Response bodies and SSE chunks shaped exactly as OpenAI's, so its client works unmodified.

Plain dicts, built here and nowhere else: `text_completion` for /v1/completions,
`chat.completion` / `chat.completion.chunk` for /v1/chat/completions.
"""

from __future__ import annotations

import json
import math
from typing import Any

from services.gateway.generation import ChoiceText, Generation
from services.gateway.reasoning import ReasoningSplit
from services.gateway.served_model import ServedModel
from services.gateway.tool_calls import ChatPlan
from services.gateway.tool_parsers import ToolCallStream
from shared.messages import FinishReason, TokenLogprobs

DONE = b"data: [DONE]\n\n"
MIN_LOGPROB = -9999.0  # what a -inf logprob is reported as (JSON has no infinity), as vLLM


def sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class CompletionFormat:
    object_name = "text_completion"

    def __init__(self, model: ServedModel, gen: Generation):
        self.model = model
        self.gen = gen
        self.options = gen.plan.output
        self._started: set[int] = set()  # choices whose first chunk went out (echo, prompt details)

    def _envelope(self, obj: str, choices: list[dict], **usage: Any) -> dict[str, Any]:
        return {
            "id": self.gen.plan.request_id,
            "object": obj,
            "created": self.gen.created,
            "model": self.model.name,
            "choices": choices,
            "system_fingerprint": None,
            **usage,
        }

    def _stream_usage(self) -> dict[str, Any]:
        """A streamed chunk carries `usage: null` when the client asked for usage at the end,
        or the usage so far with continuous_usage_stats."""
        if self.options.continuous_usage:
            return {"usage": self.gen.usage()}
        return {"usage": None} if self.gen.plan.include_usage else {}

    def opening_chunks(self) -> list[dict]:
        return []

    def chunk(self, delta: ChoiceText) -> dict:
        first = delta.index not in self._started
        self._started.add(delta.index)
        choice = self._choice(delta.index, delta.text, delta, delta.finish_reason, first)
        return self._envelope(
            self.object_name, [self._token_ids(choice, delta, first)], **self._stream_usage()
        )

    def response(self, results: list[ChoiceText]) -> dict:
        return self._envelope(
            self.object_name,
            [
                self._token_ids(self._choice(r.index, r.text, r, r.finish_reason, True), r, True)
                for r in results
            ],
            usage=self.gen.usage(),
        )

    def usage_chunk(self) -> dict:
        return self._envelope(self.object_name, [], usage=self.gen.usage())

    def _choice(
        self, index: int, text: str, lp: ChoiceText, finish_reason: FinishReason | None, first: bool
    ) -> dict:
        """With echo, a choice's first text and logprobs start with its prompt's (as vLLM)."""
        plan = self.gen.plan.choices[index]
        echo = self.options.echo and first
        prompt_text = self.options.prompt_texts[plan.prompt_index] if echo else ""
        out = {
            "index": index,
            "text": prompt_text + text,
            "logprobs": self._logprobs(lp, plan.prompt_token_ids if self.options.echo else None, first),
            "finish_reason": finish_reason,
        }
        if plan.sampling.prompt_logprobs is not None and first:
            out["prompt_logprobs"] = self.prompt_logprobs(plan.prompt_token_ids, lp.prompt_logprobs)
        return out

    def _token_ids(self, choice: dict, delta: ChoiceText, first: bool) -> dict:
        """vLLM's return_token_ids: the prompt's ids (first chunk) and the generated ones."""
        if self.options.return_token_ids:
            plan = self.gen.plan.choices[delta.index]
            choice["prompt_token_ids"] = plan.prompt_token_ids if first else None
            choice["token_ids"] = list(delta.token_ids)
        return choice

    def _logprobs(self, lp: ChoiceText, echoed: list[int] | None = None, first: bool = True) -> dict | None:
        if self.gen.plan.logprobs is None:
            return None
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        # As vLLM, echoed offsets add up the prompt tokens' strings (on the first chunk, with
        # their entries); the output's offsets continue from there in every chunk.
        echo_chars = sum(len(self.token_str(t)) for t in echoed) if echoed is not None else 0
        if echoed is not None and first:
            self._prompt_entries(out, echoed, lp.prompt_logprobs)
        ts = self.token_str
        out["tokens"] += [ts(e.token_id) for e in lp.logprobs]
        out["token_logprobs"] += [_finite(e.logprob) for e in lp.logprobs]
        out["top_logprobs"] += [{ts(t): _finite(v) for t, v in e.top} for e in lp.logprobs]
        out["text_offset"] += [echo_chars + o for o in lp.text_offsets]
        return out

    def _prompt_entries(
        self, out: dict[str, list], prompt: list[int], prompt_logprobs: list[TokenLogprobs] | None
    ) -> None:
        """The prompt's tokens: the first has no logprob (null), each other its own and the
        top alternatives (its own included, as vLLM); offsets add up the tokens' texts."""
        entries = _prompt_entries_by_position(prompt, prompt_logprobs)
        offset = 0
        for token, e in zip(prompt, entries):
            text = self.token_str(token)
            out["tokens"].append(text)
            out["token_logprobs"].append(None if e is None else _finite(e.logprob))
            out["top_logprobs"].append(
                None
                if e is None
                else {
                    self.token_str(e.token_id): _finite(e.logprob),
                    **{self.token_str(t): _finite(v) for t, v in e.top},
                }
            )
            out["text_offset"].append(offset)
            offset += len(text)

    def prompt_logprobs(self, prompt: list[int], prompt_logprobs: list[TokenLogprobs] | None) -> list:
        """vLLM's `prompt_logprobs`: None for the first token, then per position
        {token id: {logprob, rank, decoded_token}} for the prompt's token and its top
        alternatives. The prompt token's rank is exact within the top N; beyond it, N + 1
        is a lower bound (the worker reports no more)."""
        entries = _prompt_entries_by_position(prompt, prompt_logprobs)
        out: list = []
        for e in entries:
            if e is None:
                out.append(None)
                continue
            ranked = {
                str(t): {"logprob": _finite(v), "rank": r, "decoded_token": self.token_str(t)}
                for r, (t, v) in enumerate(e.top, 1)
            }
            rank = 1 + sum(1 for _, v in e.top if v > e.logprob)
            own = {
                str(e.token_id): {
                    "logprob": _finite(e.logprob),
                    "rank": rank,
                    "decoded_token": self.token_str(e.token_id),
                }
            }
            out.append({**own, **ranked})
        return out

    def token_str(self, token_id: int) -> str:
        """A token as logprobs name it: its text, or vLLM's "token_id:<id>" when asked."""
        return (
            f"token_id:{token_id}"
            if self.options.return_tokens_as_token_ids
            else self.model.token_text(token_id)
        )

    def vllm_extras(self, body: dict, results: list[ChoiceText]) -> dict:
        """Chat's response-level prompt_logprobs / prompt_token_ids and per-choice token_ids (vLLM's)."""
        plan = self.gen.plan
        if plan.choices[0].sampling.prompt_logprobs is not None:
            body["prompt_logprobs"] = self.prompt_logprobs(plan.prompt_token_ids, results[0].prompt_logprobs)
        if self.options.return_token_ids:
            body["prompt_token_ids"] = plan.prompt_token_ids
            for choice, r in zip(body["choices"], results):
                choice["token_ids"] = list(r.token_ids)
        return body


def _prompt_entries_by_position(prompt: list[int], prompt_logprobs: list[TokenLogprobs] | None) -> list:
    """One entry per prompt position: None for the first, then the scheduler's (positions 1 .. P-1)."""
    entries = list(prompt_logprobs or [])
    assert not entries or len(entries) == len(prompt) - 1, (len(entries), len(prompt))
    return [None] + entries if entries else [None] * len(prompt)


class ChatFormat(CompletionFormat):
    """Chat shapes; each choice's text goes through its ReasoningSplit (reasoning.py, with a
    reasoning parser), which takes the thinking out as `reasoning`, then its ToolCallStream
    (tool_parsers.py), which turns calls into `tool_calls` and passes the rest on as content."""

    object_name = "chat.completion.chunk"

    def __init__(self, model: ServedModel, gen: Generation):
        super().__init__(model, gen)
        self.chat = gen.plan.chat or ChatPlan()
        self._tools = [ToolCallStream(self.chat) for _ in gen.choices]
        plan = self.chat.reasoning
        self._reasoning = None if plan is None else [ReasoningSplit(plan) for _ in gen.choices]
        self._show_reasoning = plan is not None and plan.include_reasoning

    def opening_chunks(self) -> list[dict]:
        return [
            self._envelope(
                self.object_name,
                [{"index": c.index, "delta": delta, "logprobs": None, "finish_reason": None}],
                **self._stream_usage(),
            )
            for c in self.gen.choices
            for delta in self._openings(c.index)
        ]

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
        return self.vllm_extras(
            self._envelope(
                "chat.completion", [self._message_choice(r) for r in results], usage=self.gen.usage()
            ),
            results,
        )

    def _message_choice(self, r: ChoiceText) -> dict:
        tools = self._tools[r.index]
        reasoning, text = self._reasoning[r.index].whole(r.text) if self._reasoning else (None, r.text)
        content, calls = tools.message(text)
        if self.chat.echo:
            content = self.chat.echo + (content or "")
        message = {
            "role": "assistant",
            "content": content,
            "refusal": None,
            "tool_calls": [c.as_dict() for c in calls],
        }
        if self._reasoning:
            if reasoning is not None and content == "":
                message["content"] = None  # as vLLM: an output that ended with its thinking has no content
            shown = reasoning if self._show_reasoning else None
            message.update(reasoning=shown, reasoning_content=shown)
        return {
            "index": r.index,
            "message": message,
            "logprobs": self._chat_logprobs(r),
            "finish_reason": tools.finish_reason(r.finish_reason),
        }

    def _choice(
        self, index: int, text: str, lp: ChoiceText, finish_reason: FinishReason | None, first: bool = False
    ) -> dict:
        tools = self._tools[index]
        final = finish_reason is not None
        if not self._reasoning:
            delta = tools.feed(text, final)
        else:
            reasoning, text = self._reasoning[index].feed(text, final)
            delta = tools.feed(text, final)
            if reasoning and self._show_reasoning:
                # vLLM's name (`reasoning`) and its earlier one, DeepSeek's (`reasoning_content`).
                delta = {"reasoning": reasoning, "reasoning_content": reasoning, **delta}
        return {
            "index": index,
            "delta": delta,
            "logprobs": self._chat_logprobs(lp),
            "finish_reason": tools.finish_reason(finish_reason),
        }

    def _chat_logprobs(self, lp: ChoiceText) -> dict | None:
        """Chat's shape of the logprobs: `content`, one entry per token."""
        if self.gen.plan.logprobs is None:
            return None
        return {
            "content": [
                {**self._token(e.token_id, e.logprob), "top_logprobs": [self._token(t, v) for t, v in e.top]}
                for e in lp.logprobs
            ],
            "refusal": None,
        }

    def _token(self, token_id: int, logprob: float) -> dict:
        return {
            "token": self.token_str(token_id),
            "logprob": _finite(logprob),
            "bytes": self.model.token_bytes(token_id),
        }


def _finite(x: float) -> float:
    return x if math.isfinite(x) else MIN_LOGPROB
