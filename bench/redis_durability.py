"""What `appendfsync always` (the embedded Redis's default: every accepted request fsynced
before the gateway answers) costs in requests/s against `everysec`, measured in one run.

    python -m bench.redis_durability [--rounds 7] [--requests 2000] [--clients 1,8] [--dir D] [--out FILE]

Two embedded Redis servers, one per setting, data on the same disk (`--dir`, default a
temporary directory); rounds alternate always, everysec, always ... Each round submits
`--requests` SubmitRequests one after another, as one gateway does (its admission lock
serialises XADDs), with a `queue_load` check before each, and then acknowledges them, as
the scheduler does, so the stream stays short. With several `--clients` (gateways, each
its own connection and thread) Redis fsyncs once per event-loop pass for all the writes
that arrived together, so the cost per request falls. Figures are medians over rounds; the
ratio is the median of each round's own ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from conveyor.embedded_redis import start_embedded_redis
from shared import messages as m
from shared.redis_keys import RedisKeys
from shared.redis_protocol import RequestQueue, connect, queue_load, submit

SETTINGS = ("always", "everysec")
PROMPT = list(range(3, 131))  # 128 tokens: the `mixed` workload's median prompt, about 300 bytes


def submit_all(url: str, keys: RedisKeys, requests: int) -> None:
    """`requests` admit-and-XADD calls in a row on one connection, as one gateway."""
    client = connect(url)
    params = m.SamplingParams(max_tokens=16)
    for i in range(requests):
        queue_load(client, keys)
        submit(client, m.SubmitRequest(f"r{i}", PROMPT, params, "tcp://127.0.0.1:1", time.time()), keys)
    client.close()


def submit_rate(url: str, requests: int, clients: int, round_no: int) -> float:
    """Requests/s of `clients` gateways submitting `requests` in all, then acknowledged."""
    client, keys = connect(url), RedisKeys(f"bench-{round_no}-{clients}")
    queue = RequestQueue(client, keys)
    queue.ensure_group()
    with ThreadPoolExecutor(clients) as pool:
        start = time.perf_counter()
        for done in [pool.submit(submit_all, url, keys, requests // clients) for _ in range(clients)]:
            done.result()
        rate = clients * (requests // clients) / (time.perf_counter() - start)
    while entries := queue.read(count=1024):
        queue.ack([e.entry_id for e in entries])
    client.close()
    return rate


def run(rounds: int, requests: int, clients: list[int], data_dir: Path) -> dict:
    servers = {s: start_embedded_redis(data_dir / s, appendfsync=s) for s in SETTINGS}
    rates: dict[str, list[float]] = {f"{s}/{c}": [] for c in clients for s in SETTINGS}
    try:
        for r in range(rounds):
            for c in clients:
                for s in SETTINGS:
                    rates[f"{s}/{c}"].append(submit_rate(servers[s].url, requests, c, r))
    finally:
        for server in servers.values():
            server.stop()
    ratios = {
        c: statistics.median(a / e for a, e in zip(rates[f"always/{c}"], rates[f"everysec/{c}"]))
        for c in clients
    }
    return {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "data_dir": str(data_dir),
        "rounds": rounds,
        "requests_per_round": requests,
        "req_per_s": {k: statistics.median(v) for k, v in rates.items()},
        "all_req_per_s": rates,
        "always_over_everysec": ratios,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.redis_durability", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--requests", type=int, default=2000, help="submits per round and setting")
    parser.add_argument("--clients", default="1,8", help="comma-separated numbers of concurrent gateways")
    parser.add_argument(
        "--dir", type=Path, default=None, help="where the append-only files go (the disk measured)"
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]
    if args.rounds < 1 or min(clients) < 1 or args.requests < max(clients):
        parser.error(
            f"--rounds and --clients must be at least 1 and --requests at least the most clients "
            f"(got {args.rounds}, {args.clients}, {args.requests})"
        )
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        result = run(args.rounds, args.requests, clients, Path(tmp))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
