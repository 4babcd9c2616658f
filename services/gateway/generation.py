"""One HTTP request in flight: its scheduler requests (one per choice), from submission to
the last output, as a stream of per-choice deltas. A choice ends when the scheduler says so,
or when the gateway finds a stop string in its text and aborts it in the scheduler; a
client that goes away aborts every choice still running (`close`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from services.gateway.detokenizer import IncrementalDetokenizer, StopStringMatcher, special_tokens_decoder
from services.gateway.engine_client import EngineClient
from services.gateway.metrics import GatewayMetrics, RequestTimes
from services.gateway.served_model import ServedModel
from services.gateway.validation import ChoicePlan, GenerationPlan, OutputOptions
from shared.messages import ErrorCode, FinishReason, RequestOutput, SubmitRequest, TokenLogprobs
from shared.tracing import traceparent

SETTLE_TIMEOUT_S = 2.0  # how long to wait for a stop-string-aborted choice's final figures


@dataclass
class ChoiceText:
    """A choice's new text (a delta, as streamed), or all of it put together (`add`)."""

    index: int
    text: str = ""
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    text_offsets: list[int] = field(default_factory=list)  # where each logprobs token starts
    token_ids: list[int] = field(default_factory=list)  # generated (return_token_ids)
    # On a choice's first delta, when its sampling asked for them: positions 1 .. P-1.
    prompt_logprobs: list[TokenLogprobs] | None = None
    finish_reason: FinishReason | None = None
    error_code: ErrorCode | None = None  # with finish_reason ERROR
    error: str | None = None
    # New tokens it carries: as vLLM, a chunk goes out for every output that generated
    # tokens, even while they decode to no text yet (a special token, half a character).
    num_tokens: int = 0

    def __bool__(self) -> bool:
        return bool(self.text or self.logprobs or self.finish_reason or self.num_tokens)

    def add(self, delta: ChoiceText) -> None:
        self.text += delta.text
        self.logprobs += delta.logprobs
        self.text_offsets += delta.text_offsets
        self.token_ids += delta.token_ids
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        self.finish_reason = delta.finish_reason or self.finish_reason
        self.error_code = delta.error_code or self.error_code
        self.error = delta.error or self.error


class ChoiceState:
    """One choice's text so far: detokenized, checked for stop strings, trimmed."""

    def __init__(self, plan: ChoicePlan, model: ServedModel, stop: list[str], options: OutputOptions):
        self.index = plan.index
        self.prompt_index = plan.prompt_index
        self.request_id = plan.request_id
        self.want_logprobs = plan.sampling.logprobs is not None
        self.want_prompt_logprobs = plan.sampling.prompt_logprobs is not None
        self._options = options
        self._detok = IncrementalDetokenizer(
            special_tokens_decoder(model, options.skip_special_tokens, options.spaces_between_special_tokens),
            plan.prompt_token_ids,
        )
        self._stop = StopStringMatcher(stop, include=options.include_stop_str_in_output)
        self.num_tokens = 0  # generated, as counted in usage (a stop token included)
        self._decoded_chars = 0
        self.finish_reason: FinishReason | None = None  # as the client sees it
        self.stopped_by_string = False
        self.final: RequestOutput | None = None  # the scheduler's last word on it

    def on_output(self, out: RequestOutput) -> ChoiceText:
        delta = ChoiceText(self.index)
        if out.finish_reason is not None:
            self.final = out
        if self.finish_reason is not None:
            return delta  # ended here already (a stop string); the rest is dropped
        if self.want_prompt_logprobs and out.index == 0 and out.prompt_logprobs and self.num_tokens == 0:
            delta.prompt_logprobs = list(out.prompt_logprobs)
        if self._options.echo_only:
            return self._prompt_only(out, delta)
        logprobs = out.logprobs if self.want_logprobs and len(out.logprobs) == len(out.token_ids) else []
        for k, token in enumerate(out.token_ids):
            if out.index + k < self.num_tokens:
                continue  # a restarted scheduler replays the request: this token was forwarded
            self.num_tokens += 1
            delta.num_tokens += 1
            delta.token_ids.append(token)
            if (
                token == out.stop_token_id
                and k == len(out.token_ids) - 1
                and not self._options.include_stop_str_in_output
            ):
                continue  # EOS / a stop token id: counted, its text is not output (unless asked, as vLLM)
            if logprobs:
                delta.logprobs.append(logprobs[k])
                delta.text_offsets.append(self._decoded_chars)
            text = self._detok.add(token)
            self._decoded_chars += len(text)
            if self._push(delta, text):
                return delta
        if out.finish_reason is not None and not self._push(delta, self._detok.flush()):
            delta.text += self._stop.flush()
            self.finish_reason = delta.finish_reason = out.finish_reason
            delta.error_code, delta.error = out.error_code, out.error
        return delta

    def _prompt_only(self, out: RequestOutput, delta: ChoiceText) -> ChoiceText:
        """echo with max_tokens 0: the one token generated is counted (as vLLM) and dropped."""
        new = max(0, out.index + len(out.token_ids) - self.num_tokens)
        self.num_tokens += new
        delta.num_tokens += new
        if out.finish_reason is not None:
            self.finish_reason = delta.finish_reason = out.finish_reason
            delta.error_code, delta.error = out.error_code, out.error
        return delta

    def _push(self, delta: ChoiceText, text: str) -> bool:
        """Adds text that is safe to show; True once a stop string matched."""
        safe, matched = self._stop.push(text)
        delta.text += safe
        if matched:
            self.stopped_by_string = True
            self.finish_reason = delta.finish_reason = FinishReason.STOP
        return matched


class Generation:
    def __init__(
        self,
        plan: GenerationPlan,
        model: ServedModel,
        engine: EngineClient,
        metrics: GatewayMetrics,
        queue_timeout: float | None = None,
        request_timeout: float | None = None,
        span=None,
    ):
        """`span`: this request's trace span (shared/tracing.py), ended with it; None: not traced."""
        self.plan = plan
        self.span = span
        self.queue_timeout = queue_timeout
        self.request_timeout = request_timeout
        self.engine = engine
        self.metrics = metrics
        self.created = int(time.time())
        self.choices = [ChoiceState(c, model, plan.stop, plan.output) for c in plan.choices]
        # The first choice of each prompt: its final output has the prompt's cached-token count.
        self._billed = list({c.prompt_index: c for c in reversed(self.choices)}.values())
        self._by_id = {c.request_id: c for c in self.choices}
        self._queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._arrival = time.monotonic()
        self._times = {c.request_id: RequestTimes(self._arrival) for c in self.choices}
        self._closed = False

    async def start(self) -> None:
        """Enqueue every choice (raises 429 when the queue is full, 503 when Redis is down)."""
        ids = list(self._by_id)
        self.engine.register(ids, self._queue)
        now = time.time()
        p = self.plan
        trace = traceparent(self.span) if self.span is not None else ""
        try:
            await self.engine.submit(
                [
                    SubmitRequest(
                        c.request_id,
                        c.prompt_token_ids,
                        c.sampling,
                        self.engine.reply_to,
                        now,
                        p.priority,
                        p.cache_salt,
                        self.queue_timeout,
                        trace,
                    )
                    for c in p.choices
                ]
            )
        except BaseException as e:
            self.engine.unregister(ids)
            self._closed = True
            self._end_span(f"not queued: {e}")
            raise

    def _time_out(self) -> list[ChoiceText]:
        """The request ran past request_timeout: abort what still runs, end it with an error."""
        running = [c for c in self.choices if c.finish_reason is None]
        self.engine.abort_soon([c.request_id for c in running], "request timeout")
        deltas = []
        for c in running:
            c.finish_reason = FinishReason.ERROR
            self._finished(c)
            deltas.append(
                ChoiceText(
                    c.index,
                    finish_reason=FinishReason.ERROR,
                    error_code=ErrorCode.REQUEST_TIMEOUT,
                    error=f"request timeout: not finished within {self.request_timeout:g} s",
                )
            )
        return deltas

    async def deltas(self) -> AsyncIterator[ChoiceText]:
        """Every choice's new text until all have finished (as the client sees them)."""
        deadline = None if self.request_timeout is None else self._arrival + self.request_timeout
        while not all(c.finish_reason for c in self.choices):
            try:
                out = await asyncio.wait_for(
                    self._queue.get(), None if deadline is None else max(0.0, deadline - time.monotonic())
                )
            except asyncio.TimeoutError:
                for delta in self._time_out():
                    yield delta
                return
            choice = self._by_id[out.request_id]
            if choice.finish_reason is None:
                self._observe(choice, out)
            delta = choice.on_output(out)
            if delta.finish_reason is not None:
                self._finished(choice)
            if delta:
                yield delta

    async def settle(self) -> None:
        """Before usage is reported, wait briefly for each prompt's first choice's final output
        (it has the prompt's cached-token count): late only when a stop string ended it here first."""
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while any(c.final is None for c in self._billed):
            try:
                out = await asyncio.wait_for(self._queue.get(), max(deadline - time.monotonic(), 0.001))
            except asyncio.TimeoutError:
                return
            self._by_id[out.request_id].on_output(out)

    def close(self) -> None:
        """Idempotent. Aborts every choice still running: the client is gone."""
        if self._closed:
            return
        self._closed = True
        running = [c for c in self.choices if c.finish_reason is None]
        if running:
            self.engine.abort_soon([c.request_id for c in running], "client disconnected")
            for c in running:
                c.finish_reason = FinishReason.ABORT
                self.metrics.abandoned()
        self.engine.unregister(list(self._by_id))
        self._end_span("client disconnected" if running else None)

    def _end_span(self, error: str | None) -> None:
        if self.span is None:
            return
        self.span.set_attributes(
            {
                "gen_ai.usage.completion_tokens": sum(c.num_tokens for c in self.choices),
                "gen_ai.response.finish_reasons": [
                    c.finish_reason.value if c.finish_reason else "none" for c in self.choices
                ],
                **({"error.type": error} if error else {}),
            }
        )
        self.span.end()
        self.span = None

    def usage(self) -> dict:
        """So far (a streamed chunk's continuous usage) or in all. Each prompt is billed once,
        so its cached part is its first choice's prefix-cache hit."""
        prompt = sum(len(p) for p in self.plan.prompts)
        completion = sum(c.num_tokens for c in self.choices)
        cached = sum(
            c.final.usage.cached_tokens for c in self._billed if c.final is not None and c.final.usage
        )
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    # ---- internals ------------------------------------------------------------------------
    def _finished(self, choice: ChoiceState) -> None:
        plan = self.plan.choices[choice.index]
        assert choice.finish_reason is not None  # called once the choice has finished
        self.metrics.on_finished(
            self._times[choice.request_id],
            choice.finish_reason,
            time.monotonic(),
            num_prompt_tokens=len(plan.prompt_token_ids),
            num_generation_tokens=choice.num_tokens,
            max_tokens=plan.sampling.max_tokens,
        )
        siblings = [c for c in self.choices if c.prompt_index == choice.prompt_index]
        if all(c.finish_reason is not None for c in siblings):
            self.metrics.on_prompt_finished(len(siblings), max(c.num_tokens for c in siblings))
        if choice.stopped_by_string and choice.final is None:
            # The scheduler would keep generating: stop it, and free its KV blocks.
            self.engine.abort_soon([choice.request_id], "stop string")

    def _observe(self, choice: ChoiceState, out: RequestOutput) -> None:
        # Tokens a restarted scheduler replays were counted when they first came.
        new = out.index + len(out.token_ids) - choice.num_tokens
        if self.span is not None and new > 0 and choice.num_tokens == 0:
            self.span.add_event("first_token", {"choice": choice.index})
        self.metrics.on_output(
            self._times[choice.request_id], max(new, 0), out.queue_time_s, time.monotonic()
        )
