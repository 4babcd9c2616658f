"""Runs the whole system as local processes, in the foreground: an embedded Redis (unless
REDIS_URL is set), the scheduler, CONVEYOR_WORKERS workers and the gateway.
A service that crashes (non-zero exit) is restarted with backoff, as compose would; one
that exits 0 was stopped on purpose and stays stopped; one that exits 2 cannot start as
configured, so everything stops with its message and exit code 2 (a restart would only
repeat the error). The embedded Redis is restarted with the same backoff whenever it exits,
on its port and data directory, so the queue it acknowledged is back. Ctrl-C or SIGTERM
stops every process it started, gateway first and Redis last, and exits 0; a gateway port
that another process holds stops it before anything starts, with exit code 2.
"""

from __future__ import annotations

import errno
import http.client
import logging
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from conveyor.embedded_redis import start_embedded_redis
from conveyor.supervised import Child, RedisChild, Supervised, backoff
from shared import cpu_layout
from shared.config import CONFIG_ERROR_EXIT, RunSettings
from shared.model_cache import cache_root
from shared.models import model_dir
from shared.ports import free_port

log = logging.getLogger("conveyor.launcher")

STOP_TIMEOUT_S = 20.0


class Launcher:
    def __init__(self, settings: RunSettings):
        self.settings = settings
        self.children: list[Child] = []
        self.redis: RedisChild | None = None  # the embedded Redis, when REDIS_URL is not set
        self.stopping = False
        self.config_error: str | None = None  # which service could not start as configured, and why

    def run(self) -> int:
        """Starts everything and supervises it until Ctrl-C or SIGTERM; returns the exit code:
        0 when stopped so (a Ctrl-C is how `make run` ends, not a failure), CONFIG_ERROR_EXIT
        when something cannot start as configured."""
        signal.signal(signal.SIGINT, self._stop_signal)
        signal.signal(signal.SIGTERM, self._stop_signal)
        if problem := port_problem(self.settings.host, self.settings.port):
            log.error("%s", problem)
            return CONFIG_ERROR_EXIT
        try:
            env = self._environment()
            if not self.stopping:  # Ctrl-C while the tiny model was generated: start nothing
                self._spawn(env)
            if self._wait_ready():
                self._banner()
            self._supervise()
        finally:
            self._shutdown()
        if self.config_error is None:
            return 0
        log.error(
            "%s\nfix the configuration and run again", self.config_error
        )  # last: the screen ends with it
        return CONFIG_ERROR_EXIT

    # ---- set-up -------------------------------------------------------------------------
    def _environment(self) -> dict[str, str]:
        s = self.settings
        if not s.model:
            log.info("no model named: using the generated tiny model (random weights, meaningless text)")
        model = str(model_dir(s.model))  # built once here, rather than raced by every service
        redis_url = s.redis_url
        if not redis_url:
            data_dir = cache_root() / "redis"
            data_dir.mkdir(parents=True, exist_ok=True)
            self.redis = RedisChild(start_embedded_redis(data_dir, appendfsync=s.redis_appendfsync))
            redis_url = self.redis.server.url
        scheduler_address = s.scheduler_address or f"tcp://127.0.0.1:{free_port()}"
        env = dict(os.environ)
        env.update(
            {
                "CONVEYOR_MODEL": model,
                "REDIS_URL": redis_url,
                "CONVEYOR_SCHEDULER_ADDRESS": scheduler_address,
                "CONVEYOR_HOST": s.host,
                "CONVEYOR_PORT": str(s.port),
                "HF_HUB_OFFLINE": "1",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self._passed_on())
        return env

    def _passed_on(self) -> dict[str, str]:
        """`make run`'s settings that belong to other services, for their environment."""
        s = self.settings
        given = {
            "CONVEYOR_TOKENIZER": s.tokenizer,
            "CONVEYOR_REASONING_PARSER": s.reasoning_parser,
            "CONVEYOR_SPECULATIVE_CONFIG": s.speculative_config,
            "CONVEYOR_OTLP_TRACES_ENDPOINT": s.otlp_traces_endpoint,
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": s.otlp_traces_protocol,
        }
        return {name: value for name, value in given.items() if value}

    def _spawn(self, env: dict[str, str]) -> None:
        self.children = self._children(env)
        for child in self.children:
            child.start()

    def _children(self, env: dict[str, str]) -> list[Child]:
        """The services to start, in order, each with its environment."""
        tp = self.settings.tensor_parallel_size
        worker_env = env if tp is None else {**env, "CONVEYOR_TENSOR_PARALLEL_SIZE": str(tp)}
        workers = [
            Child(f"worker-{i}", "gpu_worker", {**worker_env, **layout, "CONVEYOR_WORKER_ID": f"worker-{i}"})
            for i, layout in enumerate(self._worker_layouts(env))
        ]
        return [Child("scheduler", "scheduler", env), *workers, Child("gateway", "gateway", env)]

    def _worker_layouts(self, env: dict[str, str]) -> list[dict[str, str]]:
        """Each worker's threads and cores. Given ones (flags, CONVEYOR_*, or OMP_NUM_THREADS,
        which the worker honours) go to every worker; otherwise the cores after the first
        are shared out, so that workers never compete for a core with each other."""
        s, n = self.settings, self.settings.workers
        given = {
            k: str(v)
            for k, v in (("CONVEYOR_NUM_THREADS", s.num_threads), ("CONVEYOR_CPU_AFFINITY", s.cpu_affinity))
            if v is not None
        }
        if given or "OMP_NUM_THREADS" in env or n == 0:
            layouts = [given] * n
        else:
            layouts = [
                {"CONVEYOR_CPU_AFFINITY": cpu_layout.format_cores(cores)}
                for cores in cpu_layout.split_cores(cpu_layout.allowed_cores(), n)
            ]
        for i, layout in enumerate(layouts):
            log.info(
                "worker-%d: %s",
                i,
                ", ".join(f"{k}={v}" for k, v in layout.items()) or "the worker's defaults",
            )
        return layouts

    def _wait_ready(self, timeout_s: float = 300.0) -> bool:
        url = f"http://{self._client_host()}:{self.settings.port}/health"
        deadline = time.monotonic() + timeout_s
        while not self.stopping and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return True
            # Not an HTTP answer: another program took the port after port_problem looked;
            # the gateway then exits 2 saying so.
            except (OSError, http.client.HTTPException):
                pass
            self._restart_exited()
            time.sleep(0.5)
        if not self.stopping:
            log.warning("%s did not answer 200 within %.0f s; still waiting on the services", url, timeout_s)
        return False

    def _banner(self) -> None:
        base = f"http://{self._client_host()}:{self.settings.port}"
        model = self.children[0].env["CONVEYOR_MODEL"]
        name = Path(model).name
        print(
            f"""
Conveyor is serving {model}
  OpenAI-compatible API: {base}/v1      health: {base}/health      metrics: {base}/metrics
  Redis: {self.children[0].env["REDIS_URL"]}      status: python -m conveyor status --watch 1

  curl {base}/v1/completions -H 'Content-Type: application/json' \\
       -d '{{"model": "{name}", "prompt": "Hello", "max_tokens": 16}}'

Ctrl-C stops everything.
""",
            flush=True,
        )

    def _client_host(self) -> str:
        return "127.0.0.1" if self.settings.host in ("0.0.0.0", "") else self.settings.host

    # ---- supervision -----------------------------------------------------------------------
    def _supervise(self) -> None:
        while not self.stopping:
            self._restart_exited()
            time.sleep(0.2)

    def _restart_exited(self) -> None:
        now = time.monotonic()
        # Redis first: the services come back to a queue that is there.
        supervised: list[Supervised] = [*([self.redis] if self.redis else []), *self.children]
        for child in supervised:
            if self.stopping:
                return
            if child.proc is None:
                if now >= child.next_start:
                    child.start()
                continue
            code = child.proc.poll()
            if code is not None:
                self._exited(child, code, now)

    def _exited(self, child: Supervised, code: int, now: float) -> None:
        if isinstance(child, Child):  # Redis has no planned exit, nor one that a restart cannot mend
            if code == 0:  # it was stopped on purpose (SIGTERM): scaling down, not a crash
                log.info("%s stopped (exit 0); not restarting it", child.name)
                self.children.remove(child)
                return
            if code == CONFIG_ERROR_EXIT:
                log.error(
                    "%s exited with code %d: it cannot start as configured; stopping everything",
                    child.name,
                    code,
                )
                self.config_error = (
                    f"{child.name} cannot start as configured (exit code {code}):\n{child.last_error()}"
                )
                self.stopping = True
                return
        delay = backoff(child, now)
        if isinstance(child, RedisChild):
            log.error(
                "redis exited with code %s; restarting in %.1f s on the same port and data (%s, %s); %s",
                code,
                delay,
                child.server.url,
                child.server.data_dir,
                child.last_error(),
            )
        else:
            log.error("%s exited with code %s; restarting in %.1f s", child.name, code, delay)
        child.proc, child.next_start = None, now + delay

    def _stop_signal(self, *_) -> None:
        if not self.stopping:
            log.info("stopping every process...")
        self.stopping = True

    def _shutdown(self) -> None:
        # Gateway first (no new requests), then workers (they hand requests back), then
        # the scheduler, Redis last.
        order = ["gateway", "gpu_worker", "scheduler"]
        for service in order:
            group = [
                (c, proc)
                for c in self.children
                if c.service == service and (proc := c.proc) and proc.poll() is None
            ]
            for _, proc in group:
                proc.send_signal(signal.SIGTERM)
            for c, proc in group:
                try:
                    proc.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop in %.0f s: killed", c.name, STOP_TIMEOUT_S)
                    proc.kill()
                    proc.wait()
        for c in self.children:  # their last lines out before we exit (daemon threads die mid-write)
            c.output_done()
        if self.redis is not None:
            self.redis.server.stop()  # a no-op if it is waiting out a backoff
        log.info("all processes stopped")


def port_problem(host: str, port: int) -> str | None:
    """Why the gateway could not listen on host:port, found by binding it for a moment before
    anything starts, or None. Without this, the readiness probe would talk to whichever
    program holds the port, and the gateway's own error would come only after the slow
    start-up of every service."""
    if port == 0:  # any free port: nothing to check
        return None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # As the gateway binds: a previous run's connections in TIME_WAIT do not count as in use.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return f"port {port} on {host} is in use by another process: set --port / CONVEYOR_PORT"
            return (
                f"cannot listen on {host}:{port} ({e.strerror or e}): "
                "set --host / CONVEYOR_HOST or --port / CONVEYOR_PORT"
            )
    return None
