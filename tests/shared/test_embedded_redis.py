"""The embedded Redis: a real server on loopback that keeps its data across restarts."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from conveyor.embedded_redis import start_embedded_redis

ROOT = Path(__file__).resolve().parents[2]


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def wait_gone(pid: int, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not process_gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_starts_on_loopback_and_answers(tmp_path):
    with start_embedded_redis(tmp_path) as server:
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        client = redis.Redis.from_url(server.url)
        assert client.ping()
        config = client.config_get("*")
        assert config["bind"] == "127.0.0.1"
        assert config["appendonly"] == "yes"
        assert config["appendfsync"] == "always"  # durable by default: docs/durability.md
        assert Path(config["dir"]) == tmp_path.resolve()
        client.close()


def test_stream_entry_survives_restart(tmp_path):
    with start_embedded_redis(tmp_path) as server:
        client = redis.Redis.from_url(server.url)
        entry_id = client.xadd("queue", {"msg": b"\x01\x02"})
        client.close()
    assert list(tmp_path.glob("appendonly*"))

    with start_embedded_redis(tmp_path) as server:
        client = redis.Redis.from_url(server.url)
        assert client.xrange("queue") == [(entry_id, {b"msg": b"\x01\x02"})]
        client.close()


def test_two_servers_at_once_are_independent(tmp_path):
    with start_embedded_redis(tmp_path / "a") as a, start_embedded_redis(tmp_path / "b") as b:
        assert a.port != b.port and a.pid != b.pid
        ca, cb = redis.Redis.from_url(a.url), redis.Redis.from_url(b.url)
        ca.set("k", "a")
        cb.set("k", "b")
        assert (ca.get("k"), cb.get("k")) == (b"a", b"b")
        ca.close()
        cb.close()


def test_stop_leaves_no_process(tmp_path):
    server = start_embedded_redis(tmp_path)
    pid = server.pid
    assert not process_gone(pid)
    server.stop()
    assert process_gone(pid)
    server.stop()  # idempotent
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(server.url, socket_connect_timeout=1).ping()


def test_port_in_use_fails_with_the_log(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match="(?s)exited.*Address already in use"):
            start_embedded_redis(tmp_path, port=port)


def test_command_line_runs_until_sigterm(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "conveyor.embedded_redis", "--dir", str(tmp_path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("redis://127.0.0.1:")
        client = redis.Redis.from_url(url)
        assert client.ping()
        server_pid = client.info("server")["process_id"]
        client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert wait_gone(server_pid)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_every_answered_write_survives_kill_9(tmp_path):
    # appendfsync always: a write is in the append-only file, fsynced, before its reply, so
    # SIGKILL right after the last reply loses none (everysec may hold writes in memory up
    # to 2 s while a slow background fsync runs, and leaves the last second to the page cache).
    with start_embedded_redis(tmp_path) as server:
        port = server.port
        client = redis.Redis.from_url(server.url)
        ids = [client.xadd("queue", {"msg": str(i).encode()}) for i in range(200)]
        os.kill(server.pid, signal.SIGKILL)
        server.process.wait(10)
        client.close()
    with start_embedded_redis(tmp_path, port=port) as server:
        client = redis.Redis.from_url(server.url)
        assert [entry_id for entry_id, _ in client.xrange("queue")] == ids
        client.close()


def test_a_bad_appendfsync_is_refused(tmp_path):
    with pytest.raises(ValueError, match="appendfsync must be one of always, everysec, no"):
        start_embedded_redis(tmp_path, appendfsync="sometimes")


def test_restart_after_kill_9_keeps_url_and_data(tmp_path):
    # What `make run` does when its Redis dies: the same URL, every acknowledged write back.
    with start_embedded_redis(tmp_path, appendfsync="always") as server:
        url, first_pid = server.url, server.pid
        client = redis.Redis.from_url(url)
        ids = [client.xadd("queue", {"msg": str(i).encode()}) for i in range(20)]
        client.close()
        with pytest.raises(RuntimeError, match="still running"):
            server.restart()
        os.kill(first_pid, signal.SIGKILL)
        server.process.wait(10)
        server.restart()
        server.wait_ready(10)
        assert server.url == url and server.pid != first_pid
        client = redis.Redis.from_url(url)
        assert [entry_id for entry_id, _ in client.xrange("queue")] == ids
        assert client.config_get("appendfsync")["appendfsync"] == "always"
        client.close()
