"""How many workers one scheduler can drive: real scheduler processes, real Redis, and
many model-free workers simulated in this process, speaking the real worker protocol.

    python -m bench.scheduler_ceiling [--workers 1 8 32 128 256] [--running 256] [--seconds 10]
                                      [--schedulers 1 2]

With `--schedulers K` there are K schedulers of distinct names on one request stream,
the workers split evenly between them (worker i connects to scheduler i mod K).

Each simulated worker registers, heartbeats, and answers every StepPlan with a StepResult
after a step time drawn uniformly from 15-40 ms (the range of a 0.5B-8B model's decode step
on one GPU; no model runs). Requests go in through the Redis stream (shared.redis_protocol.submit),
`--running` per worker, with max_tokens long enough that none finishes while we measure.
A worker's idle time is the gap between sending a StepResult and reading its next StepPlan
while it still holds unfinished rows: with an ideal scheduler that gap is zero.
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
from pathlib import Path

import redis
import zmq

from bench.sim_workers import BLOCK_SIZE, Simulator
from bench.sim_workers import STEP_MS as STEP_MS  # re-exported: the figures are read against it
from conveyor.embedded_redis import start_embedded_redis
from shared import messages as m
from shared.ports import free_port
from shared.redis_keys import RedisKeys
from shared.redis_protocol import submit

REPO = Path(__file__).resolve().parents[1]
PROMPT_LEN = 16


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_scheduler(
    redis_url: str,
    address: str,
    prefix: str,
    running: int,
    log,
    heartbeat_timeout_s: float | None = None,
    name: str = "scheduler",
) -> subprocess.Popen:
    env = dict(
        os.environ,
        REDIS_URL=redis_url,
        CONVEYOR_SCHEDULER_ADDRESS=address,
        CONVEYOR_REDIS_PREFIX=prefix,
        CONVEYOR_MAX_NUM_SEQS=str(max(running, 1)),
        CONVEYOR_LOG_LEVEL="WARNING",
        CONVEYOR_SCHEDULER_NAME=name,
    )
    if heartbeat_timeout_s is not None:
        env["CONVEYOR_HEARTBEAT_TIMEOUT"] = str(heartbeat_timeout_s)
    return subprocess.Popen(
        [sys.executable, "-m", "services.scheduler"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
    )


def submit_requests(
    client: redis.Redis, keys: RedisKeys, n: int, max_tokens: int, reply_to: str, keep_alive=lambda: None
) -> None:
    """`keep_alive` runs every 256 submissions. NOTE: the simulator runs in this thread, and
    with `appendfsync always` a submission costs about 0.5 ms here, so 65,536 of them took
    35 s: without it, the workers sent no heartbeat all that time and were dropped as silent."""
    # The gateway's liveness key: without it the scheduler aborts these requests as orphans.
    client.set(keys.gateway(reply_to), b"1", ex=3600)
    params = m.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i in range(n):
        if i % 256 == 0:
            keep_alive()
        # Unique prompts: a shared one would be a prefix-cache hit, and the router would pile
        # its copies onto one worker.
        rng = random.Random(i)
        prompt = [rng.randrange(10, 4000) for _ in range(PROMPT_LEN)]
        submit(client, m.SubmitRequest(f"r{i}", prompt, params, reply_to, time.time()), keys)


def measure(
    n_workers: int,
    running: int,
    seconds: float,
    max_tokens: int = 2048,
    admit_timeout_s: float = 300.0,
    heartbeat_timeout_s: float | None = None,
    schedulers: int = 1,
) -> dict:
    """One point of the table: `n_workers` simulated workers with `running` requests each,
    split between `schedulers` schedulers.
    `max_tokens`: long enough that few finish while we measure (the mean batch shows it),
    short enough that the block pools (as big as a real GPU's) fit in memory."""
    num_blocks = running * (PROMPT_LEN + max_tokens) // BLOCK_SIZE + 64
    keys = RedisKeys("ceiling")
    with tempfile.TemporaryDirectory() as tmp, start_embedded_redis(tmp) as server:
        addresses = [f"tcp://127.0.0.1:{free_port()}" for _ in range(schedulers)]
        sink = zmq.Context.instance().socket(zmq.PULL)  # the gateway: outputs are drained, not read
        sink.setsockopt(zmq.LINGER, 0)
        reply_to = f"tcp://127.0.0.1:{sink.bind_to_random_port('tcp://127.0.0.1')}"
        with open(Path(tmp) / "scheduler.log", "w") as log:
            procs = [
                start_scheduler(server.url, address, keys.prefix, running, log, heartbeat_timeout_s, f"s{k}")
                for k, address in enumerate(addresses)
            ]
            sim = Simulator(addresses, n_workers, num_blocks)
            try:
                row = _drive(
                    sim,
                    procs,
                    server.url,
                    keys,
                    sink,
                    reply_to,
                    n_workers * running,
                    max_tokens,
                    seconds,
                    admit_timeout_s,
                )
                return {"schedulers": schedulers, **row}
            finally:
                for proc in procs:
                    proc.terminate()
                    proc.wait(30)
                sim.close()
                sink.close()


def _drive(
    sim: Simulator,
    procs: list[subprocess.Popen],
    redis_url: str,
    keys: RedisKeys,
    sink: zmq.Socket,
    reply_to: str,
    total: int,
    max_tokens: int,
    seconds: float,
    admit_timeout_s: float,
) -> dict:
    client = redis.Redis.from_url(redis_url)
    # The scheduler places a request on arrival: every worker must be registered before the
    # first one, or the early workers get them all.
    deadline = time.monotonic() + 60
    while client.hlen(keys.workers) < len(sim.workers):
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            raise RuntimeError(f"only {client.hlen(keys.workers)} of {len(sim.workers)} workers registered")
        sim.run_until(time.monotonic() + 0.1)
    # Several schedulers bound their reads only once they see each other's figures (written
    # every second): until then each would take the burst as if alone.
    while len(procs) > 1 and client.hlen(keys.schedulers) < len(procs):
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"only {client.hlen(keys.schedulers)} of {len(procs)} schedulers wrote figures"
            )
        sim.run_until(time.monotonic() + 0.1)
    sim.run_until(time.monotonic() + (1.5 if len(procs) > 1 else 0.0))
    started = time.monotonic()
    submit_requests(
        client, keys, total, max_tokens, reply_to, lambda: sim.run_until(time.monotonic() + 0.001)
    )
    client.close()

    def all_running() -> bool:
        _drain(sink)
        if any(p.poll() is not None for p in procs):
            raise RuntimeError(f"a scheduler exited: {[p.returncode for p in procs]}")
        return sum(sum(1 for r in w.rows.values() if r[0] > PROMPT_LEN) for w in sim.workers) >= total

    sim.run_until(started + admit_timeout_s, all_running)
    if not all_running():
        raise RuntimeError(f"{total} requests not all running after {admit_timeout_s} s")
    admitted_s = time.monotonic() - started
    sim.run_until(time.monotonic() + 1.0)  # settle: the last prefills leave the batches
    sim.reset_figures()
    cpu0, t0 = sum(cpu_seconds(p.pid) for p in procs), time.monotonic()
    end = t0 + seconds
    while time.monotonic() < end:
        sim.run_until(min(end, time.monotonic() + 0.1))
        _drain(sink)
    elapsed, cpu = time.monotonic() - t0, sum(cpu_seconds(p.pid) for p in procs) - cpu0
    return figures(sim, len(sim.workers), total, elapsed, cpu, admitted_s)


def _drain(sink: zmq.Socket) -> None:
    while True:
        try:
            sink.recv(zmq.NOBLOCK)
        except zmq.Again:
            return


def figures(
    sim: Simulator, n_workers: int, total: int, elapsed: float, cpu: float, admitted_s: float
) -> dict:
    gaps = [g for w in sim.workers for g in w.gaps]
    steps = sum(w.steps for w in sim.workers)
    ideal = sum(w.steps / w.busy_s for w in sim.workers if w.busy_s > 0)  # steps/s with zero idle time
    batches = [b for w in sim.workers for b in w.batch_sizes]
    return dict(
        workers=n_workers,
        running=total,
        seconds=round(elapsed, 2),
        admit_s=round(admitted_s, 1),
        steps_per_s=round(steps / elapsed, 1),
        ideal_steps_per_s=round(ideal, 1),
        efficiency=round(steps / elapsed / ideal, 3) if ideal else 0.0,
        mean_batch=round(statistics.fmean(batches), 1) if batches else 0.0,
        tokens_per_s=round(sum(batches) / elapsed),
        gap_p50_ms=round(percentile(gaps, 0.5) * 1000, 2),
        gap_p99_ms=round(percentile(gaps, 0.99) * 1000, 2),
        sim_lag_p50_ms=round(percentile(sim.lag, 0.5) * 1000, 2),
        sim_lag_p99_ms=round(percentile(sim.lag, 0.99) * 1000, 2),
        scheduler_cpu=round(cpu / elapsed, 2),
    )


def table(rows: list[dict]) -> str:
    lines = [
        "| schedulers | workers | running requests | mean batch | steps/s (ideal) | efficiency "
        "| idle gap p50 / p99 ms | sim lag p50 / p99 ms | scheduler CPU (all) | tokens/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['schedulers']} | {r['workers']} | {r['running']:,} | {r['mean_batch']} "
            f"| {r['steps_per_s']:,} "
            f"({r['ideal_steps_per_s']:,}) | {r['efficiency']:.0%} | {r['gap_p50_ms']} / {r['gap_p99_ms']} "
            f"| {r['sim_lag_p50_ms']} / {r['sim_lag_p99_ms']} | {r['scheduler_cpu']:.0%} "
            f"| {r['tokens_per_s']:,} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", nargs="+", type=int, default=[1, 8, 32, 128, 256])
    ap.add_argument("--running", type=int, default=256, help="running requests per worker")
    ap.add_argument("--seconds", type=float, default=10.0, help="measured time per point, after admission")
    ap.add_argument("--max-tokens", type=int, default=2048, help="per request; sizes the block pools")
    ap.add_argument("--heartbeat-timeout", type=float, help="the scheduler's, in s (default: its own, 5)")
    ap.add_argument(
        "--schedulers",
        nargs="+",
        type=int,
        default=[1],
        help="schedulers sharing the stream, the workers split between them: each count is one row",
    )
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args(argv)
    rows = []
    for n in args.workers:
        for k in args.schedulers:
            rows.append(
                measure(
                    n,
                    args.running,
                    args.seconds,
                    args.max_tokens,
                    heartbeat_timeout_s=args.heartbeat_timeout,
                    schedulers=k,
                )
            )
            print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
