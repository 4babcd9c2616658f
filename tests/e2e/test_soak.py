"""A soak: for a couple of minutes clients stream and fetch completions through the real
gateway, a third of them hanging up mid-stream, some cut short by stop strings. After:
every KV block is free, no entry is left in the Redis stream, and the processes' memory
is flat. CONVEYOR_SOAK_SECONDS sets the length (default 90)."""

from __future__ import annotations

import os
import random
import threading
import time

import httpx
import pytest

from conveyor.tiny_model import make_model
from shared.redis_protocol import read_status
from tests.stack import Stack

pytestmark = pytest.mark.slow
SECONDS = float(os.environ.get("CONVEYOR_SOAK_SECONDS", "90"))
HANG_UP_TOKENS = 2000


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def _client(port: int, model: str, stop_at: float, seed: int, counts: dict) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}/v1", timeout=120) as http:
        while time.monotonic() < stop_at:
            body = {
                "model": model,
                "prompt": " ".join(
                    rng.choice(["queue", "cache", "block", "token", "step"])
                    for _ in range(rng.randrange(1, 60))
                ),
                "max_tokens": rng.randrange(1, 80),
                "temperature": rng.choice([0, 0.8]),
            }
            if rng.random() < 0.2:
                body["stop"] = [rng.choice(["e", "a", " "])]
            if rng.random() < 0.5:
                hang_up_after = rng.randrange(1, 10) if rng.random() < 0.35 else None
                if hang_up_after is not None:  # one that cannot end before its client hangs up
                    body = {**body, "max_tokens": HANG_UP_TOKENS, "ignore_eos": True}
                    body.pop("stop", None)
                with http.stream("POST", "/completions", json={**body, "stream": True}) as r:
                    assert r.status_code in (200, 429), r.status_code
                    for i, _ in enumerate(r.iter_lines()):
                        if hang_up_after is not None and i >= hang_up_after:
                            counts["hung_up"] += 1
                            break
            else:
                r = http.post("/completions", json=body)
                assert r.status_code in (200, 429), r.text
            counts["requests"] += 1


@pytest.mark.timeout(SECONDS + 300)  # its load alone runs SECONDS; the default would cut it short
def test_soak_with_disconnects_leaves_nothing_behind(redis_server, tmp_path):
    model_dir = make_model(tmp_path / "soak", preset="tiny", num_hidden_layers=1, seed=13)
    stack = Stack(redis_server.url, model_dir, tmp_path)
    try:
        port = stack.start_serving()
        start = time.monotonic()
        stop_at = start + SECONDS
        counts = {"requests": 0, "hung_up": 0}
        clients = [
            threading.Thread(target=_client, args=(port, "soak", stop_at, i, counts)) for i in range(8)
        ]
        for c in clients:
            c.start()
        time.sleep(SECONDS * 0.25)  # warmed up: caches, allocator pools, JIT-free but lazy imports
        pids = {name: stack.procs[name].pid for name in ("scheduler", "w1", "gw")}
        warm = {name: _rss_mb(pid) for name, pid in pids.items()}
        for c in clients:
            c.join(timeout=SECONDS + 180)
        assert counts["requests"] > 50 and counts["hung_up"] > 5, counts

        deadline = time.monotonic() + 30
        while True:
            status = read_status(stack.client, stack.keys)
            settled = (
                status.scheduler.running == 0
                and status.scheduler.waiting == 0
                and status.workers["w1"].kv_usage == 0
                and status.queue_length == 0
                and status.pending == 0
            )
            if settled:
                break
            assert time.monotonic() < deadline, status
            time.sleep(0.2)
        # Every hang-up was of a request far from its end: each is aborted (a few stop strings too).
        assert status.scheduler.finished.get("abort", 0) >= counts["hung_up"], "hang-ups were aborted"
        end = {name: _rss_mb(pid) for name, pid in pids.items()}
        for name in pids:
            assert end[name] <= warm[name] * 1.25 + 30, f"{name}: {warm[name]:.0f} MB -> {end[name]:.0f} MB"
        stack.check_alive()
    finally:
        stack.stop()
