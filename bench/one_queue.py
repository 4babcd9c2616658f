"""One waiting queue for all workers against a queue per worker, on uneven work: the
simulated workers of bench/scheduler_ceiling.py (real scheduler processes, real Redis, no
model), requests of very different lengths arriving at random, each worker holding only a
few at a time so that requests queue. The baseline is the scheduler of another commit (run
from a temporary git worktree of it), in the same invocation, rounds alternating.

    python -m bench.one_queue --baseline-ref 4ee8c53 [--workers 2 4 8] [--seconds 40] [--rounds 2]

Per request, its queue wait: from submission to its first step (the scheduler's
`queue_time_s`). Per worker, its idle share: the time it held no request while others
waited, over the time requests waited. Throughput: output tokens over the time from the
first submission to the last finish.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import redis
import zmq

from bench.scheduler_ceiling import PROMPT_LEN, REPO, percentile
from bench.sim_workers import BLOCK_SIZE, Simulator
from conveyor.embedded_redis import start_embedded_redis
from shared import messages as m
from shared.ports import free_port
from shared.redis_keys import RedisKeys
from shared.redis_protocol import submit

SEQS_PER_WORKER = 4  # max_num_seqs: few, so that requests queue as behind a full GPU
LENGTHS = (2, 512)  # max_tokens, log-uniform between these: a few long requests among many short
LOAD = 0.85  # arrivals as a share of what the workers can serve


def lengths(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    lo, hi = LENGTHS
    return [int(lo * (hi / lo) ** rng.random()) for _ in range(n)]


def arrival_rate(n_workers: int, mean_len: float) -> float:
    """Requests/s the workers can serve at SEQS_PER_WORKER rows a step of ~27.5 ms, times LOAD."""
    tokens_per_s = n_workers * SEQS_PER_WORKER / 0.0275
    return LOAD * tokens_per_s / mean_len


@contextmanager
def scheduler_tree(ref: str | None):
    """The repository to run the scheduler from: this one, or a worktree of `ref`."""
    if ref is None:
        yield REPO
        return
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), ref],
            check=True,
            capture_output=True,
        )
        try:
            yield tree
        finally:
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], capture_output=True
            )


def measure(tree: Path, n_workers: int, seconds: float, seed: int) -> dict:
    """Arrivals for `seconds` at LOAD of what `n_workers` serve (the same for a seed)."""
    rate = arrival_rate(n_workers, statistics.fmean(lengths(10_000, seed)))
    sizes = lengths(int(rate * seconds), seed)
    rng = random.Random(seed + 1)
    arrivals = [0.0]
    for _ in sizes[1:]:
        arrivals.append(arrivals[-1] + rng.expovariate(rate))
    keys = RedisKeys("onequeue")
    with (
        tempfile.TemporaryDirectory() as tmp,
        start_embedded_redis(tmp) as server,
        open(Path(tmp) / "scheduler.log", "w") as log,
    ):
        address = f"tcp://127.0.0.1:{free_port()}"
        env = dict(
            os.environ,
            REDIS_URL=server.url,
            CONVEYOR_SCHEDULER_ADDRESS=address,
            CONVEYOR_REDIS_PREFIX=keys.prefix,
            CONVEYOR_MAX_NUM_SEQS=str(SEQS_PER_WORKER),
            CONVEYOR_LOG_LEVEL="WARNING",
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.scheduler"],
            cwd=tree,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        num_blocks = SEQS_PER_WORKER * (PROMPT_LEN + LENGTHS[1]) // BLOCK_SIZE + 64
        sim = Simulator([address], n_workers, num_blocks, seed)
        sink = zmq.Context.instance().socket(zmq.PULL)
        sink.setsockopt(zmq.LINGER, 0)
        reply_to = f"tcp://127.0.0.1:{sink.bind_to_random_port('tcp://127.0.0.1')}"
        try:
            return _drive(sim, proc, server.url, keys, sink, reply_to, sizes, arrivals)
        finally:
            proc.terminate()
            proc.wait(30)
            sim.close()
            sink.close()


def _drive(
    sim: Simulator,
    proc: subprocess.Popen,
    redis_url: str,
    keys: RedisKeys,
    sink: zmq.Socket,
    reply_to: str,
    sizes: list[int],
    arrivals: list[float],
) -> dict:
    client = redis.Redis.from_url(redis_url)
    client.set(keys.gateway(reply_to), b"1", ex=3600)  # a live gateway, or its requests are aborted
    deadline = time.monotonic() + 60
    while client.hlen(keys.workers) < len(sim.workers):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError("the simulated workers did not all register")
        sim.run_until(time.monotonic() + 0.1)
    waits: dict[str, float] = {}
    finished: set[str] = set()
    idle_s, waiting_s, last = 0.0, 0.0, None
    start = time.monotonic()
    sent = 0
    limit = start + arrivals[-1] + 600
    while len(finished) < len(sizes):
        now = time.monotonic()
        if now > limit or proc.poll() is not None:
            raise RuntimeError(
                f"{len(finished)} of {len(sizes)} requests finished; scheduler rc {proc.poll()}"
            )
        while sent < len(sizes) and start + arrivals[sent] <= now:
            params = m.SamplingParams(temperature=0.0, max_tokens=sizes[sent], ignore_eos=True)
            prompt = [random.Random(sent).randrange(10, 4000) for _ in range(PROMPT_LEN)]
            submit(client, m.SubmitRequest(f"r{sent}", prompt, params, reply_to, time.time()), keys)
            sent += 1
        _read(sink, waits, finished)
        # Idle while work waits: requests sent, not yet started anywhere.
        waiting = sent - len(waits)
        if last is not None and waiting > 0:
            waiting_s += now - last
            idle_s += (now - last) * sum(1 for w in sim.workers if not w.unfinished())
        last = now
        next_at = start + arrivals[sent] if sent < len(sizes) else now + 0.005
        sim.run_until(min(next_at, now + 0.005))
    elapsed = time.monotonic() - start
    client.close()
    wait_list = list(waits.values())
    return dict(
        workers=len(sim.workers),
        requests=len(sizes),
        tokens=sum(sizes),
        wait_p50_ms=round(percentile(wait_list, 0.5) * 1000, 1),
        wait_p99_ms=round(percentile(wait_list, 0.99) * 1000, 1),
        idle_share=round(idle_s / (waiting_s * len(sim.workers)), 3) if waiting_s else 0.0,
        tokens_per_s=round(sum(sizes) / elapsed, 1),
        seconds=round(elapsed, 1),
    )


def _read(sink: zmq.Socket, waits: dict[str, float], finished: set[str]) -> None:
    while True:
        try:
            batch = m.decode(sink.recv(zmq.NOBLOCK))
        except zmq.Again:
            return
        for out in batch.outputs if isinstance(batch, m.GatewayOutputs) else []:
            if out.queue_time_s is not None and out.request_id not in waits:
                waits[out.request_id] = out.queue_time_s
            if out.finish_reason is not None:
                finished.add(out.request_id)
                waits.setdefault(out.request_id, float("nan"))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline-ref", required=True, help="the commit whose scheduler is the baseline")
    ap.add_argument("--workers", nargs="+", type=int, default=[2, 4, 8])
    ap.add_argument("--seconds", type=float, default=40.0, help="of arrivals, per measurement")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args(argv)
    rows = []
    with scheduler_tree(args.baseline_ref) as baseline:
        for n in args.workers:
            for r in range(args.rounds):  # the same arrivals for both, alternating
                for name, tree in (("one queue", REPO), (f"baseline {args.baseline_ref}", baseline)):
                    rows.append({"system": name, "round": r, **measure(tree, n, args.seconds, seed=r)})
                    print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


def table(rows: list[dict]) -> str:
    lines = [
        "| workers | system | queue wait p50 / p99 ms (rounds' median) | idle share while work waits "
        "| tokens/s |",
        "|---:|---|---:|---:|---:|",
    ]
    for key in dict.fromkeys((r["workers"], r["system"]) for r in rows):
        mine = [r for r in rows if (r["workers"], r["system"]) == key]
        fields = ("wait_p50_ms", "wait_p99_ms", "idle_share", "tokens_per_s")
        med = {f: statistics.median(r[f] for r in mine) for f in fields}
        lines.append(
            f"| {key[0]} | {key[1]} | {med['wait_p50_ms']:,.0f} / {med['wait_p99_ms']:,.0f} "
            f"| {med['idle_share']:.1%} | {med['tokens_per_s']:,.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
