"""The real system for end-to-end tests: scheduler and worker processes on real sockets,
a real Redis, and a test-side gateway that submits through the Redis stream and collects
the outputs the scheduler pushes back over ZeroMQ."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path

import redis
import zmq

from shared import messages as m
from shared.ports import free_port
from shared.redis_keys import RedisKeys
from shared.redis_protocol import read_status, submit

REPO = Path(__file__).resolve().parents[1]

# A request that must outlast what a test waits on (hold a slot, still run when its gateway
# vanishes), however fast the machine: a tiny model with this context (make_model's
# max_position_embeddings) and this many tokens runs for tens of seconds. 3,000 tokens of a
# 4,096-token model took under 2 s on a quiet machine, and the tests that relied on it raced.
LONG_CONTEXT = 32768
LONG_MAX_TOKENS = 30000
KEEPER_TOKENS = 2000  # a request still running through a fault a test injects (Stack.submit_keepers)
KEEPER_PROMPT = [7, 8, 9]
# The end-to-end tests of batching, faults and structured outputs run with speculative
# decoding on (Stack(speculative=True): n-gram lookup; "draft_model": the model drafting for
# itself, so that proposals are accepted): their outputs must not change with it.
SPECULATIVE_CONFIG = json.dumps(
    {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
)


def service_env(**extra: str) -> dict[str, str]:
    # One thread each: several processes share two cores in CI.
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)


class Stack:
    def __init__(
        self,
        redis_url: str,
        model_dir: Path,
        log_dir: Path,
        prefix: str | None = None,
        speculative: bool | str = False,
    ):
        self.redis_url = redis_url
        # Every scheduler and worker it starts speculates with this config (None: off).
        self.speculative = (
            SPECULATIVE_CONFIG
            if speculative is True
            else json.dumps({"method": "draft_model", "model": str(model_dir), "num_speculative_tokens": 3})
            if speculative == "draft_model"
            else None
        )
        self.model_dir = model_dir
        self.log_dir = log_dir
        self.keys = RedisKeys(prefix or f"e2e-{uuid.uuid4().hex[:8]}")
        self.client = redis.Redis.from_url(redis_url)
        self.scheduler_address = f"tcp://127.0.0.1:{free_port()}"
        self.procs: dict[str, subprocess.Popen] = {}
        self._expected_dead: set[str] = set()  # killed on purpose by the test
        self.ctx = zmq.Context.instance()
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        self.reply_to = f"tcp://127.0.0.1:{self.pull.bind_to_random_port('tcp://127.0.0.1')}"
        # Alive for the scheduler, as a real gateway keeps itself (an hour is plenty here).
        self.client.set(self.keys.gateway(self.reply_to), b"test", ex=3600)
        self.tokens: dict[str, list[int]] = defaultdict(list)
        self.final: dict[str, m.RequestOutput] = {}
        self.outputs: dict[str, list[m.RequestOutput]] = defaultdict(list)  # every one, as it came

    # ---- processes ----------------------------------------------------------------------

    def _start(self, name: str, module: str, *args: str) -> subprocess.Popen:
        # The child writes to its own copy of the descriptor: ours can close at once.
        with open(self.log_dir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", module, *args],
                cwd=REPO,
                env=service_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.procs[name] = proc
        return proc

    def start_scheduler(self, *args: str, name: str = "scheduler") -> subprocess.Popen:
        return self._start(
            name,
            "services.scheduler",
            "--redis-url",
            self.redis_url,
            "--redis-prefix",
            self.keys.prefix,
            "--scheduler-address",
            self.scheduler_address,
            "--heartbeat-timeout",
            "3",
            "--lease-ttl",
            "2",
            *(["--speculative-config", self.speculative] if self.speculative else []),
            *args,
        )

    def start_worker(self, name: str, *args: str) -> subprocess.Popen:
        return self._start(
            name,
            "services.gpu_worker",
            "--model",
            str(self.model_dir),
            "--device",
            "cpu",
            "--scheduler-address",
            self.scheduler_address,
            "--worker-id",
            name,
            "--kv-cache-memory",
            "64MiB",
            *(["--speculative-config", self.speculative] if self.speculative else []),
            *args,
        )

    def start_serving(self, *scheduler_args: str) -> int:
        """The usual system: a scheduler, worker "w1" and gateway "gw", all ready; returns
        the gateway's port. The three start side by side: the gateway is healthy once the
        worker registered."""
        self.start_scheduler(*scheduler_args)
        self.start_worker("w1")
        port = self.start_gateway("gw")
        self.wait_workers({"w1"})
        self.wait_gateway("gw", port)
        return port

    def start_gateway(self, name: str = "gateway", *args: str) -> int:
        """A gateway process on a free port, reading this stack's Redis keys; returns the port."""
        port = free_port()
        self._start(
            name,
            "services.gateway",
            "--model",
            str(self.model_dir),
            "--redis-url",
            self.redis_url,
            "--redis-prefix",
            self.keys.prefix,
            "--port",
            str(port),
            *args,
        )
        return port

    def wait_gateway(self, name: str, port: int, timeout_s: float = 60.0) -> None:
        """Until the gateway answers /health with 200 (scheduler alive, a worker registered)."""
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"gateway {name} not healthy on port {port}; logs:\n{self.log_tail(name)}")

    def wait_workers(self, names: set[str], timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if names <= set(read_status(self.client, self.keys).workers):
                return
            self.check_alive()
            time.sleep(0.1)
        raise TimeoutError(f"workers {names} did not register; logs: {self.log_tail()}")

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None and name not in self._expected_dead:
                raise RuntimeError(f"{name} exited with {proc.returncode}: {self.log_tail(name)}")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        self._expected_dead.add(name)
        self.procs[name].send_signal(sig)

    def log_tail(self, name: str | None = None, lines: int = 30) -> str:
        names = [name] if name else list(self.procs)
        out = []
        for n in names:
            path = self.log_dir / f"{n}.log"
            if path.exists():
                out.append(
                    f"--- {n} ---\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
                )
        return "\n".join(out)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.pull.close()
        self.client.close()

    # ---- a test-side gateway -----------------------------------------------------------------

    def conveyor_status(self, *args: str) -> subprocess.CompletedProcess:
        """`conveyor status` on this stack's Redis keys, as an operator runs it."""
        command = [sys.executable, "-m", "conveyor", "status", "--redis-url", self.redis_url]
        return subprocess.run(
            [*command, "--redis-prefix", self.keys.prefix, *args],
            cwd=REPO,
            env=service_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )

    def submit(self, request_id: str, prompt: list[int], **sampling) -> None:
        params = m.SamplingParams(**{"temperature": 0.0, **sampling})
        submit(
            self.client, m.SubmitRequest(request_id, prompt, params, self.reply_to, time.time()), self.keys
        )

    def submit_keepers(self, n: int) -> list[str]:
        """`n` long requests (KEEPER_TOKENS, ignore_eos), that keep running through a fault the
        test injects (a workload of short requests can all end between the trigger and the
        fault); which workers admit them depends on which plans first."""
        keepers = [f"keeper-{i}" for i in range(n)]
        for rid in keepers:
            self.submit(rid, KEEPER_PROMPT, max_tokens=KEEPER_TOKENS, ignore_eos=True)
        return keepers

    def mid_stream(self, request_ids, max_tokens: int, worker: str | None = None) -> bool:
        """Whether one of the requests has streamed tokens and has at least half of its
        `max_tokens` to go, and runs on `worker` when one is named (its Redis hash says where:
        fresher than the figures)."""
        return any(
            0 < len(self.tokens[rid]) < max_tokens // 2
            and rid not in self.final
            and (worker is None or self.client.hget(self.keys.request(rid), "worker") == worker.encode())
            for rid in request_ids
        )

    def abort(self, request_id: str) -> None:
        submit(self.client, m.AbortRequest(request_id), self.keys)

    def collect(self, timeout_s: float = 0.1) -> int:
        """Wait up to timeout_s for outputs, then read what comes for up to timeout_s more
        (stopping once none is waiting); returns how many arrived."""
        if not self.pull.poll(timeout_s * 1000):
            return 0
        n, deadline = 0, time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                batch = m.decode(self.pull.recv(zmq.NOBLOCK))
            except zmq.Again:
                return n
            for out in batch.outputs:
                assert out.request_id not in self.final, f"{out.request_id}: output after its finish"
                self.outputs[out.request_id].append(out)
                have = self.tokens[out.request_id]
                assert out.index <= len(have), f"{out.request_id}: tokens {len(have)}..{out.index} never came"
                # After a scheduler restart a request is replayed from its prompt: keep
                # only what is new, as a gateway does.
                have.extend(out.token_ids[len(have) - out.index :])
                if out.finish_reason is not None:
                    self.final[out.request_id] = out
                n += 1
        return n

    def wait_until(self, predicate, what: str, timeout_s: float = 60.0) -> None:
        """Collect outputs until `predicate()` holds; fails naming `what` past the deadline,
        or at once when a process died that the test did not kill."""
        deadline = time.monotonic() + timeout_s
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}; logs:\n{self.log_tail()}"
            self.collect(0.05)
            self.check_alive()

    def wait_finished(self, request_ids, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        want = set(request_ids)
        while not want <= set(self.final):
            if time.monotonic() > deadline:
                missing = sorted(want - set(self.final))[:5]
                raise TimeoutError(f"not finished: {missing}...; logs:\n{self.log_tail()}")
            self.collect(0.2)
            self.check_alive()
