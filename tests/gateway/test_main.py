"""`python -m services.gateway`: bad settings stop it at start-up with a message and exit
code 2; its listening socket gets TCP_NODELAY on every connection."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from services.gateway.__main__ import listen
from services.gateway.engine_client import advertised_address
from tests.stack import REPO, service_env


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "services.gateway", *args],
        cwd=REPO,
        env=service_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "args, words",
    [
        (["--port", "http"], ["port", "integer"]),
        (["--max-queue-len", "0"], ["max_queue_len", "greater than 0"]),
        (["--model", "/no/such/model"], ["/no/such/model", "does not exist"]),
        (["--output-bind", "nonsense://x"], ["cannot start", "nonsense"]),
        (["--redis-url", "ftp://x"], ["cannot start", "redis"]),
    ],
)
def test_bad_settings_exit_2_with_a_message(args, words):
    proc = _run(*args)
    assert proc.returncode == 2, proc.stderr
    for w in words:
        assert w in proc.stderr.lower() or w in proc.stderr, proc.stderr


def test_busy_port_exits_2(gateway_model_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = _run(
            "--model", str(gateway_model_dir), "--port", str(port), "--redis-url", "redis://127.0.0.1:1/0"
        )
    assert proc.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in proc.stderr, proc.stderr


def test_listening_socket_makes_nodelay_connections():
    """asyncio sets TCP_NODELAY only on IPPROTO_TCP sockets; without it every response
    waits ~40 ms for a delayed ACK."""
    sock = listen("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()


def test_advertised_address():
    assert advertised_address("tcp://0.0.0.0:5556", None) == "tcp://0.0.0.0:5556"
    assert (
        advertised_address("tcp://0.0.0.0:4321", "tcp://{hostname}:{port}")
        == f"tcp://{socket.gethostname()}:4321"
    )
    with pytest.raises(ValueError, match="hostname"):
        advertised_address("tcp://0.0.0.0:1", "tcp://{host}:1")
