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


def test_run_serves_scales_and_stops_cleanly(tmp_path):
    port, sched_port = free_port(), free_port()
    env = service_env(
        CONVEYOR_CACHE_DIR=str(tmp_path / "cache"),
        CONVEYOR_PORT=str(port),
        CONVEYOR_WORKERS="1",
        CONVEYOR_SCHEDULER_ADDRESS=f"tcp://127.0.0.1:{sched_port}",
    )
    env.pop("REDIS_URL", None)
    env.pop("CONVEYOR_MODEL", None)
    env.pop("OMP_NUM_THREADS", None)  # the launcher's own thread layout, as `make run` has it
    log_path = tmp_path / "run.log"
    log = open(log_path, "w")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "conveyor", "run"],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    extra = None
    try:
        deadline = time.monotonic() + 240
        while "Conveyor is serving" not in log_path.read_text():
            assert launcher.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)
        text = log_path.read_text()
        redis_url = re.search(r"Redis: (redis://\S+)", text).group(1)
        model_dir = re.search(r"Conveyor is serving (\S+)", text).group(1)
        assert model_dir.startswith(str(tmp_path / "cache")), "the tiny model was generated into the cache"
        pids = {name: int(pid) for name, pid in re.findall(r"started (\S+) \(pid (\d+)\)", text)}
        assert set(pids) == {"redis", "scheduler", "worker-0", "gateway"}
        # The worker computes on the cores after the first, one thread each; the rest of the
        # system is not bound.
        cores = cpu_layout.compute_cores(cpu_layout.allowed_cores())
        assert f"{len(cores)} compute threads, bound to cores {cpu_layout.format_cores(cores)}" in text
        assert _allowed_cpus(pids["worker-0"]) == cores
        assert _allowed_cpus(pids["scheduler"]) == cpu_layout.allowed_cores()

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        first = client.completions.create(model="tiny", prompt="Hello", max_tokens=8)
        assert first.usage.completion_tokens >= 1 and first.choices[0].finish_reason in ("stop", "length")

        # Requests go on being served, one after another, while a second worker joins.
        errors, served, joined = [], [], threading.Event()

        def traffic() -> None:
            while not joined.is_set():
                try:
                    served.append(
                        client.completions.create(
                            model="tiny", prompt="meanwhile", max_tokens=16, extra_body={"ignore_eos": True}
                        ).usage.completion_tokens
                    )
                except Exception as e:  # noqa: BLE001 — reported by the assertion below
                    errors.append(repr(e))
                    return

        meanwhile = threading.Thread(target=traffic, daemon=True)
        meanwhile.start()
        r = redis.Redis.from_url(redis_url)
        served_before = len(served)
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
        deadline = time.monotonic() + 120
        while "extra" not in read_status(r).workers:
            assert time.monotonic() < deadline and not errors, (errors, log_path.read_text()[-3000:])
            time.sleep(0.2)
        joined.set()
        meanwhile.join(timeout=60)
        assert not meanwhile.is_alive() and not errors, errors
        assert len(served) > served_before and set(served) == {16}, "served while the worker joined"

        # Long streams on both workers while the first leaves (started only now: on a fast
        # machine, streams started before the second worker's start-up could all end first).
        results, chunks_seen = {}, [0] * 12

        def stream(i: int) -> None:
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

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 120
        while min(chunks_seen) < 3 or read_status(r).workers["worker-0"].running == 0:
            assert time.monotonic() < deadline and not errors, (
                chunks_seen,
                errors,
                log_path.read_text()[-3000:],
            )
            time.sleep(0.1)
        assert not results, "requests are still running when worker-0 leaves"
        os.kill(pids["worker-0"], signal.SIGTERM)  # leaves: finishes its step, hands requests back
        for t in threads:
            t.join(timeout=300)
        assert not errors, errors
        assert results == {i: TOKENS for i in range(12)}, "every stream got all its tokens"
        deadline = time.monotonic() + 10
        while (status := read_status(r)).scheduler.migrations < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert set(status.workers) == {"extra"} and status.scheduler.migrations >= 1
        assert "worker-0 stopped (exit 0); not restarting it" in log_path.read_text()
        r.close()
    finally:
        if extra is not None:
            extra.send_signal(signal.SIGTERM)
            extra.wait(timeout=30)
        os.killpg(launcher.pid, signal.SIGINT)  # Ctrl-C in the terminal
        code = launcher.wait(timeout=90)
        log.close()
    assert code == 0
    # Its children have exited; their last reaping may trail the launcher's exit a little.
    deadline = time.monotonic() + 10
    while (alive := [n for n, pid in pids.items() if _alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive, f"every process it started is gone, not {alive}"
    redis_port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    assert not _port_open(port) and not _port_open(redis_port) and not _port_open(sched_port)
    assert "all processes stopped" in log_path.read_text()
