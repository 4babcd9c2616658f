"""`python -m conveyor status`: what is queued, what runs where, and what went wrong, read
from Redis (the scheduler refreshes it about every second). `--watch N` refreshes the
screen every N seconds; `--json` prints the raw figures; `--check` only sets the exit
code (0: a live scheduler and at least one worker), for health checks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime

STALE_AFTER_S = 5.0  # figures older than this mean the scheduler is not running


def render(status: dict, now: float, where: str) -> str:
    stats, workers = status["stats"], status["workers"]
    age = now - float(stats.get("updated_at", 0) or 0)
    alive = age <= STALE_AFTER_S
    queries, hits = stats.get("prefix_queries", 0), stats.get("prefix_hits", 0)
    lines = [
        f"Conveyor — {where} — {datetime.fromtimestamp(now):%H:%M:%S}",
        f"scheduler   {'alive' if alive else 'NOT RUNNING'}"
        + (f" (figures {age:.1f} s old)" if stats else " (no figures in Redis yet)")
        + f"   steps/s {stats.get('steps_per_s', 0)}   tokens/s {stats.get('tokens_per_s', 0)}",
        f"queue       {status['queue_length']} requests in the stream, {status['pending']} taken by the scheduler"
        f"   waiting {stats.get('waiting', 0)}   running {stats.get('running', 0)}",
        f"totals      prompt tokens {stats.get('prompt_tokens', 0)}   generated {stats.get('generation_tokens', 0)}"
        f"   preemptions {stats.get('preemptions', 0)}   migrations {stats.get('migrations', 0)}"
        f"   prefix hits {hits}/{queries} tokens" + (f" ({hits / queries:.0%})" if queries else ""),
        "finished    " + ("   ".join(f"{k.removeprefix('finished_')} {v}" for k, v in sorted(stats.items())
                                    if k.startswith("finished_")) or "none yet"),
        "",
        f"{'WORKER':<24}{'DEVICE':<8}{'KV USE':>8}{'RUNNING':>9}{'WAITING':>9}{'TOK/S':>9}{'STEPS':>9}  STATE",
    ]
    if not workers:
        lines.append("(no worker registered)")
    for wid, w in sorted(workers.items()):
        state = ("leaving" if w.get("leaving") else
                 "stale" if now - w.get("updated_at", 0) > STALE_AFTER_S else
                 f"STALLED (step running {w.get('step_in_flight_s', 0):.0f} s)" if w.get("stalled") else "serving")
        lines.append(f"{wid:<24}{w.get('device', '?'):<8}{w.get('kv_usage', 0):>8.1%}{w.get('running', 0):>9}"
                     f"{w.get('waiting', 0):>9}{w.get('tokens_per_s', 0):>9}{w.get('steps', 0):>9}  {state}")
    lines += ["", "recent errors" if status["errors"] else "no recent errors"]
    for e in status["errors"][:10]:
        when = datetime.fromtimestamp(e.get("time", 0)).strftime("%H:%M:%S")
        detail = e.get("error", "")
        lines.append(f"  {when}  {e.get('worker', '') + ': ' if e.get('worker') else ''}{detail[:160]}")
    return "\n".join(lines)


def healthy(status: dict, now: float, scheduler_only: bool = False) -> bool:
    """A live scheduler and, unless scheduler_only, at least one worker that is not stalled."""
    age = now - float(status["stats"].get("updated_at", 0) or 0)
    serving = [w for w in status["workers"].values() if not w.get("stalled")]
    return age <= STALE_AFTER_S and (scheduler_only or bool(serving))


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m conveyor status", description=__doc__)
    ap.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    ap.add_argument("--redis-prefix", default=os.environ.get("CONVEYOR_REDIS_PREFIX", "conveyor"))
    ap.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS until Ctrl-C")
    ap.add_argument("--json", action="store_true", help="print the raw figures as JSON")
    ap.add_argument("--check", action="store_true", help="print nothing; exit 0 if serving, 1 if not")
    ap.add_argument("--scheduler-only", action="store_true", help="with --check: only the scheduler must be alive")
    args = ap.parse_args(argv)

    import redis

    from services.scheduler.redis_queue import read_status
    from shared.redis_keys import RedisKeys

    client = redis.Redis.from_url(args.redis_url, socket_timeout=5, socket_connect_timeout=5)
    keys = RedisKeys(args.redis_prefix)
    while True:
        try:
            status = read_status(client, keys)
        except redis.ConnectionError as e:
            if args.check:
                return 1
            print(f"cannot reach Redis at {args.redis_url}: {e}", file=sys.stderr)
            return 1
        now = time.time()
        if args.check:
            return 0 if healthy(status, now, args.scheduler_only) else 1
        if args.json:
            print(json.dumps(status, indent=2))
        else:
            if args.watch:
                print("\033[2J\033[H", end="")  # clear the screen: a live view
            print(render(status, now, f"{args.redis_url} (prefix {args.redis_prefix})"), flush=True)
        if not args.watch:
            return 0
        try:
            time.sleep(args.watch)
        except KeyboardInterrupt:
            return 0
