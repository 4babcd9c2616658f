"""The Grafana dashboard (deploy/grafana/dashboards/conveyor.json) asks only for series that
/metrics serves, by labels they have: every PromQL expression is checked against what the
gateway renders on figures with data."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from services.gateway.metrics import GatewayMetrics, RequestTimes
from shared.figure_records import SchedulerFigures, SystemStatus
from shared.messages import FinishReason
from tests.shared.helpers import worker_figures

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards" / "conveyor.json"
SERIES = re.compile(r"conveyor:[A-Za-z0-9_:]+")
SELECTOR = re.compile(r"(conveyor:[A-Za-z0-9_:]+)\{([^}]*)\}")
MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
TARGET_LABELS = {"instance", "job"}  # what Prometheus adds to every scraped series


def _served() -> dict[str, set[str]]:
    """Each series name /metrics serves (histograms' _bucket, _sum, _count; counters' _total)
    and the labels it has, with every source of figures holding data."""
    workers = {
        w: worker_figures(w, kv_usage=0.5, running=1, iteration_tokens=[1] * 14, iteration_tokens_sum=9)
        for w in ("w1", "w2")
    }
    scheduler = SchedulerFigures(updated_at=1.0, running=2, prompt_tokens=9, finished={"stop": 1})
    status = SystemStatus(scheduler=scheduler, workers=workers, errors=[], queue_length=0, pending=0)
    metrics = GatewayMetrics("tiny", 2048, lambda: status)
    times = RequestTimes(arrival=0.0)
    metrics.on_output(times, 1, 0.1, 0.5)
    metrics.on_output(times, 1, None, 0.6)
    metrics.on_finished(
        times, FinishReason.STOP, 0.7, num_prompt_tokens=3, num_generation_tokens=2, max_tokens=8
    )
    metrics.on_prompt_finished(1, 2)
    metrics.rejected(429)
    served: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            served.setdefault(sample.name, set()).update(sample.labels)
    return served


def _expressions(dashboard: dict) -> list[str]:
    panels = [p for top in dashboard["panels"] for p in [top, *top.get("panels", [])]]
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs


def test_every_query_names_only_served_series_and_their_labels():
    served, dashboard = _served(), json.loads(DASHBOARD.read_text())
    exprs = _expressions(dashboard)
    assert len(exprs) > 20
    for expr in exprs:
        names = set(SERIES.findall(expr))
        assert names, f"no conveyor series in {expr!r}"
        assert not re.search(r"\bvllm:", expr), expr
        for name in names:
            assert name in served, f"{name} (in {expr!r}) is not served; served: {sorted(served)}"
        for name, matchers in SELECTOR.findall(expr):
            for label in MATCHER.findall(matchers):
                assert label in served[name], f"{name} has no label {label!r} ({expr!r})"
        labels = set().union(*(served[n] for n in names)) | TARGET_LABELS
        for group in GROUPING.findall(expr):
            for label in filter(None, (g.strip() for g in group.split(","))):
                assert label in labels, f"grouping by {label!r}, which {sorted(names)} lack ({expr!r})"
        for name, label in re.findall(r"label_values\((conveyor:[\w:]+),\s*(\w+)\)", expr):
            assert label in served[name], expr


def test_the_dashboard_has_the_panels_a_vllm_user_expects():
    exprs = " ".join(_expressions(json.loads(DASHBOARD.read_text())))
    for series in [
        "request_success_total",
        "time_to_first_token_seconds_bucket",
        "inter_token_latency_seconds_bucket",
        "e2e_request_latency_seconds_bucket",
        "generation_tokens_total",
        "prompt_tokens_total",
        "kv_cache_usage_perc",
        "num_requests_waiting",
        "num_preemptions_total",
        "prefix_cache_hits_total",
        "spec_decode_num_accepted_tokens_total",
        "request_queue_time_seconds_bucket",
    ]:
        assert f"conveyor:{series}" in exprs, series
    assert "by (worker)" in exprs, "KV usage per worker"
