"""`python -m conveyor status`: what is queued, what runs where, and what went wrong, read
from Redis (the scheduler refreshes it about every second). `--watch N` refreshes the
screen every N seconds; `--json` prints the figures as JSON; `--check` only sets the exit
code by the same rule as the gateway's /health (shared.figure_records.health), for health checks.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime

from shared.config import RedisSettings
from shared.figure_records import (
    STALE_AFTER_S,
    SchedulerFigures,
    SystemStatus,
    WorkerFigures,
    health,
    startup_failures,
)


def _speculation(f) -> str:
    """vLLM's spec-decode figures: proposals made and accepted, and the mean accepted length
    (tokens a verified decode emits: the accepted proposals and the model's own one)."""
    rate = f.spec_accepted_tokens / f.spec_draft_tokens if f.spec_draft_tokens else 0.0
    return (
        f"{f.spec_accepted_tokens}/{f.spec_draft_tokens} proposed tokens accepted ({rate:.0%}) in "
        f"{f.spec_drafts} decodes, mean accepted length {1 + f.spec_accepted_tokens / f.spec_drafts:.2f}"
    )


def render(status: SystemStatus, now: float, where: str) -> str:
    s = status.scheduler or SchedulerFigures(updated_at=0.0)
    age = now - s.updated_at
    alive = age <= STALE_AFTER_S
    queries, hits = s.prefix_queries, s.prefix_hits
    lines = [
        f"Conveyor — {where} — {datetime.fromtimestamp(now):%H:%M:%S}",
        f"scheduler   {'alive' if alive else 'NOT RUNNING'}"
        + (f" (figures {age:.1f} s old)" if status.scheduler else " (no figures in Redis yet)")
        + f"   steps/s {s.steps_per_s}   tokens/s {s.tokens_per_s}",
        f"queue       {status.queue_length} requests in the stream, {status.pending} taken by the scheduler"
        f"   waiting {s.waiting}   running {s.running}",
        f"totals      prompt tokens {s.prompt_tokens}   generated {s.generation_tokens}"
        f"   preemptions {s.preemptions}   migrations {s.migrations}"
        f"   prefix hits {hits}/{queries} tokens" + (f" ({hits / queries:.0%})" if queries else ""),
        "finished    "
        + ("   ".join(f"{reason} {n}" for reason, n in sorted(s.finished.items())) or "none yet"),
        *([f"speculation {_speculation(s)}"] if s.spec_drafts else []),
        *_schedulers(status, now),
        "",
        f"{'WORKER':<24}{'DEVICE':<8}{'KV USE':>8}{'RUNNING':>9}{'TOK/S':>9}{'STEPS':>9}"
        f"{'STEP MS':>9}  STATE",
    ]
    if not status.workers:
        lines.append("(no worker registered)")
    for wid, w in sorted(status.workers.items()):
        lines.append(
            f"{wid:<24}{w.registered.device:<8}{w.kv_usage:>8.1%}{w.running:>9}"
            f"{w.tokens_per_s:>9}{w.steps:>9}{w.step_ms:>9.1f}  {_state(w, now)}"
        )
        lines += _kernels(w)
        if w.spec_drafts:
            lines.append(f"  speculation {_speculation(w)}")
    lines += [f"  {failure}" for failure in startup_failures(status, now)]
    lines += ["", "recent errors" if status.errors else "no recent errors"]
    for e in status.errors[:10]:
        when = datetime.fromtimestamp(e.time).strftime("%H:%M:%S")
        lines.append(f"  {when}  {e.worker + ': ' if e.worker else ''}{e.error[:160]}")
    return "\n".join(lines)


def _schedulers(status: SystemStatus, now: float) -> list[str]:
    """One line per scheduler when several share the queue (the lines above sum the live ones)."""
    if len(status.schedulers) < 2:
        return []
    lines = [
        "",
        f"{'SCHEDULER':<24}{'WORKERS':>8}{'RUNNING':>9}{'WAITING':>9}{'STEPS/S':>9}{'TOK/S':>9}  STATE",
    ]
    for name, f in sorted(status.schedulers.items()):
        age = now - f.updated_at
        state = "alive" if age <= STALE_AFTER_S else f"NOT RUNNING (figures {age:.0f} s old)"
        lines.append(
            f"{name:<24}{f.workers:>8}{f.running:>9}{f.waiting:>9}{f.steps_per_s:>9}{f.tokens_per_s:>9}"
            f"  {state}"
        )
    return lines


def _kernels(w: WorkerFigures) -> list[str]:
    """What the worker's steps run on, and every part that runs a slower path, under its line."""
    reg = w.registered
    lines = (
        ["  kernels: " + ", ".join(f"{part} {name}" for part, name in reg.backends.items())]
        if reg.backends
        else []
    )
    return lines + [f"  SLOW PATH: {slow}" for slow in reg.slow_paths]


def _state(w: WorkerFigures, now: float) -> str:
    if now - w.updated_at > STALE_AFTER_S:
        return "stale"
    return f"STALLED (step running {w.step_in_flight_s:.0f} s)" if w.stalled else "serving"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m conveyor status", description=__doc__)
    defaults = RedisSettings()  # REDIS_URL, CONVEYOR_REDIS_PREFIX
    ap.add_argument("--redis-url", default=defaults.redis_url)
    ap.add_argument("--redis-prefix", default=defaults.redis_prefix)
    ap.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS until Ctrl-C")
    ap.add_argument("--json", action="store_true", help="print the raw figures as JSON")
    ap.add_argument("--check", action="store_true", help="print nothing; exit 0 if serving, 1 if not")
    ap.add_argument(
        "--scheduler-only", action="store_true", help="with --check: only the scheduler must be alive"
    )
    args = ap.parse_args(argv)

    import msgspec
    import redis

    from shared.redis_keys import RedisKeys
    from shared.redis_protocol import connect, read_status

    client = connect(args.redis_url)
    keys = RedisKeys(args.redis_prefix)
    while True:
        try:
            status = read_status(client, keys)
        except redis.ConnectionError as e:
            if not args.check:
                print(f"cannot reach Redis at {args.redis_url}: {e}", file=sys.stderr)
            return 1
        now = time.time()
        if args.check:
            return 0 if health(status, now, args.scheduler_only) is None else 1
        if args.json:
            print(msgspec.json.format(msgspec.json.encode(status), indent=2).decode())
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
