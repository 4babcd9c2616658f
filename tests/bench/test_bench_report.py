"""The report of a run (ratios, long-short and shared-prefix figures, plots, summary),
built from hand-made records, without starting anything."""

from __future__ import annotations

import json

import pytest

from bench import run
from bench.metrics import RequestRecord, summarize


def records(n: int, ttft: float, tag: str = "short") -> list[RequestRecord]:
    return [
        RequestRecord(
            i,
            64,
            4,
            0.0,
            start=0.0,
            first_token=ttft,
            chunk_times=[ttft + k for k in range(4)],
            end=ttft + 3,
            output_tokens=4,
            finish_reason="length",
            tag=tag,
        )
        for i in range(n)
    ]


def results_for(recs: dict) -> dict:
    res = {
        "command": "python -m bench.run",
        "machine": run.machine_info(2, "cpu"),
        "model": {"name": "tiny", "dtype": "float32"},
        "load_average": {"conveyor_start": (1.0, 1.0, 1.0)},
        "workload": {"name": "long-short", "requests": 6, "prompt_tokens": 384, "output_tokens": 24},
        "systems": {
            run.CONVEYOR: summarize(recs[run.CONVEYOR]),
            run.STATIC: summarize(recs[run.STATIC]),
            run.SINGLE: summarize(recs[run.SINGLE]),
        },
    }
    res["systems"][run.SINGLE]["subset"] = {"requests": 2, "of": 6, "extrapolated_workload_duration_s": 12.0}
    return res


def test_long_short_report(tmp_path):
    recs = {
        run.CONVEYOR: records(4, 0.5) + records(2, 1.0, "long"),
        run.STATIC: records(6, 2.0),
        run.SINGLE: records(2, 0.1),
        f"{run.CONVEYOR} short only": records(4, 0.25),
        f"{run.STATIC} short only": records(4, 1.0),
    }
    res = results_for(recs)
    run.add_ratios(res)
    assert res["ratios"]["ttft_p99_ms"]["static_over_conveyor"] == pytest.approx(2000 / 1000)
    rows = run.long_short_figures(recs, res)
    assert rows[f"{run.CONVEYOR} — with long"]["p99"] == pytest.approx(500)
    assert res["long_short"]["p99_with_over_without"][run.CONVEYOR] == pytest.approx(2.0)
    files = run.write_plots(tmp_path, res, recs, "test")
    assert files == ["throughput.png", "latency_cdf.png", "short_ttft.png"]
    assert all((tmp_path / f).stat().st_size > 1000 for f in files)
    text = run.summary_markdown(res)
    assert "| Conveyor | 6/6 |" in text and "short requests' TTFT" in text
    json.dumps(res)  # results.json must serialise


def test_shared_prefix_report_and_failures(tmp_path):
    failed = records(1, 0.5)
    failed[0].error = "finished early (finish_reason=abort): 1 of 4 tokens (usage)"
    recs = {run.CONVEYOR: records(3, 0.5) + failed, run.STATIC: records(4, 2.0), run.SINGLE: records(2, 0.1)}
    res = results_for(recs)
    res["workload"]["name"] = "shared-prefix"
    res["shared_prefix"] = {
        "hit_rate": 0.8,
        "ideal_hit_rate": 0.9,
        "prefix_caching_off": summarize(records(4, 1.0)),
    }
    run.add_ratios(res)
    assert "prefix_cache.png" in run.write_plots(tmp_path, res, recs, "test")
    text = run.summary_markdown(res)
    assert "**Conveyor: 1 requests failed**" in text and "finish_reason=abort" in text
    assert "hit rate 80.0% of prompt tokens (ideal 90.0%)" in text


def test_chat_report_shows_the_tokens_each_system_produced():
    conveyor, vllm = records(3, 0.5), records(3, 0.6)
    vllm[2].output_tokens, vllm[2].text = 3, "other"
    for a, b in zip(conveyor[:2], vllm[:2]):
        a.text = b.text = "same"
    agree = run.output_agreement(conveyor, vllm)
    assert agree == {"both_completed": 3, "identical_text": 2, "output_tokens": [12, 11]}
    recs = {run.CONVEYOR: conveyor, run.STATIC: records(3, 2.0), run.SINGLE: records(2, 0.1)}
    res = results_for(recs)
    res["workload"] = {
        "name": "chat",
        "requests": 3,
        "prompt_tokens": 90,
        "output_tokens": None,
        "max_output_tokens": 480,
        "stops_at_eos": True,
    }
    text = run.summary_markdown(res)
    assert "at most 480 output tokens (stopping at EOS)" in text
    assert "| out tokens |" in text and "| Conveyor | 3/3 | " in text and " | 12 | " in text
