"""A gateway process stopped with SIGTERM while streams run (--shutdown-timeout): the
streams that can finish within the timeout complete normally, the long ones end with an
error event (a plain request with a 503) and are aborted in the scheduler, none hangs;
while it drains, /health and new requests get 503; then it exits 0."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from shared.redis_protocol import read_status
from tests.gateway.conftest import start_gateway
from tests.stack import LONG_MAX_TOKENS

pytestmark = pytest.mark.slow

SHUTDOWN_TIMEOUT_S = 6  # the short streams need well under this, even on two busy cores
SHORT_TOKENS = 60


class Stream:
    """One streamed completion in a thread: its chunks, how it ended."""

    def __init__(self, url: str, model: str, max_tokens: int):
        self.chunks = 0  # with text (several tokens each, with speculation)
        self.tokens = 0  # as its usage chunk says
        self.done = False  # [DONE] came
        self.error: dict | None = None  # the error event
        self.failure: Exception | None = None  # the connection broke
        body = {
            "model": model,
            "prompt": "Once upon a time",
            "max_tokens": max_tokens,
            "stream": True,
            "ignore_eos": True,
            "stream_options": {"include_usage": True},
        }
        self.thread = threading.Thread(target=self._run, args=(url, body), daemon=True)
        self.thread.start()

    def _run(self, url: str, body: dict) -> None:
        try:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        self.done = True
                    elif line.startswith("data: "):
                        event = json.loads(line[len("data: ") :])
                        if "error" in event:
                            self.error = event["error"]
                        elif event.get("usage"):
                            self.tokens = event["usage"]["completion_tokens"]
                        if event.get("choices"):
                            self.chunks += 1
        except Exception as e:  # noqa: BLE001 - recorded for the test to report
            self.failure = e


def test_sigterm_drains_open_streams_then_cuts_the_rest(stack, gateway_model_dir):
    gw = start_gateway(stack, "draining", "--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S))
    model = gateway_model_dir.name
    plain: dict = {}

    def plain_request() -> None:
        r = httpx.post(
            f"{gw.url}/v1/completions",
            timeout=60,
            json={"model": model, "prompt": "hi", "max_tokens": LONG_MAX_TOKENS, "ignore_eos": True},
        )
        plain.update(status=r.status_code, body=r.json())

    plain_thread = threading.Thread(target=plain_request, daemon=True)
    plain_thread.start()  # before the streams: it runs by the time they have tokens
    short = [Stream(gw.url, model, SHORT_TOKENS) for _ in range(2)]
    long = [Stream(gw.url, model, LONG_MAX_TOKENS) for _ in range(2)]
    deadline = time.monotonic() + 60
    while min(s.chunks for s in short + long) < 2:
        assert time.monotonic() < deadline, stack.log_tail("draining")
        assert not any(s.failure or s.error for s in short + long), [
            (s.failure, s.error) for s in short + long
        ]
        time.sleep(0.05)
    assert not any(s.done for s in short), "the short streams must still be open at the signal"

    stack.kill("draining", signal.SIGTERM)
    signalled = time.monotonic()
    health = httpx.get(f"{gw.url}/health", timeout=10)
    assert health.status_code == 503 and "shutting down" in health.json()["reason"], health.text
    refused = httpx.post(
        f"{gw.url}/v1/completions", timeout=10, json={"model": model, "prompt": "hi", "max_tokens": 2}
    )
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down", refused.text

    for s in short + long:
        s.thread.join(timeout=SHUTDOWN_TIMEOUT_S + 20)
        assert not s.thread.is_alive(), "a stream hangs"
    plain_thread.join(timeout=20)
    assert not plain_thread.is_alive(), "a plain request hangs"
    for s in short:
        assert s.done and s.error is None and s.failure is None and s.tokens == SHORT_TOKENS, vars(s)
    for s in long:
        assert (
            s.error is not None
            and s.error["code"] == "gateway_gone"
            and "shutting down" in s.error["message"]
        ), vars(s)
        assert not s.done and s.failure is None, vars(s)
    assert plain["status"] == 503 and plain["body"]["error"]["code"] == "gateway_gone", plain
    assert time.monotonic() - signalled >= SHUTDOWN_TIMEOUT_S - 0.5, "cut before the timeout"

    assert stack.procs["draining"].wait(timeout=20) == 0
    # Aborted in the scheduler: nothing runs on for nobody.
    deadline = time.monotonic() + 20
    while (figures := read_status(stack.client, stack.keys).scheduler).running or figures.waiting:
        assert time.monotonic() < deadline, (figures, stack.log_tail("scheduler"))
        time.sleep(0.2)
