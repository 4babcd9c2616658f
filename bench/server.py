"""A local Conveyor for one benchmark run: `python -m conveyor run` on a free port, with a
Redis of our own (so its figures can be read), stopped with everything it started.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import httpx

from shared.embedded_redis import EmbeddedRedis, free_port, start_embedded_redis

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 60.0


class LocalConveyor:
    """`with LocalConveyor(model_dir, threads, log) as c:` serves at `c.url` until the block ends."""

    def __init__(self, model_dir: Path, threads: int, log_path: Path, workers: int = 1,
                 env: Optional[dict[str, str]] = None):
        self.model_dir, self.threads, self.log_path, self.workers = model_dir, threads, log_path, workers
        self.extra_env = env or {}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: Optional[subprocess.Popen] = None
        self.redis: Optional[EmbeddedRedis] = None
        self._redis_dir: Optional[str] = None

    @property
    def redis_url(self) -> str:
        assert self.redis is not None
        return self.redis.url

    def env(self) -> dict[str, str]:
        return {
            **os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
            # NOTE: the worker's torch threads, matched by the baselines in this process.
            "OMP_NUM_THREADS": str(self.threads),
            "REDIS_URL": self.redis_url,
            **self.extra_env,
        }

    def command(self) -> list[str]:
        return [sys.executable, "-m", "conveyor", "run", "--port", str(self.port),
                "--model", str(self.model_dir), "--workers", str(self.workers)]

    def __enter__(self) -> "LocalConveyor":
        self._redis_dir = tempfile.mkdtemp(prefix="conveyor-bench-redis-")
        self.redis = start_embedded_redis(self._redis_dir)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            # Its own process group, so that whatever it leaves behind can be stopped as one.
            self.proc = subprocess.Popen(self.command(), cwd=REPO, env=self.env(), stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"conveyor run exited with code {self.proc.returncode}; "
                                   f"log {self.log_path}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.url}/health did not answer 200 within {START_TIMEOUT_S:.0f} s; "
                           f"log {self.log_path}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """SIGTERM (the launcher stops its services in order), then SIGKILL to whatever of
        its process group is left; then Redis. Idempotent."""
        if self.proc is not None:
            pgid = self.proc.pid  # start_new_session: the launcher leads its own group
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    pass
            try:
                os.killpg(pgid, signal.SIGKILL)  # stragglers; ProcessLookupError when none
            except ProcessLookupError:
                pass
            self.proc.wait()
            self.proc = None
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
        if self._redis_dir:
            shutil.rmtree(self._redis_dir, ignore_errors=True)
            self._redis_dir = None


# ---- the scheduler's figures in Redis ---------------------------------------------------------

def read_stats(redis_url: str, prefix: str = "conveyor") -> dict:
    """The scheduler's figures, flat as in Redis, plus `steps`: of all workers, so that with
    the run's duration they give the mean time of a step."""
    from shared.figures import SchedulerFigures
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
    counters = ["steps", "prompt_tokens", "generation_tokens", "prefix_queries", "prefix_hits", "preemptions",
                "migrations", "step_errors"] + [k for k in after if k.startswith("finished_")]
    return {k: after.get(k, 0) - before.get(k, 0) for k in counters}


async def _warm_up(url: str) -> None:
    from bench.client import send_one
    from bench.workloads import Request

    async with httpx.AsyncClient(timeout=httpx.Timeout(30.0, read=START_TIMEOUT_S)) as client:
        for n in (8, 64):  # a worker's first steps pay one-off costs (allocations, lazy init)
            rec = await send_one(client, url.rstrip("/") + "/v1/completions",
                                 Request(list(range(3, 3 + n)), 8, 0.0), 0, time.perf_counter())
            if rec.error:
                raise RuntimeError(f"warm-up request to {url} failed: {rec.error}")


def warm_up(url: str) -> None:
    asyncio.run(_warm_up(url))
