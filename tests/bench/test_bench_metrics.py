"""The figures of `vllm bench serve`, computed from hand-made request timelines."""

from __future__ import annotations

import pytest

from bench.metrics import RequestRecord, latency_values, stats_ms, summarize


def record(i: int, start: float, chunks: list[float], tokens: int, error: str | None = None) -> RequestRecord:
    return RequestRecord(
        i,
        prompt_tokens=10,
        max_tokens=tokens,
        arrival=start,
        start=start,
        first_token=chunks[0] if chunks else None,
        chunk_times=chunks,
        end=chunks[-1] if chunks else None,
        output_tokens=tokens,
        error=error,
    )


def test_ttft_tpot_itl_e2e_of_one_request():
    r = record(0, 0.0, [1.0, 1.5, 2.0, 3.0], 4)
    assert r.ttft == 1.0 and r.e2e == 3.0
    assert r.tpot == pytest.approx((3.0 - 1.0) / 3)
    assert r.itls == pytest.approx([0.5, 0.5, 1.0])


def test_tpot_uses_token_count_not_chunk_count():
    # Two chunks carrying 5 tokens (the gateway may merge tokens into one chunk).
    r = record(0, 0.0, [1.0, 2.0], 5)
    assert r.tpot == pytest.approx(0.25)
    assert record(0, 0.0, [1.0], 1).tpot is None


def test_percentiles_interpolate_linearly():
    s = stats_ms([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert s["mean"] == pytest.approx(50.5)
    assert s["median"] == pytest.approx(50.5)
    assert s["p90"] == pytest.approx(90.1)
    assert s["p99"] == pytest.approx(99.01)
    assert stats_ms([])["p99"] is None


def test_summary_throughputs_and_failures():
    recs = [
        record(0, 0.0, [1.0, 2.0], 2),
        record(1, 0.0, [0.5, 4.0], 2),
        record(2, 1.0, [], 0, error="HTTP 500: boom"),
    ]
    s = summarize(recs)
    assert s["completed"] == 2 and s["failed"] == 1
    assert s["duration_s"] == 4.0
    assert s["request_throughput"] == pytest.approx(0.5)
    assert s["output_throughput"] == pytest.approx(1.0)
    assert s["total_token_throughput"] == pytest.approx((20 + 4) / 4)
    assert s["ttft_ms"]["median"] == pytest.approx(750)
    assert s["e2e_ms"]["p99"] == pytest.approx(2000 + 0.99 * 2000)
    assert s["errors"] == ["HTTP 500: boom"]
    assert len(latency_values(recs)["itl"]) == 2  # one gap per successful request
