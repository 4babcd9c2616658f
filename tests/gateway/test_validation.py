"""Requests turned into scheduler requests, and every refusal naming its field.

The HTTP-level cases run the app in-process with no Redis behind it: a refused request
is answered before anything would be enqueued."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from services.gateway.app import create_app
from services.gateway.errors import ApiError
from services.gateway.protocol import ChatCompletionRequest, CompletionRequest
from services.gateway.validation import chat_plan, completion_plan
from shared.config import GatewaySettings
from shared.ports import free_port


def _completion(served, **body):
    return completion_plan(CompletionRequest.model_validate({"prompt": "hello", **body}), served)


def _chat(served, **body):
    return chat_plan(
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **body}),
        served,
    )


def _refused(fn, *args, **kw) -> ApiError:
    with pytest.raises(ApiError) as info:
        fn(*args, **kw)
    return info.value


def test_completion_plan_maps_every_parameter(served_model):
    plan = _completion(
        served_model,
        n=3,
        seed=7,
        temperature=0.5,
        top_p=0.9,
        top_k=-1,
        min_p=0.1,
        presence_penalty=1,
        frequency_penalty=-1,
        repetition_penalty=1.2,
        max_tokens=5,
        min_tokens=2,
        stop="x",
        stop_token_ids=[9],
        ignore_eos=True,
        logprobs=2,
        priority=-3,
        cache_salt="s",
    )
    assert plan.prompt_token_ids == served_model.encode("hello")
    assert [c.request_id for c in plan.choices] == [f"{plan.request_id}-{i}" for i in range(3)]
    assert plan.request_id.startswith("cmpl-")
    assert [c.sampling.seed for c in plan.choices] == [7, 8, 9]
    s = plan.choices[0].sampling
    assert (s.temperature, s.top_p, s.top_k, s.min_p, s.presence_penalty, s.frequency_penalty) == (
        0.5,
        0.9,
        0,
        0.1,
        1.0,
        -1.0,
    )
    assert (s.repetition_penalty, s.max_tokens, s.min_tokens, s.stop_token_ids, s.ignore_eos, s.logprobs) == (
        1.2,
        5,
        2,
        [9],
        True,
        2,
    )
    assert (plan.stop, plan.priority, plan.cache_salt) == (["x"], -3, "s")


def test_defaults_follow_vllm(served_model):
    assert _completion(served_model).choices[0].sampling.max_tokens == 16
    chat = _chat(served_model)
    assert chat.choices[0].sampling.max_tokens == 64 - len(chat.prompt_token_ids), "the rest of the context"
    assert chat.choices[0].sampling.temperature == 1.0
    assert chat.request_id.startswith("chatcmpl-") and chat.logprobs is None


def test_sampled_requests_get_a_seed_so_a_replay_repeats_them(served_model):
    """Without a seed a sampled request still gets one (random per call): after a scheduler
    restart its replay yields the tokens its client already has. Greedy needs none."""
    a, b = _completion(served_model, n=2), _completion(served_model)
    seeds = [c.sampling.seed for c in a.choices]
    assert all(isinstance(x, int) for x in seeds) and seeds[1] == seeds[0] + 1
    assert b.choices[0].sampling.seed != seeds[0], "still random from one call to the next"
    assert _completion(served_model, temperature=0).choices[0].sampling.seed is None


def test_chat_uses_the_template_and_its_logprob_fields(served_model):
    plan = _chat(served_model, logprobs=True, top_logprobs=3, max_completion_tokens=4, max_tokens=9)
    text = served_model.tokenizer.decode(plan.prompt_token_ids)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert plan.logprobs == 3 and plan.choices[0].sampling.max_tokens == 4, "max_completion_tokens wins"


def test_prompt_forms(served_model):
    assert _completion(served_model, prompt=[5, 6]).prompt_token_ids == [5, 6]
    assert _completion(served_model, prompt=[[5, 6]]).prompt_token_ids == [5, 6]
    assert _completion(served_model, prompt=["hello"]).prompt_token_ids == served_model.encode("hello")


@pytest.mark.parametrize(
    "body, param, words",
    [
        (dict(prompt=[5, 6], max_tokens=63), "max_tokens", ["64", "65", "2 in the prompt", "63"]),
        (
            dict(prompt=list(range(3, 70))),
            "prompt",
            ["64", "67 in the prompt", "16 for max_tokens, its default"],
        ),
        (dict(prompt=[1, 4096]), "prompt", ["prompt[1]", "4096", "vocabulary"]),
        (dict(stop_token_ids=[-1]), "stop_token_ids", ["stop_token_ids[0]", "-1"]),
        (dict(stop=["a", ""]), "stop", ["stop[1]", "empty"]),
        (dict(min_tokens=20, max_tokens=5), "min_tokens", ["min_tokens (20)", "max_tokens (5)"]),
        (dict(max_tokens=0), "max_tokens", ["max_tokens", "echo"]),
        (dict(best_of=3), "best_of", ["best_of"]),
        (dict(logit_bias={"5": 101}), "logit_bias", ["logit_bias[5]", "-100 to 100"]),
        (dict(stream_options={"include_usage": True}), "stream_options", ["stream_options", "stream"]),
    ],
)
def test_completion_refusals_name_the_field(served_model, body, param, words):
    err = _refused(_completion, served_model, **body)
    assert err.status == 400 and err.param == param
    for w in words:
        assert w in err.message


def test_chat_refusals(served_model):
    err = _refused(_chat, served_model, top_logprobs=2)
    assert err.param == "top_logprobs" and "logprobs" in err.message
    err = _refused(_chat, served_model, messages=[{"role": "user", "content": "word " * 80}])
    assert err.param == "messages" and "64" in err.message
    err = _refused(_chat, served_model, max_completion_tokens=60)
    assert err.param == "max_completion_tokens" and "64" in err.message
    err = _refused(_chat, served_model, tools=[])
    assert err.param == "tools" and "empty" in err.message
    err = _refused(_chat, served_model, model="gpt-4")
    assert err.status == 404 and err.param == "model" and "gpt-4" in err.message


# ---- through HTTP: FastAPI's own errors in OpenAI's shape ---------------------------------


@pytest.fixture
def client(served_model):
    settings = GatewaySettings(
        redis_url=f"redis://127.0.0.1:{free_port()}/0", max_body_bytes=2000, api_key="k"
    )
    app = create_app(settings, served_model)
    with TestClient(app, raise_server_exceptions=False) as c:
        c.headers["Authorization"] = "Bearer k"
        yield c


@pytest.mark.parametrize(
    "path, body, param, words",
    [
        ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature", ["temperature", "number"]),
        ("/v1/completions", {"prompt": "x", "temperature": 2.5}, "temperature", ["temperature", "2"]),
        ("/v1/completions", {"prompt": "x", "max_tokens": 1.5}, "max_tokens", ["max_tokens", "integer"]),
        ("/v1/completions", {"prompt": "x", "n": 0}, "n", ["n:", "1"]),
        ("/v1/completions", {"prompt": "x", "stop": [1]}, "stop", ["stop", "string"]),
        ("/v1/completions", {"prompt": {"a": 1}}, "prompt", ["prompt", "token ids"]),
        ("/v1/completions", {"max_tokens": 3}, "prompt", ["prompt", "required"]),
        ("/v1/completions", {"prompt": ""}, "prompt", ["prompt", "empty"]),
        ("/v1/completions", {"prompt": [[]]}, "prompt", ["prompt"]),
        ("/v1/completions", {"prompt": "x", "seed": 2**64}, "seed", ["seed"]),
        ("/v1/completions", {"prompt": "x", "stream": "yes"}, "stream", ["stream", "boolean"]),
        ("/v1/chat/completions", {"messages": []}, "messages", ["messages", "at least 1"]),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "robot", "content": "x"}]},
            "messages[0].role",
            ["role"],
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[0].content",
            ["content", "text"],
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 21},
            "top_logprobs",
            ["top_logprobs", "20"],
        ),
    ],
)
def test_http_400_names_the_field(client, path, body, param, words):
    r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    for w in words:
        assert w in err["message"], err


def test_malformed_json_and_non_object_bodies(client):
    r = client.post(
        "/v1/completions", content=b'{"prompt": "x",', headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = client.post("/v1/completions", json=[1, 2])
    assert r.status_code == 400 and "must be a JSON object" in r.json()["error"]["message"]


def test_body_limit_key_and_unknown_model(client):
    r = client.post("/v1/completions", json={"prompt": "x" * 3000})
    assert r.status_code == 413 and "2000" in r.json()["error"]["message"]
    r = client.post("/v1/completions", json={"prompt": "x"}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = client.get("/v1/models", headers={"Authorization": ""})
    assert r.status_code == 401
    r = client.post("/v1/completions", json={"prompt": "x", "model": "other"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    r = client.get("/v1/models")
    assert r.status_code == 200 and r.json()["data"][0]["id"] == "tiny"


def test_redis_down_is_503_not_500(client):
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert r.status_code == 503 and "Redis" in r.json()["error"]["message"]
    r = client.get("/health")
    assert r.status_code == 503 and "Redis" in r.json()["reason"]
    assert client.get("/metrics").status_code == 200, "metrics stay up, without the scheduler's figures"
