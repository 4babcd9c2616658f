"""Fixtures for the gateway's tests.

Unit tests get the tiny model's tokenizer (trained in ~50 ms, no weights). End-to-end
tests share ONE real stack per session — a Redis of their own (so other folders'
FLUSHDB cannot touch it), the scheduler and one worker on a 2-layer tiny model — and start
gateway processes on it, each with the flags its module needs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from conveyor.embedded_redis import start_embedded_redis
from conveyor.tiny_model import build_tokenizer, make_model
from services.gateway.served_model import ServedModel
from tests.stack import LONG_CONTEXT, Stack

API_KEY = "test-key"


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer(4096)


@pytest.fixture
def served_model(tokenizer):
    """The tiny model as the gateway sees it, with a short context to test limits."""
    return ServedModel(
        name="tiny", path=Path("/nonexistent/tiny"), tokenizer=tokenizer, max_model_len=64, vocab_size=4096
    )


@pytest.fixture(scope="session")
def gateway_model_dir(tmp_path_factory):
    # A long context, so that a request can outlast what a test waits on (tests/stack.py).
    return make_model(
        tmp_path_factory.mktemp("gateway-model"),
        preset="tiny",
        num_hidden_layers=2,
        seed=4,
        max_position_embeddings=LONG_CONTEXT,
    )


@pytest.fixture(scope="session")
def stack(tmp_path_factory, gateway_model_dir):
    with start_embedded_redis(tmp_path_factory.mktemp("gateway-redis")) as redis_server:
        # Speculating: the API's tests (structured outputs, tools, logprobs, seeds) hold with it.
        s = Stack(
            redis_server.url, gateway_model_dir, tmp_path_factory.mktemp("gateway-logs"), speculative=True
        )
        try:
            s.start_scheduler()
            s.start_worker("w1")
            s.wait_workers({"w1"})
            yield s
        finally:
            s.stop()


@dataclass
class RunningGateway:
    stack: Stack
    name: str
    port: int
    api_key: str | None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def openai(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.api_key or "none", **kw)

    def async_openai(self, **kw) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=self.api_key or "none", **kw)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=10).text


def start_gateway(stack: Stack, name: str, *args: str, api_key: str | None = None) -> RunningGateway:
    flags = [*args, *(["--api-key", api_key] if api_key else [])]
    port = stack.start_gateway(name, *flags)
    stack.wait_gateway(name, port)
    return RunningGateway(stack, name, port, api_key)


@pytest.fixture(scope="session")
def gateway(stack) -> RunningGateway:
    """The main gateway: default limits, an API key."""
    return start_gateway(stack, "gateway", api_key=API_KEY)


def metric_value(text: str, name: str, labels: str = "") -> float:
    """The sum of the samples named `name` in Prometheus text format whose labels include
    `labels` ('finished_reason="stop"'; others, such as model_name, may be there too): one
    sample's value, or a per-worker series' total. 0 when there is none."""
    wanted = set(_LABEL.findall(labels))
    total = 0.0
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and m["name"] == name and wanted <= set(_LABEL.findall(m["labels"] or "")):
            total += float(m["value"])
    return total


_SAMPLE = re.compile(r"(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
