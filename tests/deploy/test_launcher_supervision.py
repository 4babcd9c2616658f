"""How `python -m conveyor run` (what `make run` runs) treats a process that exits: a service
that cannot start as configured (exit code 2) stops everything within seconds with its
message and exit code 2; one that crashes is restarted, as compose would, and so is the
embedded Redis, with nothing it accepted lost. Ctrl-C stops it quietly; a gateway port that
another program holds stops it at once with one clear line."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import redis

from conveyor.tiny_model import make_model
from shared.ports import free_port
from shared.redis_protocol import read_status
from tests.stack import REPO, service_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("model"), preset="tiny", num_hidden_layers=1, seed=3)


def _run(
    tmp_path: Path, model: Path, redis_url: str | None, prefix: str, port: int | None = None
) -> tuple[subprocess.Popen, Path]:
    """The launcher, its output in the returned log; `redis_url` None: its embedded Redis."""
    env = service_env(
        CONVEYOR_MODEL=str(model),
        CONVEYOR_PORT=str(port or free_port()),
        REDIS_URL=redis_url or "",
        CONVEYOR_REDIS_PREFIX=prefix,
        CONVEYOR_CACHE_DIR=str(tmp_path / "cache"),
        CONVEYOR_SCHEDULER_ADDRESS=f"tcp://127.0.0.1:{free_port()}",
        CONVEYOR_WORKERS="1",
        # as tests/stack.py's workers: the default 1 GiB took most of the start-up on a busy machine
        CONVEYOR_KV_CACHE_MEMORY="64MiB",
    )
    if redis_url is None:
        del env["REDIS_URL"]
    log_path = tmp_path / "run.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "conveyor", "run"],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc, log_path


def _exit_of(tmp_path: Path, model: Path, redis_url: str | None, prefix: str, **kw) -> tuple[int, float, str]:
    """A run expected to stop by itself within 60 s: (exit code, seconds it took, its log);
    killed with its group when it does not, and the wait fails the test."""
    start = time.monotonic()
    proc, log_path = _run(tmp_path, model, redis_url, prefix, **kw)
    try:
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return code, time.monotonic() - start, log_path.read_text()


def _pids(text: str, name: str) -> list[int]:
    return [int(pid) for pid in re.findall(rf"started {name} \(pid (\d+)\)", text)]


def _wait_log(proc: subprocess.Popen, log_path: Path, done, what: str, timeout_s: float) -> str:
    """The launcher's output once `done(output)` holds; fails naming `what` past the deadline
    or if the launcher exits first."""
    deadline = time.monotonic() + timeout_s
    while not done(text := log_path.read_text()):
        assert proc.poll() is None, f"the launcher exited ({proc.returncode}) before {what}:\n{text[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} within {timeout_s:.0f} s:\n{text[-3000:]}"
        time.sleep(0.1)
    return text


def _ctrl_c(proc: subprocess.Popen, timeout_s: float = 60) -> int:
    """Ctrl-C as a terminal sends it, to the whole process group; the launcher's exit code."""
    os.killpg(proc.pid, signal.SIGINT)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"  # a zombie has exited
    except FileNotFoundError:
        return True


def test_a_worker_that_cannot_start_stops_run_with_its_message(
    tmp_path, tiny_model, redis_server, redis_client, redis_keys
):
    model = tmp_path / "mamba"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["MambaForCausalLM"]
    (model / "config.json").write_text(json.dumps(config))
    code, took, text = _exit_of(tmp_path, model, redis_server.url, redis_keys.prefix)
    assert code == 2 and took < 30, (code, took, text[-3000:])
    # The launcher quotes the worker's message last, after its own log has scrolled past.
    said = text.split("worker-0 cannot start as configured (exit code 2):\n", 1)[1]
    assert "unsupported architecture ['MambaForCausalLM']" in said.splitlines()[0], text[-3000:]
    assert "restarting" not in text and "all processes stopped" in text
    assert all(_gone(pid) for name in ("scheduler", "worker-0", "gateway") for pid in _pids(text, name))
    # Also recorded where the gateway and `conveyor status` read (what compose relies on).
    assert (
        "unsupported architecture" in read_status(redis_client, redis_keys).startup_failures["worker-0"].error
    )


def test_a_crashed_worker_is_restarted(tmp_path, tiny_model, redis_server, redis_keys):
    proc, log_path = _run(tmp_path, tiny_model, redis_server.url, redis_keys.prefix)
    try:
        deadline = time.monotonic() + 60
        while not _pids(log_path.read_text(), "worker-0"):
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.1)
        first = _pids(log_path.read_text(), "worker-0")[0]
        os.kill(first, signal.SIGKILL)  # a crash, whatever it was doing
        deadline = time.monotonic() + 30
        while len(_pids(log_path.read_text(), "worker-0")) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.1)
        text = log_path.read_text()
        assert "worker-0 exited with code -9; restarting in 0.5 s" in text
        assert _pids(text, "worker-0")[1] != first and proc.poll() is None
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal
        code = proc.wait(timeout=90)
    assert code == 0, log_path.read_text()[-3000:]


STREAM_TOKENS = 4000  # still streaming while Redis dies and comes back (a 1-layer model, 32k context)


def _health(port: str) -> int | None:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code
    except httpx.HTTPError:
        return None


def _wait_healthy(port: str, log_path: Path) -> None:
    deadline = time.monotonic() + 60
    while (health := _health(port)) != 200:
        assert time.monotonic() < deadline, (health, log_path.read_text()[-3000:])
        time.sleep(0.2)


def _stream(client: openai.OpenAI, model: str, results: dict, chunks_seen: list[int], errors: list) -> None:
    """A request of STREAM_TOKENS, streamed: its chunks counted in chunks_seen[0], its
    completion tokens in results["stream"], or the error that ended it."""
    try:
        chunks = client.completions.create(
            model=model,
            prompt="accepted before",
            max_tokens=STREAM_TOKENS,
            stream=True,
            extra_body={"ignore_eos": True},
            stream_options={"include_usage": True},
        )
        usage = None
        for chunk in chunks:
            chunks_seen[0] += 1
            usage = chunk.usage or usage
        results["stream"] = usage.completion_tokens
    except Exception as e:  # noqa: BLE001 — reported by the assertion below
        errors.append(repr(e))


def test_a_killed_embedded_redis_is_restarted_and_nothing_accepted_is_lost(tmp_path, long_model_dir):
    proc, log_path = _run(tmp_path, long_model_dir, None, "conveyor")
    errors, results, chunks_seen = [], {}, [0]
    try:
        text = _wait_log(proc, log_path, lambda t: "Conveyor is serving" in t, "serving", 120)
        url = re.search(r"started redis \(pid \d+\) at (\S+),", text).group(1)
        first = _pids(text, "redis")[0]
        port = re.search(r"http://127\.0\.0\.1:(\d+)/v1", text).group(1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        model = long_model_dir.name

        streaming = threading.Thread(
            target=_stream, args=(client, model, results, chunks_seen, errors), daemon=True
        )
        streaming.start()
        r = redis.Redis.from_url(url)
        r.set("written-before-the-kill", b"kept")  # acknowledged: in the fsynced append-only file
        deadline = time.monotonic() + 60
        while chunks_seen[0] < 3:
            assert time.monotonic() < deadline and not errors, (errors, log_path.read_text()[-3000:])
            time.sleep(0.05)
        assert not results, "the request is still streaming when Redis dies"
        os.kill(first, signal.SIGKILL)
        text = _wait_log(proc, log_path, lambda t: len(_pids(t, "redis")) >= 2, "a second redis", 30)
        assert "redis exited with code -9; restarting in 0.5 s on the same port and data" in text
        assert re.findall(r"started redis \(pid \d+\) at (\S+),", text) == [url, url]

        # Served again: /health (it reads Redis) says so, then a new request is answered.
        _wait_healthy(port, log_path)
        after = client.completions.create(
            model=model, prompt="after", max_tokens=8, extra_body={"ignore_eos": True}
        )
        assert after.usage.completion_tokens == 8
        assert r.get("written-before-the-kill") == b"kept", "the restarted Redis reloaded the same data"
        r.close()
        streaming.join(timeout=120)
        assert not streaming.is_alive() and not errors, errors
        assert results == {"stream": STREAM_TOKENS}, "the request accepted before the kill got every token"
    finally:
        code = _ctrl_c(proc)
    text = log_path.read_text()
    assert code == 0 and "Traceback" not in text, text[-3000:]
    assert all(_gone(pid) for pid in _pids(text, "redis"))


@pytest.mark.parametrize("when", ["starting", "serving"])
def test_ctrl_c_stops_everything_without_a_traceback(tmp_path, tiny_model, redis_server, redis_keys, when):
    proc, log_path = _run(tmp_path, tiny_model, redis_server.url, redis_keys.prefix)
    try:
        # Starting: the services are still importing and loading, before their own handlers.
        ready = "started gateway" if when == "starting" else "Conveyor is serving"
        _wait_log(proc, log_path, lambda t: ready in t, ready, 120)
        if when == "starting":
            time.sleep(1.0)
    finally:
        code = _ctrl_c(proc)
    text = log_path.read_text()
    assert code == 0, text[-3000:]
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    assert "all processes stopped" in text, text[-3000:]
    assert all(_gone(pid) for name in ("scheduler", "worker-0", "gateway") for pid in _pids(text, name))


def test_a_taken_port_stops_run_with_one_clear_line(tmp_path, tiny_model, redis_server, redis_keys):
    with socket.socket() as taken:  # another program's server on the gateway's port
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, took, text = _exit_of(tmp_path, tiny_model, redis_server.url, redis_keys.prefix, port=port)
    assert code == 2 and took < 20, (code, took, text[-3000:])  # before any service started
    assert f"port {port} on 127.0.0.1 is in use by another process: set --port / CONVEYOR_PORT" in text, text
    assert "Traceback" not in text and "started" not in text, text
