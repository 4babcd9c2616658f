"""vLLM's /tokenize, /detokenize and /version: the same tokens the generation routes use
(chat messages through the same template), in vLLM's shapes. They need no scheduler, so
the in-process app answers them with no Redis behind it."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from services.gateway.app import create_app
from services.gateway.protocol import ChatCompletionRequest
from services.gateway.validation import chat_plan
from shared.config import GatewaySettings
from shared.ports import free_port


@pytest.fixture
def client(served_model):
    settings = GatewaySettings(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    with TestClient(create_app(settings, served_model), raise_server_exceptions=False) as c:
        yield c


def test_tokenize_a_prompt(client, served_model):
    r = client.post("/tokenize", json={"prompt": "hello world", "return_token_strs": True})
    assert r.status_code == 200, r.text
    ids = served_model.encode("hello world")
    assert r.json() == {
        "count": len(ids),
        "max_model_len": 64,
        "tokens": ids,
        "token_strs": served_model.tokenizer.convert_ids_to_tokens(ids),
    }
    plain = client.post("/tokenize", json={"prompt": "hello world", "add_special_tokens": False}).json()
    assert plain["tokens"] == served_model.encode("hello world", False) and plain["token_strs"] is None


def test_tokenize_messages_as_the_chat_route_renders_them(client, served_model):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    for add in (True, False):
        got = client.post("/tokenize", json={"messages": messages, "add_generation_prompt": add}).json()
        plan = chat_plan(
            ChatCompletionRequest.model_validate(
                {"messages": messages, "add_generation_prompt": add, "max_tokens": 1}
            ),
            served_model,
        )
        assert got["tokens"] == plan.prompt_token_ids and got["count"] == len(plan.prompt_token_ids)


def test_detokenize_and_version(client, served_model):
    ids = served_model.encode("round trip", False)
    assert client.post("/detokenize", json={"tokens": ids}).json() == {"prompt": "round trip"}
    version = client.get("/version").json()["version"]
    assert version and version[0].isdigit()


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, "messages"),
        ("/tokenize", {"prompt": "x", "model": "other"}, "model"),
        ("/tokenize", {"messages": [{"role": "robot", "content": "x"}]}, "messages"),
        ("/detokenize", {"tokens": [1, 4096]}, "tokens"),
        ("/detokenize", {"tokens": "abc"}, "tokens"),
    ],
)
def test_refusals_name_the_field(client, path, body, param):
    r = client.post(path, json=body)
    assert r.status_code in (400, 404) and r.json()["error"]["param"] == param, r.text
