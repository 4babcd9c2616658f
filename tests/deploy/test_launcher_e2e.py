"""`python -m conveyor run` (what `make run` runs) on a fresh cache: it generates the tiny
model, starts an embedded Redis, the scheduler, a worker and the gateway, and serves the
official openai client. A second worker joins while requests are served, the first leaves
with SIGTERM while streams run on both — no request is lost — and Ctrl-C leaves nothing
running."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest
import redis

from shared import cpu_layout
from shared.ports import free_port
from shared.redis_protocol import read_status
from tests.stack import REPO, service_env

pytestmark = pytest.mark.slow
TOKENS = 1600  # long enough to still be streaming when the first worker leaves


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0): look at its state.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _allowed_cpus(pid: int) -> list[int]:
    return sorted(os.sched_getaffinity(pid))


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _env(tmp_path: Path, port: int, sched_port: int) -> dict[str, str]:
    env = service_env(
        CONVEYOR_CACHE_DIR=str(tmp_path / "cache"),
        CONVEYOR_PORT=str(port),
        CONVEYOR_WORKERS="1",
        CONVEYOR_SCHEDULER_ADDRESS=f"tcp://127.0.0.1:{sched_port}",
    )
    env.pop("REDIS_URL", None)
    env.pop("CONVEYOR_MODEL", None)
    env.pop("OMP_NUM_THREADS", None)  # the launcher's own thread layout, as `make run` has it
    return env


@contextmanager
def _launcher(env: dict[str, str], log_path: Path) -> Iterator[subprocess.Popen]:
    """`conveyor run` in its own session, its output appended to `log_path`; Ctrl-C on the
    way out (its exit code is then in returncode)."""
    # Appending: the extra worker writes to the same file. Each child has its own descriptor.
    with open(log_path, "ab") as log:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "conveyor", "run"],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield launcher
    finally:
        os.killpg(launcher.pid, signal.SIGINT)  # Ctrl-C in the terminal
        launcher.wait(timeout=90)


@contextmanager
def _extra_worker(env: dict[str, str], model_dir: str, log_path: Path) -> Iterator[subprocess.Popen]:
    """A second worker started by hand, as an operator adds one; SIGTERM on the way out."""
    with open(log_path, "ab") as log:
        extra = subprocess.Popen(
            [sys.executable, "-m", "services.gpu_worker"],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={
                **env,
                "CONVEYOR_MODEL": model_dir,
                "CONVEYOR_WORKER_ID": "extra",
                # its own core, as an operator gives a second worker on one
                # host: on worker-0's busy core it would load too slowly
                "CONVEYOR_CPU_AFFINITY": "0",
            },
        )
    try:
        yield extra
    finally:
        extra.send_signal(signal.SIGTERM)
        extra.wait(timeout=30)


def _wait_serving(launcher: subprocess.Popen, log_path: Path) -> str:
    """The launcher's output once it says it serves."""
    deadline = time.monotonic() + 240
    while "Conveyor is serving" not in log_path.read_text():
        assert launcher.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.5)
    return log_path.read_text()


def _check_started(text: str, cache: Path) -> tuple[str, str, dict[str, int]]:
    """What the launcher started, as its output says: Redis's URL, the model it generated
    into the cache, each process's pid; and how the processes are bound to cores."""
    redis_url = re.search(r"Redis: (redis://\S+)", text).group(1)
    model_dir = re.search(r"Conveyor is serving (\S+)", text).group(1)
    assert model_dir.startswith(str(cache)), "the tiny model was generated into the cache"
    pids = {name: int(pid) for name, pid in re.findall(r"started (\S+) \(pid (\d+)\)", text)}
    assert set(pids) == {"redis", "scheduler", "worker-0", "gateway"}
    # The worker computes on the cores after the first, one thread each; the rest of the
    # system is not bound.
    cores = cpu_layout.compute_cores(cpu_layout.allowed_cores())
    assert f"{len(cores)} compute threads, bound to cores {cpu_layout.format_cores(cores)}" in text
    assert _allowed_cpus(pids["worker-0"]) == cores
    assert _allowed_cpus(pids["scheduler"]) == cpu_layout.allowed_cores()
    return redis_url, model_dir, pids


class _Traffic:
    """Completions of 16 tokens one after another on a thread, until stopped: the tokens each
    got, or the error that ended them."""

    def __init__(self, client: openai.OpenAI):
        self.client = client
        self.served: list[int] = []
        self.errors: list[str] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.is_set():
            try:
                served = self.client.completions.create(
                    model="tiny", prompt="meanwhile", max_tokens=16, extra_body={"ignore_eos": True}
                )
                self.served.append(served.usage.completion_tokens)
            except Exception as e:  # noqa: BLE001 — reported by the assertion below
                self.errors.append(repr(e))
                return

    def stop(self) -> None:
        self.done.set()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive() and not self.errors, self.errors


def _wait_registered(r: redis.Redis, worker: str, traffic: _Traffic, log_path: Path) -> None:
    deadline = time.monotonic() + 120
    while worker not in read_status(r).workers:
        assert time.monotonic() < deadline and not traffic.errors, (
            traffic.errors,
            log_path.read_text()[-3000:],
        )
        time.sleep(0.2)


def _stream(client: openai.OpenAI, i: int, results: dict, chunks_seen: list[int], errors: list[str]) -> None:
    """Stream request `i` to its end: its completion tokens in results[i], its chunks counted."""
    try:
        chunks = client.completions.create(
            model="tiny",
            prompt=f"request {i}",
            max_tokens=TOKENS,
            stream=True,
            extra_body={"ignore_eos": True},
            stream_options={"include_usage": True},
        )
        text, usage = "", None
        for chunk in chunks:
            chunks_seen[i] += 1
            if chunk.choices:
                text += chunk.choices[0].text
            usage = chunk.usage or usage
        results[i] = usage.completion_tokens
    except Exception as e:  # noqa: BLE001 — reported by the assertion below
        errors.append(repr(e))


def _streams_outlive_the_first_worker(
    client: openai.OpenAI, r: redis.Redis, pid: int, log_path: Path
) -> None:
    """Long streams on both workers while worker-0 (`pid`) leaves with SIGTERM: every stream
    gets all its tokens, and its requests moved to the other worker."""
    # Started only now: on a fast machine, streams started before the second worker's
    # start-up could all end first.
    results, chunks_seen, errors = {}, [0] * 12, []
    threads = [
        threading.Thread(target=_stream, args=(client, i, results, chunks_seen, errors)) for i in range(12)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while min(chunks_seen) < 3 or read_status(r).workers["worker-0"].running == 0:
        assert time.monotonic() < deadline and not errors, (chunks_seen, errors, log_path.read_text()[-3000:])
        time.sleep(0.1)
    assert not results, "requests are still running when worker-0 leaves"
    os.kill(pid, signal.SIGTERM)  # leaves: finishes its step, hands requests back
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert results == {i: TOKENS for i in range(12)}, "every stream got all its tokens"
    deadline = time.monotonic() + 10
    while (status := read_status(r)).scheduler.migrations < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert set(status.workers) == {"extra"} and status.scheduler.migrations >= 1
    assert "worker-0 stopped (exit 0); not restarting it" in log_path.read_text()


def _check_everything_stopped(pids: dict[str, int], ports: list[int], log_path: Path) -> None:
    # Its children have exited; their last reaping may trail the launcher's exit a little.
    deadline = time.monotonic() + 10
    while (alive := [n for n, pid in pids.items() if _alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive, f"every process it started is gone, not {alive}"
    assert not any(_port_open(port) for port in ports), "no port is still open"
    assert "all processes stopped" in log_path.read_text()


def test_run_serves_scales_and_stops_cleanly(tmp_path):
    port, sched_port = free_port(), free_port()
    env, log_path = _env(tmp_path, port, sched_port), tmp_path / "run.log"
    with _launcher(env, log_path) as launcher:
        redis_url, model_dir, pids = _check_started(_wait_serving(launcher, log_path), tmp_path / "cache")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        first = client.completions.create(model="tiny", prompt="Hello", max_tokens=8)
        assert first.usage.completion_tokens >= 1 and first.choices[0].finish_reason in ("stop", "length")

        # Requests go on being served, one after another, while a second worker joins.
        traffic = _Traffic(client)
        r = redis.Redis.from_url(redis_url)
        served_before = len(traffic.served)
        with _extra_worker(env, model_dir, log_path):
            _wait_registered(r, "extra", traffic, log_path)
            traffic.stop()
            assert len(traffic.served) > served_before and set(traffic.served) == {16}, (
                "served while the worker joined"
            )
            _streams_outlive_the_first_worker(client, r, pids["worker-0"], log_path)
        r.close()
    assert launcher.returncode == 0
    redis_port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    _check_everything_stopped(pids, [port, redis_port, sched_port], log_path)
