"""When the gateway refuses work because nothing can serve it (503), and what /health and
/metrics say then — against a real Redis with hand-written scheduler figures."""

from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient

from services.gateway.app import create_app
from services.gateway.cluster import unavailable_reason
from shared.config import GatewaySettings

NOW = 1_000_000.0


def _status(updated_at=NOW - 1, workers=None) -> dict:
    stats = {} if updated_at is None else {"updated_at": updated_at}
    return {"stats": stats, "workers": {"w1": {}} if workers is None else workers}


@pytest.mark.parametrize("status, words", [
    (_status(updated_at=None), "no scheduler"),
    (_status(updated_at=NOW - 6), "6.0 s old"),
    (_status(workers={}), "no worker"),
    (_status(workers={"w1": {"leaving": True}}), "no worker"),
])
def test_unavailable_reasons(status, words):
    assert words in unavailable_reason(status, NOW)


def test_available():
    assert unavailable_reason(_status(), NOW) is None


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
    redis.hset(keys.stats, mapping={"updated_at": time.time(), "running": 3, "waiting": 2, "prompt_tokens": 40,
                                    "generation_tokens": 7, "preemptions": 1, "prefix_queries": 40,
                                    "prefix_hits": 16, "finished_stop": 5, "finished_abort": 2})
    assert client.get("/health").status_code == 503, "no worker yet"
    redis.hset(keys.workers, mapping={"w1": json.dumps({"kv_usage": 0.5}), "w2": json.dumps({"kv_usage": 0.25})})
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["workers"] == 2
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
    redis.hset(keys.stats, "updated_at", time.time() - 30)
    assert "30" in client.get("/health").json()["reason"]
