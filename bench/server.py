"""The servers of a benchmark run, each on a free port and stopped with everything it
started: a local Conveyor (`python -m conveyor run`, with a Redis of our own so that its
figures can be read), and the base that the peer (bench/vllm_peer.py) shares; their CPU time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from conveyor.embedded_redis import EmbeddedRedis, start_embedded_redis
from shared.ports import free_port

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 60.0


class LocalServer:
    """An OpenAI-compatible server started as `command()` in its own process group:
    `with server:` serves at `server.url` once GET /health answers 200, until the block ends."""

    name = "server"

    def __init__(self, log_path: Path, start_timeout_s: float = START_TIMEOUT_S):
        self.log_path, self.start_timeout_s = log_path, start_timeout_s
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}

    def __enter__(self):
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(self.log_path, "ab") as log:
                # Its own process group, so that whatever it leaves behind can be stopped as one.
                self.proc = subprocess.Popen(
                    self.command(),
                    cwd=REPO,
                    env=self.env(),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with code {self.proc.returncode}; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(
            f"{self.url}/health did not answer 200 within {self.start_timeout_s:.0f} s; "
            f"log {self.log_path}:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time (user + system) so far of each process of its group, by role."""
        assert self.proc is not None
        return process_group_cpu(self.proc.pid)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL to whatever of its process group is left. Idempotent."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: it leads its own group
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(STOP_TIMEOUT_S)
        with contextlib.suppress(ProcessLookupError):  # when no straggler is left
            os.killpg(pgid, signal.SIGKILL)  # stragglers
        self.proc.wait()
        self.proc = None


class LocalConveyor(LocalServer):
    """`python -m conveyor run` with a Redis of our own. `threads`: the worker's compute
    threads (None: Conveyor's default layout)."""

    name = "conveyor run"

    def __init__(
        self,
        model_dir: Path,
        threads: int | None,
        log_path: Path,
        workers: int = 1,
        env: dict[str, str] | None = None,
    ):
        super().__init__(log_path)
        self.model_dir, self.threads, self.workers = model_dir, threads, workers
        self.extra_env = env or {}
        self.redis: EmbeddedRedis | None = None
        self._redis_dir: str | None = None

    @property
    def redis_url(self) -> str:
        assert self.redis is not None
        return self.redis.url

    def env(self) -> dict[str, str]:
        threads = {"CONVEYOR_NUM_THREADS": str(self.threads)} if self.threads else {}
        env = {**super().env(), "REDIS_URL": self.redis_url, **threads, **self.extra_env}
        return {k: v for k, v in env.items() if v or k not in self.extra_env}  # NAME= unsets NAME

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "conveyor",
            "run",
            "--port",
            str(self.port),
            "--model",
            str(self.model_dir),
            "--workers",
            str(self.workers),
        ]

    def __enter__(self) -> LocalConveyor:
        self._redis_dir = tempfile.mkdtemp(prefix="conveyor-bench-redis-")
        self.redis = start_embedded_redis(self._redis_dir)
        try:
            return super().__enter__()
        except BaseException:
            self.stop()
            raise

    def cpu_seconds(self) -> dict[str, float]:
        out = super().cpu_seconds()
        found = _process_cpu(self.redis.pid) if self.redis is not None else None
        if found is not None:
            out["redis"] = found[2]
        return out

    def stop(self) -> None:
        """The launcher stops its services in order on SIGTERM; then Redis. Idempotent."""
        super().stop()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
        if self._redis_dir:
            shutil.rmtree(self._redis_dir, ignore_errors=True)
            self._redis_dir = None


def process_group_cpu(pgid: int) -> dict[str, float]:
    """utime + stime of every live process in group `pgid`, summed by role: the module it
    runs (`services.scheduler`, `vllm.entrypoints...`) or its executable's name."""
    out: dict[str, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        found = _process_cpu(int(stat.parent.name))
        if found is not None and found[0] == pgid:
            out[found[1]] = out.get(found[1], 0.0) + found[2]
    return out


def _process_cpu(pid: int) -> tuple[int, str, float] | None:
    """(process group, role, CPU seconds) of a live process; None once it has ended."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) ": field 3 onwards
    tick = os.sysconf("SC_CLK_TCK")
    return (
        int(fields[2]),
        _role([a.decode(errors="replace") for a in argv if a]),
        (int(fields[11]) + int(fields[12])) / tick,
    )  # fields 5 (pgrp), 14 (utime), 15 (stime)


def _role(argv: list[str]) -> str:
    if "-m" in argv[:-1]:
        return argv[argv.index("-m") + 1]
    return Path(argv[0]).name if argv else "?"


# ---- the scheduler's figures in Redis ---------------------------------------------------------


def read_stats(redis_url: str, prefix: str = "conveyor") -> dict:
    """The scheduler's figures, flat as in Redis, plus `steps`: of all workers, so that with
    the run's duration they give the mean time of a step."""
    from shared.figure_records import SchedulerFigures
    from shared.redis_keys import RedisKeys
    from shared.redis_protocol import connect, figure_fields, read_status

    client = connect(redis_url)
    try:
        status = read_status(client, RedisKeys(prefix))
    finally:
        client.close()
    figures = figure_fields(status.scheduler or SchedulerFigures(updated_at=0.0))
    return {**figures, "steps": sum(w.steps for w in status.workers.values())}


def fresh_stats(redis_url: str, prefix: str = "conveyor", timeout_s: float = 10.0) -> dict:
    """The scheduler's figures written after now (it writes them about every second)."""
    after = time.time()
    deadline = time.monotonic() + timeout_s
    while True:
        stats = read_stats(redis_url, prefix)
        if stats["updated_at"] > after or time.monotonic() > deadline:
            return stats
        time.sleep(0.2)


def stats_delta(before: dict, after: dict) -> dict:
    """Counters accumulated between two readings (rates and gauges are left out)."""
    counters = [
        "steps",
        "prompt_tokens",
        "generation_tokens",
        "prefix_queries",
        "prefix_hits",
        "preemptions",
        "migrations",
        "step_errors",
        "spec_drafts",
        "spec_draft_tokens",
        "spec_accepted_tokens",
    ] + [k for k in after if k.startswith("finished_")]
    return {k: after.get(k, 0) - before.get(k, 0) for k in counters}


async def _warm_up(url: str, model: str | None, chat: bool) -> None:
    from bench.client import endpoint, send_one
    from bench.workloads import Request

    # A server's first steps pay one-off costs (allocations, lazy init, compiles); the chat
    # path its template's.
    reqs = [Request(list(range(3, 3 + n)), 8, 0.0) for n in (8, 64)]
    if chat:
        reqs.append(Request([], 8, 0.0, message="Say hello.", ignore_eos=False))
    async with httpx.AsyncClient(timeout=httpx.Timeout(30.0, read=START_TIMEOUT_S)) as client:
        for req in reqs:
            rec = await send_one(client, url.rstrip("/") + endpoint(req), req, 0, time.perf_counter(), model)
            if rec.error:
                raise RuntimeError(f"warm-up request to {url} failed: {rec.error}")


def warm_up(url: str, model: str | None = None, chat: bool = False) -> None:
    asyncio.run(_warm_up(url, model, chat))
