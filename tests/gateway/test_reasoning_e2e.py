"""Reasoning output end to end: a gateway process started with --reasoning-parser deepseek_r1 in
front of the real scheduler and worker (the random-weight tiny model, whose text never closes a
think block: all of it is thinking), through the official `openai` client."""

from __future__ import annotations

import openai
import pytest

from tests.gateway.conftest import start_gateway

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Is 9.11 more than 9.8?"}]
FIXED = {"ignore_eos": True}  # outputs of exactly max_tokens tokens
OFF = {"chat_template_kwargs": {"enable_thinking": False}}


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return start_gateway(stack, "gateway-reasoning", "--reasoning-parser", "deepseek_r1").openai(
        max_retries=0, timeout=60
    )


@pytest.fixture(scope="module")
def model(gateway_model_dir) -> str:
    return gateway_model_dir.name


def _create(client, model, **kw):
    return client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        max_tokens=12,
        temperature=0,
        extra_body={**FIXED, **kw.pop("extra_body", {})},
        **kw,
    )


def test_an_unclosed_thinking_is_all_reasoning_streamed_or_not(client, model):
    msg = _create(client, model).choices[0].message
    assert msg.reasoning_content and msg.reasoning == msg.reasoning_content
    assert msg.content is None, "as vLLM: the output never left its thinking"
    reasoning, content = "", ""
    for chunk in _create(client, model, stream=True):
        delta = chunk.choices[0].delta
        reasoning += getattr(delta, "reasoning_content", None) or ""
        content += delta.content or ""
    assert reasoning == msg.reasoning_content and content == ""


def test_thinking_off_gives_content_only(client, model):
    plain = _create(client, model, extra_body=OFF).choices[0].message
    assert plain.content and getattr(plain, "reasoning_content", None) is None
    streamed = "".join(
        c.choices[0].delta.content or "" for c in _create(client, model, stream=True, extra_body=OFF)
    )
    assert streamed == plain.content


def test_a_constraint_is_refused_while_thinking_and_the_completions_route_is_not_parsed(client, model):
    with pytest.raises(openai.BadRequestError) as info:
        _create(client, model, response_format={"type": "json_object"})
    assert info.value.body["param"] == "response_format"
    text = client.completions.create(
        model=model, prompt="Is 9.11 more than 9.8?", max_tokens=8, temperature=0, extra_body=FIXED
    ).choices[0]
    assert text.text and getattr(text, "reasoning_content", None) is None
