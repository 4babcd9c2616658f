"""The HTTP client against a fake OpenAI server (httpx.MockTransport): what it sends, and
what it makes of streams that finish, stop early, or fail."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import httpx

from bench.client import replay
from bench.workloads import Request, Workload


def sse(*chunks: dict, done: bool = True) -> bytes:
    body = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks)
    return body + (b"data: [DONE]\n\n" if done else b"")


def choice(text: str, finish: str | None = None) -> dict:
    return {"choices": [{"index": 0, "text": text, "finish_reason": finish}], "usage": None}


def usage(n: int) -> dict:
    return {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n}}


def run(workload: Workload, handler) -> list:
    return asyncio.run(
        replay("http://test", workload, progress=False, transport=httpx.MockTransport(handler))
    )


def test_sends_token_ids_greedy_ignore_eos_streaming_and_records_the_stream():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.path, json.loads(request.content)))
        return httpx.Response(200, content=sse(choice("a"), choice("b"), choice("", "length"), usage(2)))

    [rec] = run(Workload("t", [Request([5, 6, 7], 2, 0.0)]), handler)
    path, body = seen[0]
    assert path == "/v1/completions"
    assert body["prompt"] == [5, 6, 7] and body["max_tokens"] == 2
    assert body["ignore_eos"] is True and body["temperature"] == 0 and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert rec.ok and rec.error is None
    assert rec.output_tokens == 2 and rec.finish_reason == "length"
    assert len(rec.chunk_times) == 2  # the closing finish_reason-only chunk carries no token
    assert rec.start <= rec.first_token <= rec.end


def test_a_request_cut_short_is_an_error():
    def handler(request):
        return httpx.Response(200, content=sse(choice("a"), choice("", "abort"), usage(1)))

    [rec] = run(Workload("t", [Request([5], 4, 0.0)]), handler)
    assert not rec.ok and "finished early (finish_reason=abort): 1 of 4" in rec.error


def test_http_errors_error_chunks_and_missing_done_are_recorded():
    answers = iter(
        [
            httpx.Response(429, json={"error": {"message": "queue full"}}),
            httpx.Response(
                200, content=sse(choice("a"), {"error": {"message": "generation failed"}}, done=False)
            ),
            httpx.Response(200, content=sse(choice("a"), usage(1), done=False)),
        ]
    )
    recs = run(Workload("t", [Request([5], 1, 0.0)] * 3), lambda request: next(answers))
    errors = sorted(r.error for r in recs)
    assert errors[0].startswith("HTTP 429") and "queue full" in errors[0]
    assert "generation failed" in errors[1]
    assert errors[2] == "stream ended without data: [DONE]"


def test_requests_are_sent_at_their_arrival_offsets():
    def handler(request):
        return httpx.Response(200, content=sse(choice("a", "length"), usage(1)))

    recs = run(Workload("t", [Request([5], 1, 0.0), Request([5], 1, 0.2)]), handler)
    assert recs[0].start < 0.1 <= 0.2 <= recs[1].start


def delta(content: str | None = None, finish: str | None = None, role: bool = False) -> dict:
    d = (
        {"role": "assistant", "content": ""}
        if role
        else ({"content": content} if content is not None else {})
    )
    return {"choices": [{"index": 0, "delta": d, "finish_reason": finish}], "usage": None}


def chat_usage(prompt: int, n: int) -> dict:
    return {
        "choices": [],
        "usage": {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n},
    }


CHAT = Request([], 8, 0.0, message="Write a short poem about wolves.", ignore_eos=False)


def test_chat_goes_through_chat_completions_and_stops_at_eos():
    seen = []

    def handler(request):
        seen.append((request.url.path, json.loads(request.content)))
        return httpx.Response(
            200,
            content=sse(
                delta(role=True), delta("Grey"), delta(" wolves"), delta("", "stop"), chat_usage(31, 3)
            ),
        )

    [rec] = run(Workload("chat", [CHAT]), handler)
    path, body = seen[0]
    assert path == "/v1/chat/completions"
    assert body["messages"] == [{"role": "user", "content": "Write a short poem about wolves."}]
    assert "ignore_eos" not in body and "prompt" not in body and "seed" not in body and "top_p" not in body
    assert (
        body["temperature"] == 0
        and body["max_tokens"] == 8
        and body["stream_options"] == {"include_usage": True}
    )
    assert rec.ok, rec.error
    assert (rec.output_tokens, rec.prompt_tokens, rec.finish_reason) == (3, 31, "stop"), "counts from usage"
    assert len(rec.chunk_times) == 2 and rec.text == "Grey wolves", "the role chunk is no token"


def test_chat_sampling_settings_are_sent():
    seen = []

    def handler(request):
        seen.append(json.loads(request.content))
        return httpx.Response(200, content=sse(delta(role=True), delta("a", "length"), chat_usage(5, 8)))

    req = Request([], 8, 0.0, message="hi there", ignore_eos=False, temperature=0.7, top_p=0.9, seed=42)
    [rec] = run(Workload("chat", [req]), handler)
    assert (seen[0]["temperature"], seen[0]["top_p"], seen[0]["seed"]) == (0.7, 0.9, 42)
    assert rec.ok and rec.output_tokens == 8


def test_chat_that_ends_short_without_eos_is_an_error_and_eos_first_is_not():
    answers = {  # by max_tokens
        8: sse(delta(role=True), delta("a", "length"), chat_usage(5, 3)),
        9: sse(delta(role=True), delta("a", "abort"), chat_usage(5, 1)),
        10: sse(delta(role=True), delta("", "stop"), chat_usage(5, 1)),
    }
    reqs = [dataclasses.replace(CHAT, max_tokens=n) for n in answers]
    short, aborted, eos_first = run(
        Workload("chat", reqs),
        lambda request: httpx.Response(200, content=answers[json.loads(request.content)["max_tokens"]]),
    )
    assert not short.ok and "finish_reason=length): 3 of 8" in short.error
    assert not aborted.ok and "finish_reason=abort" in aborted.error
    assert eos_first.ok and eos_first.output_tokens == 1 and eos_first.first_token == eos_first.end


def test_a_concurrency_limit_keeps_that_many_in_flight():
    in_flight, most = [0], [0]

    async def handler(request):
        in_flight[0] += 1
        most[0] = max(most[0], in_flight[0])
        await asyncio.sleep(0.05)
        in_flight[0] -= 1
        return httpx.Response(200, content=sse(delta(role=True), delta("a", "stop"), chat_usage(5, 1)))

    reqs = [dataclasses.replace(CHAT, message=f"copy this {i}") for i in range(6)]
    recs = run(Workload("copy", reqs, max_concurrency=2), handler)
    assert all(r.ok for r in recs) and most[0] == 2
    starts = sorted(r.start for r in recs)
    assert starts[2] >= starts[0] + 0.04, "the third waits for a slot"
