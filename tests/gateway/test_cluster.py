"""When the gateway refuses work because nothing can serve it (503), and what /health and
/metrics say then — against a real Redis with hand-written scheduler figures."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from services.gateway.app import create_app
from services.gateway.cluster import worker_limits
from services.gateway.served_model import ContextLimits
from shared.config import GatewaySettings
from shared.figures import SchedulerFigures, SystemStatus, health
from shared.redis_protocol import StatusWriter
from tests.shared.helpers import worker_figures

NOW = 1_000_000.0


def _status(updated_at=NOW - 1, workers=None) -> SystemStatus:
    scheduler = None if updated_at is None else SchedulerFigures(updated_at=updated_at)
    return SystemStatus(scheduler=scheduler, workers={"w1": worker_figures("w1", NOW - 1)} if workers is None
                        else workers, errors=[], queue_length=0, pending=0)


@pytest.mark.parametrize("status, words", [
    (_status(updated_at=None), "no scheduler"),
    (_status(updated_at=NOW - 6), "6.0 s old"),
    (_status(workers={}), "no worker is registered"),
    (_status(workers={"w1": worker_figures("w1", NOW - 1, stalled=True, step_in_flight_s=12)}),
     "every worker is stalled: w1 (step running 12 s)"),
    (_status(workers={"w1": worker_figures("w1", NOW - 9)}), "no worker has fresh figures"),
])
def test_unavailable_reasons(status, words):
    assert words in health(status, NOW)


def test_available_while_one_worker_serves():
    assert health(_status(), NOW) is None
    stalled = worker_figures("w2", NOW - 1, stalled=True)
    assert health(_status(workers={"w1": worker_figures("w1", NOW - 1), "w2": stalled}), NOW) is None
    assert health(_status(workers={}), NOW, scheduler_only=True) is None


def test_requests_are_validated_against_what_the_workers_registered():
    fallback = ContextLimits(max_model_len=4096, vocab_size=5000)
    assert worker_limits(_status(workers={}), NOW, fallback) == fallback, "no worker yet: config.json's"
    # worker_figures: a pool of 64 blocks of 16 tokens holds 1024 of the model's 2048.
    assert worker_limits(_status(), NOW, fallback) == ContextLimits(1024, 4096)
    assert worker_limits(_status(), NOW, ContextLimits(64, 5000)) == ContextLimits(64, 4096), \
        "never beyond the gateway's own --max-model-len"


@pytest.fixture
def app_client(redis_server, redis_client, redis_keys, served_model):
    settings = GatewaySettings(redis_url=redis_server.url, redis_prefix=redis_keys.prefix)
    with TestClient(create_app(settings, served_model)) as client:
        yield client, redis_client, redis_keys


def test_no_scheduler_means_503_and_unhealthy(app_client):
    client, _, _ = app_client
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
    assert r.status_code == 503 and "scheduler" in r.json()["error"]["message"]
    assert r.headers["Retry-After"] == "1"
    health = client.get("/health")
    assert health.status_code == 503 and "scheduler" in health.json()["reason"]


def test_health_and_metrics_follow_the_scheduler_figures(app_client):
    client, redis, keys = app_client
    writer = StatusWriter(redis, keys)
    writer.figures(SchedulerFigures(updated_at=time.time(), running=3, waiting=2, prompt_tokens=40,
                                    generation_tokens=7, preemptions=1, prefix_queries=40, prefix_hits=16,
                                    finished={"stop": 5, "abort": 2}))
    writer.flush()
    assert client.get("/health").status_code == 503, "no worker yet"
    writer.worker("w1", worker_figures("w1", time.time(), kv_usage=0.5))
    writer.worker("w2", worker_figures("w2", time.time(), kv_usage=0.25))
    writer.flush()
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["workers"] == 2
    assert client.get("/v1/models").json()["data"][0]["max_model_len"] == 64, "the gateway's own limit is lower"
    text = client.get("/metrics").text
    for line in ["conveyor:num_requests_running 3.0", "conveyor:num_requests_waiting 2.0",
                 "conveyor:kv_cache_usage_perc 0.375", "conveyor:prompt_tokens_total 40.0",
                 "conveyor:generation_tokens_total 7.0", "conveyor:num_preemptions_total 1.0",
                 "conveyor:prefix_cache_queries_total 40.0", "conveyor:prefix_cache_hits_total 16.0",
                 'conveyor:scheduler_request_finished_total{finished_reason="stop"} 5.0',
                 'conveyor:scheduler_request_finished_total{finished_reason="abort"} 2.0']:
        assert line in text.splitlines(), line
    for name in ["time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds"]:
        assert f"# TYPE conveyor:{name} histogram" in text
    writer.worker("w2", worker_figures("w2", time.time(), stalled=True, step_in_flight_s=11))
    writer.worker("w1", worker_figures("w1", time.time(), stalled=True, step_in_flight_s=12))
    writer.flush()
    stalled = client.get("/health")
    assert stalled.status_code == 503 and "every worker is stalled: w1 (step running 12 s)" in stalled.json()["reason"]
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
    assert r.status_code == 503 and "stalled" in r.json()["error"]["message"], "the 503 follows the same rule"
    writer.figures(SchedulerFigures(updated_at=time.time() - 30))
    writer.flush()
    assert "30" in client.get("/health").json()["reason"]
