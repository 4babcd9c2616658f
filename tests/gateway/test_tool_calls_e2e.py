"""Tool calling end to end through the `openai` client, on the random-weight tiny model: named
and required tool choice give calls whose arguments validate against the function's schema
(the grammar forces them, whatever the weights say), at temperature 0 and 1, streamed or not;
tools and past calls reach the prompt; auto reads the text with the gateway's parser."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.gateway.tool_examples import SCHEMAS, TOOLS

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "What is the weather in Oslo?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
MAX_TOKENS = 120


@pytest.fixture(scope="module")
def client(gateway) -> openai.OpenAI:
    return gateway.openai(max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(gateway_model_dir) -> str:
    return gateway_model_dir.name


def _check_calls(calls, names=None) -> None:
    assert calls, "at least one call"
    for call in calls:
        assert call.id.startswith("chatcmpl-tool-") and call.type == "function"
        assert names is None or call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("temperature", [0, 1])
def test_named_tool_choice_gives_valid_arguments(client, model, temperature):
    res = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice=NAMED,
        n=2,
        temperature=temperature,
        max_tokens=MAX_TOKENS,
    )
    for choice in res.choices:
        assert choice.finish_reason == "stop", "vLLM: a named call ends with stop"
        assert not choice.message.content
        assert len(choice.message.tool_calls) == 1
        _check_calls(choice.message.tool_calls, {"get_weather"})


@pytest.mark.parametrize("temperature", [0, 1])
def test_required_tool_choice_gives_valid_calls(client, model, temperature):
    res = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=temperature,
        max_tokens=MAX_TOKENS,
    )
    choice = res.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert len(choice.message.tool_calls) == 1, "parallel_tool_calls false: one call"
    _check_calls(choice.message.tool_calls)


@pytest.mark.parametrize("tool_choice", [NAMED, "required"])
def test_streamed_tool_call_deltas_assemble_into_valid_arguments(client, model, tool_choice):
    stream = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice=tool_choice,
        parallel_tool_calls=False,
        temperature=1,
        max_tokens=MAX_TOKENS,
        stream=True,
    )
    calls, finish = {}, None
    for chunk in stream:
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        assert not choice.delta.content
        for tc in choice.delta.tool_calls or []:
            call = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
            call["id"] = tc.id or call["id"]
            call["name"] = (tc.function.name if tc.function else None) or call["name"]
            call["arguments"] += (tc.function.arguments if tc.function else None) or ""
    assert finish == ("stop" if tool_choice is NAMED else "tool_calls")
    assert len(calls) == 1
    call = calls[0]
    assert call["id"].startswith("chatcmpl-tool-")
    jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])


def test_tools_and_past_calls_reach_the_prompt(client, model):
    plain = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=1)
    with_tools = client.chat.completions.create(
        model=model, messages=MESSAGES, tools=TOOLS, tool_choice="none", max_tokens=1
    )
    history = MESSAGES + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": '{"city": "Oslo", "days": 1, "unit": "celsius"}',
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    with_history = client.chat.completions.create(
        model=model, messages=history, tools=TOOLS, tool_choice="none", max_tokens=1
    )
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens + 100, (
        "the tools' signatures are rendered"
    )
    assert with_history.usage.prompt_tokens > with_tools.usage.prompt_tokens + 20, (
        "and the past call and result"
    )
    assert with_tools.choices[0].message.tool_calls in (None, []), "tool_choice none: nothing is parsed"


def test_auto_reads_the_text_and_returns_a_message(client, model):
    res = client.chat.completions.create(
        model=model, messages=MESSAGES, tools=TOOLS, temperature=1, max_tokens=16
    )
    choice = res.choices[0]
    # Random weights write no <tool_call> block: the text is the content, as it came.
    assert isinstance(choice.message.content, str) and choice.finish_reason in ("stop", "length")
    assert not choice.message.tool_calls


def test_auto_streams_text_that_is_no_call_as_content(client, model):
    kw = dict(model=model, messages=MESSAGES, tools=TOOLS, temperature=0, max_tokens=16)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole


def test_refusals_through_http(client, model):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=model,
            messages=MESSAGES,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )
    assert info.value.body["param"] == "tool_choice"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, messages=MESSAGES, tools=TOOLS, tool_choice="sometimes")
    assert info.value.body["param"].startswith("tool_choice")
