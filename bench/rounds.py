"""Several systems on one workload in interleaved rounds (A, B, A, B ...), so that a shared
machine's drift falls on all of them alike; per-figure medians over the rounds, their
ranges, and the ratio of one system's medians to another's (Conveyor / vLLM).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
THROUGHPUTS = ("output_throughput", "request_throughput")
COUNTS = ("total_output_tokens",)  # with EOS stops, what each system produced differs
LATENCIES = (
    ("ttft_ms", "median"),
    ("ttft_ms", "p99"),
    ("tpot_ms", "median"),
    ("tpot_ms", "p99"),
    ("e2e_ms", "median"),
    ("e2e_ms", "p99"),
)


def interleave(runners: dict[str, Callable[[int], T]], rounds: int) -> dict[str, list[T]]:
    """Round i runs every system once, in the order given: runners[name](i)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1 (got {rounds})")
    out: dict[str, list[T]] = {name: [] for name in runners}
    for i in range(rounds):
        for name, run in runners.items():
            out[name].append(run(i))
    return out


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "rounds": values}


def medians(summaries: list[dict]) -> dict[str, dict]:
    """Median, min, max and the per-round values of the throughputs, output tokens and latency
    figures (keys such as `output_throughput`, `ttft_ms.p99`) over rounds summarised by
    bench.metrics.summarize."""
    out = {key: _spread([s[key] for s in summaries]) for key in THROUGHPUTS}
    out.update(
        {key: _spread([s[key] for s in summaries]) for key in COUNTS if all(key in s for s in summaries)}
    )
    for key, p in LATENCIES:
        values = [s[key][p] for s in summaries if s[key][p] is not None]
        if values:
            out[f"{key}.{p}"] = _spread(values)
    return out


def median_round(summaries: list[dict]) -> int:
    """The round whose output throughput is nearest the median: the one to plot."""
    mid = statistics.median(s["output_throughput"] for s in summaries)
    return min(range(len(summaries)), key=lambda i: abs(summaries[i]["output_throughput"] - mid))


def compare(by_system: dict[str, list[dict]], ours: str, peer: str) -> dict:
    """Medians of each system, and ours / peer: of the medians, and round by round (round
    i of ours against round i of the peer, run just after it)."""
    med = {name: medians(s) for name, s in by_system.items()}

    def over(key: str) -> float | None:
        a, b = med[ours].get(key), med[peer].get(key)
        return a["median"] / b["median"] if a and b and b["median"] else None

    per_round = [
        a["output_throughput"] / b["output_throughput"] if b["output_throughput"] else None
        for a, b in zip(by_system[ours], by_system[peer])
    ]
    return {
        "ours": ours,
        "peer": peer,
        "rounds": len(by_system[ours]),
        "medians": med,
        "ratio": {key: over(key) for key in (*THROUGHPUTS, "ttft_ms.p99", "ttft_ms.median")},
        "output_throughput_ratio_by_round": per_round,
    }


def fmt(x: float | None, d: int = 0) -> str:
    """A figure with thousands separators and `d` decimals; "—" for one not measured."""
    return "—" if x is None else f"{x:,.{d}f}"


def markdown(cmp: dict) -> list[str]:
    """The comparison as a table: median (min–max) per system, then the ratios."""

    def cell(spread: dict | None, d: int = 0) -> str:
        if not spread:
            return "—"
        return f"{fmt(spread['median'], d)} ({fmt(spread['min'], d)}–{fmt(spread['max'], d)})"

    lines = [
        f"\n{cmp['ours']} against {cmp['peer']}, {cmp['rounds']} interleaved rounds each: "
        "median (min–max) over the rounds",
        "| system | out tokens | out tok/s | req/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | E2E p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in cmp["medians"].items():
        lines.append(
            f"| {name} | {cell(m.get('total_output_tokens'))} | {cell(m['output_throughput'])} | "
            f"{cell(m['request_throughput'], 2)} | "
            f"{cell(m.get('ttft_ms.median'))} | {cell(m.get('ttft_ms.p99'))} | "
            f"{cell(m.get('tpot_ms.median'), 1)} | {cell(m.get('e2e_ms.p99'))} |"
        )
    r = cmp["ratio"]
    by_round = ", ".join(fmt(x, 2) for x in cmp["output_throughput_ratio_by_round"])
    lines.append(
        f"\n**{cmp['ours']} / {cmp['peer']}: output tok/s {fmt(r['output_throughput'], 2)}×** "
        f"(round by round: {by_round}), req/s {fmt(r['request_throughput'], 2)}×, "
        f"p99 TTFT {fmt(r['ttft_ms.p99'], 2)}× (below 1: ours is faster)."
    )
    return lines
