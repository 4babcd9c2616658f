"""Speculative decoding through the whole system: a scheduler started with vLLM's
--speculative-config (n-gram prompt lookup), a worker process and a gateway on a real
Redis. Greedy output equals transformers' token for token, streamed or not, and /metrics
shows the proposals accepted; a bad configuration stops the scheduler at start-up."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import httpx
import pytest

from conveyor.tiny_model import make_model
from tests.gateway.conftest import metric_value
from tests.gpu_worker.hf_reference import assert_greedy_matches, hf_greedy
from tests.stack import REPO, Stack, service_env

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

CONFIG = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("spec"), preset="tiny", num_hidden_layers=2, seed=4)


@pytest.fixture(scope="module")
def prompts_and_references(model_dir):
    """Prompts that repeat a phrase (n-gram lookup finds proposals in them), and
    transformers' greedy output for each: the same for both methods."""
    rng = random.Random(8)
    phrase = [rng.randrange(3, 4096) for _ in range(10)]
    prompts = [phrase * 3, [rng.randrange(3, 4096) for _ in range(6)] + phrase * 2]
    return prompts, hf_greedy(model_dir, prompts, MAX_TOKENS, ignore_eos=True)


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_greedy_through_the_system_with_speculation_equals_transformers(
    redis_server, model_dir, prompts_and_references, tmp_path_factory, method
):
    # The worker runs the draft model: here the model itself, whose proposals are accepted.
    config = (
        CONFIG
        if method == "ngram"
        else {"method": "draft_model", "num_speculative_tokens": 3, "model": str(model_dir)}
    )
    prompts, references = prompts_and_references
    stack = Stack(redis_server.url, model_dir, tmp_path_factory.mktemp("spec-logs"))
    try:
        stack.start_scheduler("--speculative-config", json.dumps(config))
        stack.start_worker("w1", "--speculative-config", json.dumps(config))
        port = stack.start_gateway("gw")  # starts beside the worker; healthy once it registered
        stack.wait_workers({"w1"})
        stack.wait_gateway("gw", port)
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=120.0) as client:
            for i, prompt in enumerate(prompts):
                body = dict(
                    model=model_dir.name,
                    prompt=prompt,
                    max_tokens=MAX_TOKENS,
                    temperature=0,
                    ignore_eos=True,
                    return_token_ids=True,
                )
                whole = client.post("/v1/completions", json=body)
                assert whole.status_code == 200, whole.text
                assert_greedy_matches(whole.json()["choices"][0]["token_ids"], references[i], f"prompt {i}")
                streamed = []
                with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            for choice in json.loads(line[6:])["choices"]:
                                streamed += choice.get("token_ids") or []
                assert streamed == whole.json()["choices"][0]["token_ids"], "several tokens a step, streamed"

            def accepted() -> bool:  # the scheduler publishes its counters every second
                text = client.get("/metrics").text
                return metric_value(text, "conveyor:spec_decode_num_accepted_tokens_total") > 0

            stack.wait_until(accepted, "accepted proposals in /metrics", timeout_s=20.0)
    finally:
        stack.stop()


@pytest.mark.parametrize(
    "config, words",
    [
        ('{"method": "ngram"}', "num_speculative_tokens"),
        ('{"method": "draft_model", "num_speculative_tokens": 3}', 'needs "model"'),
        ("ngram", "not JSON"),
    ],
)
def test_a_bad_speculative_config_stops_the_scheduler_saying_why(config, words):
    proc = subprocess.run(
        [sys.executable, "-m", "services.scheduler", "--speculative-config", config],
        cwd=REPO,
        env=service_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "speculative" in proc.stderr and words in proc.stderr, proc.stderr
