"""The HTTP API end to end, through the official `openai` client: a gateway process in
front of the real scheduler and worker, on a 2-layer tiny model."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from shared.redis_protocol import read_status
from tests.gateway.conftest import metric_value
from tests.stack import LONG_CONTEXT

pytestmark = pytest.mark.slow

PROMPT = "The quick brown fox jumps over the lazy dog"
IGNORE_EOS = {"ignore_eos": True}  # vLLM's extension: outputs of a fixed length
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def client(gateway) -> openai.OpenAI:
    return gateway.openai(max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def hf_tokenizer(gateway_model_dir):
    return AutoTokenizer.from_pretrained(str(gateway_model_dir), local_files_only=True)


def _model(gateway_model_dir) -> str:
    return gateway_model_dir.name


def test_models_health_and_auth(gateway, client, gateway_model_dir):
    assert [m.id for m in client.models.list().data] == [_model(gateway_model_dir)]
    health = httpx.get(f"{gateway.url}/health")
    assert health.status_code == 200 and health.json()["workers"] == 1
    bad = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=_model(gateway_model_dir), prompt="x", max_tokens=1)
    assert httpx.get(f"{gateway.url}/metrics").status_code == 200, "open without a key"


def test_gateway_keeps_its_liveness_key(gateway):
    """The scheduler aborts the requests of a gateway whose key stays missing."""
    stack = gateway.stack
    ours = stack.keys.gateway(stack.reply_to).encode()  # the test-side gateway's, set for an hour
    keys = [k for k in stack.client.keys(stack.keys.gateway("*")) if k != ours]
    assert keys, "every running gateway has one"
    assert all(0 < stack.client.ttl(k) <= 5 for k in keys), "it expires soon unless refreshed"


def test_completion_streaming_equals_non_streaming_with_usage(client, gateway_model_dir, hf_tokenizer):
    model = _model(gateway_model_dir)
    full = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=24, temperature=0, extra_body=IGNORE_EOS
    )
    assert full.object == "text_completion" and full.id.startswith("cmpl-") and full.model == model
    choice = full.choices[0]
    assert choice.index == 0 and choice.finish_reason == "length" and choice.text
    assert full.usage.prompt_tokens == len(hf_tokenizer(PROMPT)["input_ids"])
    assert full.usage.completion_tokens == 24
    assert full.usage.total_tokens == full.usage.prompt_tokens + 24

    chunks = list(
        client.completions.create(
            model=model,
            prompt=PROMPT,
            max_tokens=24,
            temperature=0,
            extra_body=IGNORE_EOS,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_chat_streaming_equals_non_streaming(client, gateway_model_dir, hf_tokenizer):
    model = _model(gateway_model_dir)
    full = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        max_completion_tokens=20,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert full.object == "chat.completion" and full.id.startswith("chatcmpl-")
    msg = full.choices[0].message
    assert msg.role == "assistant" and msg.content and full.choices[0].finish_reason == "length"
    template_ids = hf_tokenizer.apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    assert full.usage.prompt_tokens == len(template_ids), (
        "the model's chat template, with the generation prompt"
    )
    assert full.usage.completion_tokens == 20

    stream = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        max_tokens=20,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == msg.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_sse_wire_format_ends_with_done(gateway, gateway_model_dir):
    body = {"model": _model(gateway_model_dir), "prompt": PROMPT, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{gateway.url}/v1/completions", json=body, headers=gateway.headers()) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    assert json.loads(events[0][6:])["object"] == "text_completion"


def test_n_choices(client, gateway_model_dir):
    model = _model(gateway_model_dir)
    greedy = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=8, temperature=0, n=3, extra_body=IGNORE_EOS
    )
    assert sorted(c.index for c in greedy.choices) == [0, 1, 2]
    assert len({c.text for c in greedy.choices}) == 1, "greedy: every choice the same"
    assert greedy.usage.completion_tokens == 24

    sampled = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        max_tokens=8,
        temperature=1.0,
        seed=11,
        n=3,
        extra_body={"ignore_eos": True},
    )
    assert len({c.message.content for c in sampled.choices}) == 3, "seed + i per choice: they differ"

    stream = client.completions.create(
        model=model,
        prompt=PROMPT,
        max_tokens=8,
        temperature=1.0,
        seed=11,
        n=2,
        stream=True,
        extra_body=IGNORE_EOS,
    )
    texts = {0: "", 1: ""}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
    again = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=11, n=2, extra_body=IGNORE_EOS
    )
    assert texts == {c.index: c.text for c in again.choices}


def test_seed_reproducibility(client, gateway_model_dir):
    model = _model(gateway_model_dir)

    def sample(seed):
        return (
            client.completions.create(
                model=model,
                prompt=PROMPT,
                max_tokens=12,
                temperature=1.0,
                top_p=0.95,
                seed=seed,
                extra_body=IGNORE_EOS,
            )
            .choices[0]
            .text
        )

    assert sample(1234) == sample(1234)
    assert len({sample(s) for s in (1, 2, 3)}) == 3


def test_stop_string_is_trimmed_and_the_request_aborted(gateway, client, gateway_model_dir):
    model = _model(gateway_model_dir)
    ref = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=30, temperature=0, logprobs=0, extra_body=IGNORE_EOS
    )
    text = ref.choices[0].text
    lp = ref.choices[0].logprobs
    # A stop string straddling two tokens in the middle of the output.
    i = next(
        i
        for i in range(4, len(lp.tokens) - 2)
        if min(len(lp.tokens[i]), len(lp.tokens[i + 1])) >= 2
        and "\ufffd" not in lp.tokens[i] + lp.tokens[i + 1]
    )
    stop = lp.tokens[i][-2:] + lp.tokens[i + 1][:2]
    cut = text.find(stop)
    # The token that completes the first occurrence is the last one generated.
    completing = next(j for j, off in enumerate(lp.text_offset) if off + len(lp.tokens[j]) >= cut + len(stop))

    # Far more tokens than the reference: the gateway's abort must reach the scheduler while
    # the request still runs (with 30, a fast machine could finish it first, as "length").
    for stream in (False, True):
        res = client.completions.create(
            model=model,
            prompt=PROMPT,
            max_tokens=3000,
            temperature=0,
            stop=[stop],
            extra_body=IGNORE_EOS,
            stream=stream,
            stream_options={"include_usage": True} if stream else None,
        )
        if stream:
            chunks = list(res)
            got = "".join(c.choices[0].text for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
            usage, rid = chunks[-1].usage, chunks[0].id
        else:
            got, finish, usage, rid = res.choices[0].text, res.choices[0].finish_reason, res.usage, res.id
        assert got == text[:cut] and stop not in got
        assert finish == "stop"
        assert usage.completion_tokens == completing + 1
        _wait_status(gateway, f"{rid}-0", b"abort")
        assert gateway.stack.client.hget(gateway.stack.keys.request(f"{rid}-0"), "error") == b"stop string"


def test_stop_token_id_ends_with_stop_and_its_text_is_left_out(gateway, client, gateway_model_dir):
    stack = gateway.stack
    prompt = list(range(100, 120))
    stack.submit("direct", prompt, max_tokens=16, ignore_eos=True)
    stack.wait_finished(["direct"])
    tokens = stack.tokens["direct"]
    tok = AutoTokenizer.from_pretrained(str(gateway_model_dir), local_files_only=True)
    assert client.completions.create(
        model=_model(gateway_model_dir), prompt=prompt, max_tokens=16, temperature=0, extra_body=IGNORE_EOS
    ).choices[0].text == tok.decode(tokens)
    k = 6
    first = tokens.index(tokens[k])  # where that token first appears
    res = client.completions.create(
        model=_model(gateway_model_dir),
        prompt=prompt,
        max_tokens=16,
        temperature=0,
        extra_body={"stop_token_ids": [tokens[k]], "ignore_eos": True},
    )
    assert res.choices[0].finish_reason == "stop"
    assert res.choices[0].text == tok.decode(tokens[:first])
    assert res.usage.completion_tokens == first + 1, "the stop token counts as generated"


def test_logprobs(client, gateway_model_dir):
    model = _model(gateway_model_dir)
    res = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3, extra_body=IGNORE_EOS
    )
    lp = res.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == res.choices[0].text
    assert all(len(t) <= 3 for t in lp.top_logprobs) and all(x <= 0 for x in lp.token_logprobs)
    # Greedy: the chosen token is the most likely one.
    assert all(abs(max(t.values()) - x) < 1e-5 for t, x in zip(lp.top_logprobs, lp.token_logprobs))

    chat = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 5 and all(len(c.top_logprobs) == 2 for c in content)
    assert b"".join(bytes(c.bytes) for c in content).decode() == chat.choices[0].message.content


def test_prefix_cache_hits_are_reported(client, gateway_model_dir):
    prompt = " ".join(["cached prefix"] * 30)
    kw = dict(model=_model(gateway_model_dir), prompt=prompt, max_tokens=2, temperature=0)
    client.completions.create(**kw)
    second = client.completions.create(**kw)
    assert second.usage.prompt_tokens_details.cached_tokens >= 16


def test_errors_in_openai_shape(gateway, client, gateway_model_dir):
    model = _model(gateway_model_dir)
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    assert e.value.body["param"] == "model" and e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt=PROMPT, max_tokens=LONG_CONTEXT + 1000)
    assert str(LONG_CONTEXT) in e.value.message and str(LONG_CONTEXT + 1000) in e.value.message
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=MESSAGES, temperature=3)
    assert e.value.body["param"] == "temperature"
    r = httpx.post(
        f"{gateway.url}/v1/completions",
        content=b"{not json",
        headers={**gateway.headers(), "Content-Type": "application/json"},
    )
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{gateway.url}/v1/completions", content=b"x" * (2 << 20), headers=gateway.headers())
    assert r.status_code == 413


def _wait_status(gateway, request_id: str, finish_reason: bytes, timeout_s: float = 10.0) -> None:
    key = gateway.stack.keys.request(request_id)
    deadline = time.monotonic() + timeout_s
    while gateway.stack.client.hget(key, "finish_reason") != finish_reason:
        assert time.monotonic() < deadline, gateway.stack.client.hgetall(key)
        time.sleep(0.05)


def test_metrics_after_the_requests_above(gateway):
    # The scheduler's figures are written about every second: the module's requests can all
    # finish inside one interval, so wait for figures written after they did.
    asked_at, deadline = time.time(), time.monotonic() + 10
    while read_status(gateway.stack.client, gateway.stack.keys).scheduler.updated_at <= asked_at + 0.001:
        assert time.monotonic() < deadline, "no scheduler figures written for 10 s"
        time.sleep(0.1)
    text = gateway.metrics()
    for name in [
        "time_to_first_token_seconds_count",
        "inter_token_latency_seconds_count",
        "e2e_request_latency_seconds_count",
        "request_queue_time_seconds_count",
        "request_prefill_time_seconds_count",
        "request_decode_time_seconds_count",
        "request_params_n_count",
        "iteration_tokens_total_count",
    ]:
        assert metric_value(text, f"conveyor:{name}") > 0, name
    assert any(
        line.startswith("conveyor:kv_cache_usage_perc{model_name=") and 'worker="w1"' in line
        for line in text.splitlines()
    ), "one series per worker"
    for reason in ("length", "stop"):
        assert metric_value(text, "conveyor:request_success_total", f'finished_reason="{reason}"') > 0
    assert metric_value(text, "conveyor:requests_rejected_total", 'status="400"') > 0
    assert metric_value(text, "conveyor:prompt_tokens_total") > 0
    assert metric_value(text, "conveyor:generation_tokens_total") > 0
    assert metric_value(text, "conveyor:prefix_cache_hits_total") > 0
