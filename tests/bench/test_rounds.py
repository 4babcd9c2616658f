"""Interleaved rounds against real (fake) servers: the order the systems ran in, the
medians over rounds and the ratio of ours to the peer's, each server's CPU time, and the
table summary.md shows."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from bench import rounds
from bench.client import run_workload
from bench.report import CONVEYOR, VLLM
from bench.series import record_series, run_series
from bench.server import LocalServer
from bench.workloads import Request, Workload


class FakeServer(LocalServer):
    name = "fake"

    def __init__(self, tmp: Path, label: str, token_ms: float):
        super().__init__(tmp / f"{label}.log", start_timeout_s=60)
        self.journal, self.token_ms = tmp / f"{label}.journal", token_ms

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "tests.bench.fake_openai",
            "--port",
            str(self.port),
            "--token-ms",
            str(self.token_ms),
            "--journal",
            str(self.journal),
        ]

    def arrivals(self) -> list[float]:
        return [json.loads(line)["t"] for line in self.journal.read_text().splitlines()]


class FakeSystem:
    def __init__(self, server: FakeServer, model: str):
        self.server, self.model = server, model

    def run(self, workload: Workload, desc: str = ""):
        return run_workload(self.server.url, workload, self.model, progress=False), {"steps": 1}

    def cpu_seconds(self) -> dict[str, float]:
        return self.server.cpu_seconds()


WORKLOAD = Workload("t", [Request([3, 4, 5], 20, 0.0) for _ in range(4)])


def test_rounds_interleave_and_the_ratio_is_of_the_medians(tmp_path):
    with FakeServer(tmp_path, "fast", 2.0) as fast, FakeServer(tmp_path, "slow", 8.0) as slow:
        series = run_series({CONVEYOR: FakeSystem(fast, "a"), VLLM: FakeSystem(slow, "b")}, WORKLOAD, 3)
        a, b = fast.arrivals(), slow.arrivals()
    # Conveyor's round i, then vLLM's round i, then Conveyor's round i + 1, ...
    assert len(a) == len(b) == 12
    for i in range(3):
        assert max(a[4 * i : 4 * i + 4]) < min(b[4 * i : 4 * i + 4])
        if i < 2:
            assert max(b[4 * i : 4 * i + 4]) < min(a[4 * i + 4 : 4 * i + 8])
    results, records = {"systems": {}}, {}
    record_series(series, results, records, CONVEYOR, VLLM)
    cmp = results["peer"]
    med = cmp["medians"]
    for name in (CONVEYOR, VLLM):
        per_round = [f["output_throughput"] for f in results["rounds"][name]]
        assert med[name]["output_throughput"]["median"] == pytest.approx(sorted(per_round)[1])
        assert results["systems"][name]["output_throughput"] in per_round
        assert all(
            f["completed"] == 4 and f["scheduler_counters"] == {"steps": 1} for f in results["rounds"][name]
        )
        assert set(results["rounds"][name][0]["cpu_s"]) == {"tests.bench.fake_openai"}
    assert cmp["ratio"]["output_throughput"] == pytest.approx(
        med[CONVEYOR]["output_throughput"]["median"] / med[VLLM]["output_throughput"]["median"]
    )
    assert cmp["ratio"]["output_throughput"] > 1.5, "4x shorter token gaps: clearly faster"
    assert len(cmp["output_throughput_ratio_by_round"]) == 3
    assert sum(name.startswith(CONVEYOR) for name in records) == 3, "every round's records are kept"
    text = "\n".join(rounds.markdown(cmp))
    assert f"**{CONVEYOR} / {VLLM}: output tok/s {cmp['ratio']['output_throughput']:.2f}×**" in text
    assert f"| {VLLM} | " in text and "3 interleaved rounds" in text and "| out tokens |" in text


def test_medians_of_even_rounds_and_the_median_round():
    s = [
        {
            "output_throughput": x,
            "request_throughput": x / 10,
            "ttft_ms": {"median": 10 * x, "p99": None},
            "tpot_ms": {"median": 1.0, "p99": 2.0},
            "e2e_ms": {"median": 5.0, "p99": 9.0},
        }
        for x in (10.0, 40.0, 20.0, 30.0)
    ]
    m = rounds.medians(s)
    assert m["output_throughput"] == {
        "median": 25.0,
        "min": 10.0,
        "max": 40.0,
        "rounds": [10.0, 40.0, 20.0, 30.0],
    }
    assert m["ttft_ms.median"]["median"] == 250.0 and "ttft_ms.p99" not in m, "no p99 figures: none reported"
    assert rounds.median_round(s) in (2, 3)
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        rounds.interleave({"a": lambda i: i}, 0)


def test_a_peer_gets_three_rounds_unless_told(capsys):
    from bench.run import parse_args

    assert parse_args(["--peer", "vllm"]).rounds == 3
    assert parse_args([]).rounds == 1 and parse_args([]).peer is None
    assert parse_args(["--peer", "vllm", "--rounds", "2"]).rounds == 2
    with pytest.raises(SystemExit):
        parse_args(["--rounds", "0"])
    assert "--rounds must be >= 1 (got 0)" in capsys.readouterr().err
