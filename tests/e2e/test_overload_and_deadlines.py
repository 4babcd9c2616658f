"""Through the real gateway: a queue timeout (503 + Retry-After), a total request timeout
(504, the request aborted in the scheduler), the token-bounded queue (429), and a
scheduler kill -9 under sampled (unseeded) streams that continue without a repeated or
lost token."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from conveyor.tiny_model import make_model
from shared.redis_protocol import read_status
from tests.stack import LONG_CONTEXT, LONG_MAX_TOKENS, Stack

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model(
        tmp_path_factory.mktemp("model"),
        preset="tiny",
        num_hidden_layers=1,
        seed=12,
        max_position_embeddings=LONG_CONTEXT,
    )


HOG = {"prompt": "a", "max_tokens": LONG_MAX_TOKENS, "ignore_eos": True}  # holds the one slot throughout


def _model(port: int) -> str:
    return httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()["data"][0]["id"]


def _post(port: int, body: dict, timeout: float = 120.0) -> httpx.Response:
    return httpx.post(
        f"http://127.0.0.1:{port}/v1/completions", json={"model": _model(port), **body}, timeout=timeout
    )


def _wait_running(stack: Stack, n: int, timeout_s: float = 30.0) -> None:
    """Until `n` requests run, as their Redis hashes say (rewritten every scheduler pass)."""
    deadline = time.monotonic() + timeout_s
    while (
        sum(stack.client.hget(k, "status") == b"running" for k in stack.client.keys(stack.keys.request("*")))
        < n
    ):
        assert time.monotonic() < deadline, stack.log_tail()
        time.sleep(0.05)


def _join(thread: threading.Thread, timeout_s: float = 150.0) -> None:
    """Past its HTTP timeout (120 s), a client thread still running is a hang."""
    thread.join(timeout_s)
    assert not thread.is_alive(), f"{thread.name} still running after {timeout_s} s"


def test_deadlines_and_token_bounded_queue(redis_server, model_dir, tmp_path):
    stack = Stack(redis_server.url, model_dir, tmp_path)
    try:
        stack.start_scheduler("--max-num-seqs", "1")
        stack.start_worker("w1")
        port = stack.start_gateway(
            "gw", "--queue-timeout", "2", "--request-timeout", "4", "--max-queue-tokens", "300"
        )
        stack.wait_workers({"w1"})
        stack.wait_gateway("gw", port)

        # One slot: a long request holds it; the next one waits past its queue timeout.
        hog = threading.Thread(target=_post, args=(port, HOG))
        hog.start()
        _wait_running(stack, 1)
        queued = _post(port, {"prompt": "b", "max_tokens": 4})
        assert queued.status_code == 503 and "queue timeout" in queued.json()["error"]["message"]
        assert queued.headers["Retry-After"]
        _join(hog)  # the hog itself hits the 4 s total timeout

        # Total timeout: 504, and the scheduler was told to stop it (its blocks are freed).
        late = _post(port, {"prompt": "c", "max_tokens": LONG_MAX_TOKENS, "ignore_eos": True})
        assert late.status_code == 504 and "request timeout" in late.json()["error"]["message"]
        deadline = time.monotonic() + 20
        while (status := read_status(stack.client, stack.keys)).workers["w1"].kv_usage != 0:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert status.scheduler.finished["abort"] >= 2

        # Token-bounded queue: with the slot held, 300 waiting prompt tokens is the limit.
        hog = threading.Thread(target=_post, args=(port, HOG))
        hog.start()
        _wait_running(stack, 1)
        big = [7] * 250
        first = threading.Thread(target=_post, args=(port, {"prompt": big, "max_tokens": 2}))
        first.start()
        deadline = time.monotonic() + 10
        while read_status(stack.client, stack.keys).scheduler.queued_tokens < 250:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        refused = _post(port, {"prompt": big, "max_tokens": 2})
        assert refused.status_code == 429 and "max_queue_tokens" in refused.json()["error"]["message"]
        assert refused.headers["Retry-After"]
        _join(hog)
        _join(first)
    finally:
        stack.stop()


SAMPLED_TOKENS = 300


def _stream_tokens(port: int, i: int, tokens: list[str] | None = None) -> list[str]:
    """Stream request `i` (sampled, with a seed of its own); its tokens are appended to
    `tokens` as they come."""
    body = {
        "model": _model(port),
        "prompt": f"story {i}",
        "max_tokens": SAMPLED_TOKENS,
        "ignore_eos": True,
        "temperature": 0.9,
        "seed": 100 + i,
        "logprobs": 0,
        "stream": True,
    }
    tokens = [] if tokens is None else tokens
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=180) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:]).get("choices", []):
                    tokens += (c.get("logprobs") or {}).get("tokens") or []
    return tokens


def test_scheduler_kill_9_under_sampled_streams(redis_server, model_dir, tmp_path):
    """Sampled streams: a restarted scheduler replays each request from its prompt with the
    same per-token seeds, so the client's stream continues exactly as an undisturbed run
    would have — no token repeated, lost or changed. (Unseeded requests get a seed from
    the gateway for the same reason: tests/gateway/test_validation.py.)"""
    stack = Stack(redis_server.url, model_dir, tmp_path)
    try:
        port = stack.start_serving()
        disturbed: dict[int, list[str]] = {i: [] for i in range(4)}
        threads = [threading.Thread(target=_stream_tokens, args=(port, i, disturbed[i])) for i in range(4)]
        for t in threads:
            t.start()
        # Killed while every stream is under way and far from its end, as its client sees it.
        deadline = time.monotonic() + 60
        while min(len(t) for t in disturbed.values()) < 10:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert max(len(t) for t in disturbed.values()) < SAMPLED_TOKENS // 2
        stack.kill("scheduler")
        stack.procs["scheduler"].wait(timeout=30)
        stack.start_scheduler(name="scheduler-2")
        for t in threads:
            _join(t, 240)
        undisturbed = {i: _stream_tokens(port, i) for i in range(4)}
        assert all(len(disturbed[i]) == SAMPLED_TOKENS for i in range(4))
        assert disturbed == undisturbed
    finally:
        stack.stop()
