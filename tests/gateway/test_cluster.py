"""When the gateway refuses work because nothing can serve it (503), and what /health and
/metrics say then — against a real Redis with hand-written scheduler figures."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from fastapi.testclient import TestClient

from services.gateway.app import create_app
from services.gateway.cluster import worker_limits
from services.gateway.served_model import ContextLimits
from shared.config import GatewaySettings
from shared.figure_records import (
    STARTUP_FAILURE_TTL_S,
    SchedulerFigures,
    StartupFailure,
    SystemStatus,
    health,
)
from shared.redis_protocol import StatusWriter
from tests.shared.helpers import worker_figures
from tests.stack import REPO, service_env

NOW = 1_000_000.0


def _status(updated_at=NOW - 1, workers=None, failures=None) -> SystemStatus:
    scheduler = None if updated_at is None else SchedulerFigures(updated_at=updated_at)
    return SystemStatus(
        scheduler=scheduler,
        workers={"w1": worker_figures("w1", NOW - 1)} if workers is None else workers,
        errors=[],
        queue_length=0,
        pending=0,
        startup_failures=failures or {},
    )


def _failure(error: str, age_s: float = 5.0) -> StartupFailure:
    return StartupFailure(error=error, time=NOW - age_s)


@pytest.mark.parametrize(
    "status, words",
    [
        (_status(updated_at=None), "no scheduler"),
        (_status(updated_at=NOW - 6), "6.0 s old"),
        (_status(workers={}), "no worker is registered"),
        (
            _status(workers={"w1": worker_figures("w1", NOW - 1, stalled=True, step_in_flight_s=12)}),
            "every worker is stalled: w1 (step running 12 s)",
        ),
        (_status(workers={"w1": worker_figures("w1", NOW - 9)}), "no worker has fresh figures"),
    ],
)
def test_unavailable_reasons(status, words):
    assert words in health(status, NOW)


def test_unavailable_says_why_workers_could_not_start():
    failures = {
        "w2": _failure("unsupported architecture ['X']"),
        "w3": _failure("unsupported architecture ['X']"),
        "w4": _failure("no config.json"),
        "w5": _failure("too old", age_s=STARTUP_FAILURE_TTL_S + 1),
    }
    assert health(_status(workers={}, failures=failures), NOW) == (
        "no worker is registered with the scheduler; "
        "workers w2, w3 failed to start: unsupported architecture ['X']; "
        "worker w4 failed to start: no config.json"
    ), "one line per error; a failure of long ago is left out"
    stale = {"w1": worker_figures("w1", NOW - 9)}
    assert health(_status(workers=stale, failures={"w1": _failure("bad"), "w4": _failure("worse")}), NOW) == (
        "no worker has fresh figures; worker w4 failed to start: worse"
    ), "a worker registered since is left out"
    assert health(_status(failures=failures), NOW) is None, (
        "a worker serves: failures of others do not matter"
    )


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
    assert worker_limits(_status(), NOW, ContextLimits(64, 5000)) == ContextLimits(64, 4096), (
        "never beyond the gateway's own --max-model-len"
    )


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


def _check_metrics(text: str) -> None:
    """/metrics shows the figures that the test below writes, and the latency histograms."""
    model = 'model_name="tiny"'
    for line in [
        f"conveyor:num_requests_running{{{model}}} 3.0",
        f"conveyor:num_requests_waiting{{{model}}} 2.0",
        f'conveyor:kv_cache_usage_perc{{{model},worker="w1"}} 0.5',
        f'conveyor:kv_cache_usage_perc{{{model},worker="w2"}} 0.25',
        f"conveyor:prompt_tokens_total{{{model}}} 40.0",
        f"conveyor:generation_tokens_total{{{model}}} 7.0",
        f"conveyor:num_preemptions_total{{{model}}} 1.0",
        f"conveyor:prefix_cache_queries_total{{{model}}} 40.0",
        f"conveyor:prefix_cache_hits_total{{{model}}} 16.0",
        f'conveyor:scheduler_request_finished_total{{finished_reason="stop",{model}}} 5.0',
        f'conveyor:scheduler_request_finished_total{{finished_reason="abort",{model}}} 2.0',
    ]:
        assert line in text.splitlines(), line
    for name in [
        "time_to_first_token_seconds",
        "inter_token_latency_seconds",
        "e2e_request_latency_seconds",
        "request_queue_time_seconds",
    ]:
        assert f"# TYPE conveyor:{name} histogram" in text


def test_health_and_metrics_follow_the_scheduler_figures(app_client):
    client, redis, keys = app_client
    writer = StatusWriter(redis, keys)
    writer.figures(
        SchedulerFigures(
            updated_at=time.time(),
            running=3,
            waiting=2,
            prompt_tokens=40,
            generation_tokens=7,
            preemptions=1,
            prefix_queries=40,
            prefix_hits=16,
            finished={"stop": 5, "abort": 2},
        )
    )
    writer.flush()
    assert client.get("/health").status_code == 503, "no worker yet"
    writer.worker("w1", worker_figures("w1", time.time(), kv_usage=0.5))
    writer.worker("w2", worker_figures("w2", time.time(), kv_usage=0.25))
    writer.flush()
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["workers"] == 2
    assert client.get("/v1/models").json()["data"][0]["max_model_len"] == 64, (
        "the gateway's own limit is lower"
    )
    _check_metrics(client.get("/metrics").text)
    writer.worker("w2", worker_figures("w2", time.time(), stalled=True, step_in_flight_s=11))
    writer.worker("w1", worker_figures("w1", time.time(), stalled=True, step_in_flight_s=12))
    writer.flush()
    stalled = client.get("/health")
    assert (
        stalled.status_code == 503
        and "every worker is stalled: w1 (step running 12 s)" in stalled.json()["reason"]
    )
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
    assert r.status_code == 503 and "stalled" in r.json()["error"]["message"], "the 503 follows the same rule"
    writer.figures(SchedulerFigures(updated_at=time.time() - 30))
    writer.flush()
    assert "30" in client.get("/health").json()["reason"]


def test_the_503_names_why_a_worker_could_not_start(app_client, redis_server, tmp_path):
    """As under compose, which restarts a worker that exits 2: the real worker process,
    started on a model it cannot serve, records why in Redis, and the gateway's 503 says it."""
    client, redis, keys = app_client
    model = tmp_path / "mamba"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["MambaForCausalLM"]}))
    worker = subprocess.run(
        [sys.executable, "-m", "services.gpu_worker", "--model", str(model)],
        cwd=REPO,
        env=service_env(
            REDIS_URL=redis_server.url, CONVEYOR_REDIS_PREFIX=keys.prefix, CONVEYOR_WORKER_ID="worker-0"
        ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert worker.returncode == 2, worker.stderr
    writer = StatusWriter(redis, keys)  # a live scheduler, after the worker: its figures must be fresh
    writer.figures(SchedulerFigures(updated_at=time.time()))
    writer.flush()
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
    assert r.status_code == 503 and r.json()["error"]["message"].startswith(
        "no worker is available: no worker is registered with the scheduler; "
        "worker worker-0 failed to start: "
        f"unsupported architecture ['MambaForCausalLM'] in {str(model)!r}; supported: "
    ), r.json()
    assert (
        "worker worker-0 failed to start: unsupported architecture" in client.get("/health").json()["reason"]
    )
