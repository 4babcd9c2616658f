"""The measured part of a run: each system's rounds on the main workload, interleaved, with
the CPU time each server's processes spent in every round; what results.json keeps of them.

A system is anything with `run(workload, desc) -> (records, counters)` and
`cpu_seconds() -> {process role: seconds}` (bench.systems.Conveyor, bench.vllm_peer.VLLMPeer).
"""

from __future__ import annotations

import os
from typing import Protocol

from bench import rounds
from bench.metrics import RequestRecord, summarize
from bench.workloads import Workload


class System(Protocol):
    def run(self, workload: Workload, desc: str = "") -> tuple[list[RequestRecord], dict]: ...

    def cpu_seconds(self) -> dict[str, float]: ...


def measure(system: System, workload: Workload, desc: str) -> tuple[list[RequestRecord], dict]:
    """One round: its records, and its figures with the CPU seconds of each of the server's
    processes over the round (warm-up included) and the 1-min load average around it."""
    cpu0, load0 = system.cpu_seconds(), os.getloadavg()[0]
    recs, counters = system.run(workload, desc)
    cpu1 = system.cpu_seconds()
    figures = {
        **summarize(recs),
        "cpu_s": {k: round(v - cpu0.get(k, 0.0), 3) for k, v in cpu1.items()},
        "load_average": [load0, os.getloadavg()[0]],
    }
    if counters:
        figures["scheduler_counters"] = counters
    return recs, figures


def run_series(systems: dict[str, System], workload: Workload, n_rounds: int) -> dict[str, list[tuple]]:
    """(records, figures) of every round of every system, rounds interleaved in dict order."""

    def runner(name: str, system: System):
        return lambda i: measure(system, workload, f"{name} {workload.name} round {i + 1}/{n_rounds}")

    return rounds.interleave({name: runner(name, s) for name, s in systems.items()}, n_rounds)


def record_series(
    series: dict[str, list[tuple]], results: dict, records: dict, ours: str, peer: str | None
) -> None:
    """Each system's median round becomes its entry in results["systems"] (and its records
    the ones plotted); every round's figures go to results["rounds"]; with a peer, the
    comparison of medians to results["peer"]."""
    by_system = {name: [figures for _, figures in runs] for name, runs in series.items()}
    for name, runs in series.items():
        k = rounds.median_round(by_system[name])
        results["systems"][name] = {**by_system[name][k], "median_round": k}
        records[name] = runs[k][0]
        for i, (recs, _) in enumerate(runs):
            if i != k:
                records[f"{name} round {i}"] = recs
    if len(by_system[ours]) > 1 or peer:
        results["rounds"] = by_system
    if peer:
        results["peer"] = rounds.compare(by_system, ours, peer)
