"""Tool calls read back from model text: each parser on whole outputs, and the same outputs fed
a few characters at a time, as a stream delivers them: the deltas must assemble into the very
message the whole output gives."""

from __future__ import annotations

import json

import pytest

from services.gateway.tool_calls import ChatPlan
from services.gateway.tool_parsers import ToolCallStream
from shared.messages import FinishReason

HERMES = ChatPlan("auto", parser="hermes")
LLAMA = ChatPlan("auto", parser="llama3_json")
REQUIRED = ChatPlan("required")
NAMED = ChatPlan("named", function_name="get_weather")

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'


def _message(plan: ChatPlan, text: str):
    content, calls = ToolCallStream(plan).message(text)
    return content, [(c.name, json.loads(c.arguments)) for c in calls]


def _streamed(plan: ChatPlan, text: str, step: int):
    """The deltas for `text` fed `step` characters at a time, put together as a client does."""
    stream = ToolCallStream(plan)
    content, calls = "", {}
    pieces = [text[i : i + step] for i in range(0, len(text), step)] or [""]
    deltas = [stream.named_header()] if plan.tool_choice == "named" else []
    deltas += [stream.feed(p, final=k == len(pieces) - 1) for k, p in enumerate(pieces)]
    for delta in deltas:
        content += delta.get("content", "")
        for tc in delta.get("tool_calls", []):
            call = calls.setdefault(tc["index"], {"id": None, "name": None, "arguments": ""})
            call["id"] = tc.get("id", call["id"])
            call["name"] = tc.get("function", {}).get("name", call["name"])
            call["arguments"] += tc["function"].get("arguments", "")
    return content, [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize(
    "text, content, calls",
    [
        ("just words", "just words", []),
        (CALL, None, [("get_weather", {"city": "Paris", "days": 2})]),
        ("Let me check. " + CALL, "Let me check.", [("get_weather", {"city": "Paris", "days": 2})]),
        (
            CALL + "\n" + CALL.replace("Paris", "Rome"),
            None,
            [("get_weather", {"city": "Paris", "days": 2}), ("get_weather", {"city": "Rome", "days": 2})],
        ),
        # Malformed calls stay text; the valid one beside them is still a call.
        ('<tool_call>{"name": broken}</tool_call>', '<tool_call>{"name": broken}</tool_call>', []),
        (
            '<tool_call>{"arguments": {}}</tool_call> ' + CALL,
            '<tool_call>{"arguments": {}}</tool_call>',
            [("get_weather", {"city": "Paris", "days": 2})],
        ),
        # Cut off after the JSON (max_tokens): still a call; cut inside it: text.
        ('<tool_call>{"name": "f", "arguments": {}}', None, [("f", {})]),
        ('<tool_call>{"name": "f", "argu', '<tool_call>{"name": "f", "argu', []),
        ("a <tool_ b", "a <tool_ b", []),
    ],
)
def test_hermes(text, content, calls):
    assert _message(HERMES, text) == (content, calls)


@pytest.mark.parametrize(
    "text, content, calls",
    [
        ('{"name": "f", "parameters": {"x": 1}}', None, [("f", {"x": 1})]),
        (
            '<|python_tag|>{"name": "f", "arguments": {"x": 1}}; {"name": "g", "parameters": {}}',
            None,
            [("f", {"x": 1}), ("g", {})],
        ),
        ('{"x": 1}', '{"x": 1}', []),  # not a call: the whole output is text
        (
            '{"name": "f", "parameters": {}} trailing words',
            '{"name": "f", "parameters": {}} trailing words',
            [],
        ),
        ("Hello {not json", "Hello {not json", []),
    ],
)
def test_llama3_json(text, content, calls):
    assert _message(LLAMA, text) == (content, calls)


def test_required_reads_the_forced_array_and_named_takes_the_output_as_arguments():
    text = '[{"name":"get_weather","parameters":{"city":"Oslo"}},{"name":"get_time","parameters":{}}]'
    assert _message(REQUIRED, text) == ("", [("get_weather", {"city": "Oslo"}), ("get_time", {})])
    assert _message(REQUIRED, "garbage") == ("", [])
    assert _message(NAMED, '{"city":"Oslo"}') == ("", [("get_weather", {"city": "Oslo"})])
    assert _message(NAMED, "  ") == ("", []), "an empty output is no call (as vLLM)"


def test_parallel_tool_calls_false_keeps_the_first_call():
    plan = ChatPlan("auto", parser="hermes", parallel_tool_calls=False)
    assert _message(plan, CALL + CALL.replace("Paris", "Rome"))[1] == [
        ("get_weather", {"city": "Paris", "days": 2})
    ]


@pytest.mark.parametrize(
    "plan, text",
    [
        (HERMES, "Let me check. " + CALL + " done"),
        (HERMES, CALL + "\n" + CALL.replace("Paris", "Rome")),
        (HERMES, "plain text with a < sign and <tool no call"),
        (HERMES, '<tool_call>{"name": broken}</tool_call> and more'),
        (LLAMA, '{"name": "f", "parameters": {"x": [1, 2]}}'),
        (LLAMA, "Hello there"),
        (
            REQUIRED,
            '[{"name":"get_weather","parameters":{"city":"Oslo"}},{"name":"f","parameters":{"a":"}{"}}]',
        ),
        (NAMED, '{"city":"Oslo","days":3}'),
    ],
)
@pytest.mark.parametrize("step", [1, 3, 1000])
def test_streamed_deltas_assemble_into_the_whole_message(plan, text, step):
    content, calls = _message(plan, text)
    got_content, got_calls = _streamed(plan, text, step)
    assert got_content == (content or "")
    assert [(c["name"], json.loads(c["arguments"])) for c in got_calls] == calls
    assert all(c["id"].startswith("chatcmpl-tool-") for c in got_calls)


def test_hermes_streams_text_before_a_call_and_holds_a_possible_tag():
    stream = ToolCallStream(HERMES)
    assert stream.feed("Sure, <tool", final=False) == {"content": "Sure,"}, "its space waits for more text"
    assert stream.feed("_call>{", final=False) == {}
    delta = stream.feed('"name": "f", "arguments": {}}</tool_call>', final=False)
    assert delta["tool_calls"][0]["function"] == {"name": "f", "arguments": "{}"}


def test_finish_reason_is_tool_calls_when_calls_ended_the_turn_except_named():
    for plan, text in ((HERMES, CALL), (REQUIRED, '[{"name":"f","parameters":{}}]')):
        stream = ToolCallStream(plan)
        stream.message(text)
        assert stream.finish_reason(FinishReason.STOP) == "tool_calls"
        assert stream.finish_reason(FinishReason.LENGTH) == "length"
    named = ToolCallStream(NAMED)
    named.message("{}")
    assert named.finish_reason(FinishReason.STOP) == "stop"
    plain = ToolCallStream(HERMES)
    plain.message("no calls")
    assert plain.finish_reason(FinishReason.STOP) == "stop"
