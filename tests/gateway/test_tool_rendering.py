"""Tool calling on the request side and the response's shape, without a model: what reaches
the chat template (tools, past calls, tool results, template variables), what tool_choice
turns into, every refusal naming its field, and the chat.completion bodies and chunks built
from hand-fed scheduler outputs."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from pydantic import ValidationError

from conveyor.tiny_model import CHAT_TEMPLATE, update_chat_template
from services.gateway.errors import ApiError
from services.gateway.generation import ChoiceText, Generation
from services.gateway.protocol import ChatCompletionRequest
from services.gateway.responses import ChatFormat
from services.gateway.served_model import ServedModel
from services.gateway.tool_calls import ChatConfig
from services.gateway.validation import chat_plan
from shared.config import GatewaySettings, parse_settings
from shared.messages import FinishReason, RequestOutput

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}
HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 24 C"},
]


@pytest.fixture
def model(tokenizer):
    return ServedModel(
        name="tiny", path=Path("/nonexistent/tiny"), tokenizer=tokenizer, max_model_len=4096, vocab_size=4096
    )


def _plan(model, parser="hermes", trust_template=True, **body):
    body.setdefault("messages", [{"role": "user", "content": "hi"}])
    return chat_plan(
        ChatCompletionRequest.model_validate(body), model, config=ChatConfig(parser, trust_template)
    )


def _prompt(model, plan) -> str:
    return model.tokenizer.decode(plan.prompt_token_ids)


def _refused(model, parser="hermes", trust_template=True, **body) -> ApiError:
    with pytest.raises(ApiError) as info:
        _plan(model, parser, trust_template, **body)
    assert info.value.status == 400
    return info.value


def test_tools_past_calls_and_tool_results_reach_the_prompt(model):
    plan = _plan(model, messages=HISTORY, tools=[WEATHER, TIME])
    prompt = _prompt(model, plan)
    assert json.dumps(WEATHER) in prompt and json.dumps(TIME) in prompt
    # The past call's arguments went to the template as an object, not as an escaped string.
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert "<tool_response>\nsunny, 24 C\n</tool_response>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    assert plan.chat.tool_choice == "auto" and plan.chat.parser == "hermes", "tools without tool_choice: auto"
    assert plan.choices[0].sampling.structured is None


def test_tool_choice_none_still_renders_the_tools(model):
    plan = _plan(model, tools=[WEATHER], tool_choice="none")
    assert json.dumps(WEATHER) in _prompt(model, plan)
    assert not plan.chat.reads_tool_calls and plan.choices[0].sampling.structured is None


def test_named_tool_choice_constrains_the_output_to_the_arguments(model):
    plan = _plan(
        model, tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_weather"}}
    )
    structured = plan.choices[0].sampling.structured
    assert (
        structured.kind == "json_schema" and json.loads(structured.spec) == WEATHER["function"]["parameters"]
    )
    assert (plan.chat.tool_choice, plan.chat.function_name) == ("named", "get_weather")
    no_params = _plan(model, tools=[TIME], tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert json.loads(no_params.choices[0].sampling.structured.spec) == {"type": "object", "properties": {}}


@pytest.mark.parametrize("parallel", [None, False])
def test_required_tool_choice_constrains_the_output_to_an_array_of_calls(model, parallel):
    plan = _plan(
        model,
        tools=[WEATHER, TIME],
        tool_choice="required",
        n=2,
        **({} if parallel is None else {"parallel_tool_calls": parallel}),
    )
    assert all(c.sampling.structured == plan.chat.structured for c in plan.choices)
    schema = json.loads(plan.chat.structured.spec)
    one = [{"name": "get_weather", "parameters": {"city": "Oslo"}}]
    jsonschema.validate(one, schema)
    for bad in (
        [],
        [{"name": "get_weather", "parameters": {"town": "Oslo"}}],
        [{"name": "nope", "parameters": {}}],
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    two = one + [{"name": "get_time", "parameters": {}}]
    if parallel is False:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(two, schema)
    else:
        jsonschema.validate(two, schema)


def test_required_moves_the_tools_defs_to_the_top(model):
    tool = {
        "type": "function",
        "function": {
            "name": "f",
            "parameters": {
                "type": "object",
                "properties": {"p": {"$ref": "#/$defs/P"}},
                "$defs": {"P": {"type": "integer"}},
            },
        },
    }
    schema = json.loads(_plan(model, tools=[tool], tool_choice="required").chat.structured.spec)
    jsonschema.validate([{"name": "f", "parameters": {"p": 3}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "f", "parameters": {"p": "x"}}], schema)


def test_template_fields_reach_the_template(model):
    prompt = _prompt(model, _plan(model, chat_template_kwargs={"enable_thinking": False}))
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    custom = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{{ greeting }}"
    prompt = _prompt(model, _plan(model, chat_template=custom, chat_template_kwargs={"greeting": "Go:"}))
    assert prompt == "[user] hi\nGo:"
    cont = _plan(
        model,
        messages=[{"role": "user", "content": "Count"}, {"role": "assistant", "content": "One, two"}],
        continue_final_message=True,
        add_generation_prompt=False,
    )
    assert _prompt(model, cont).endswith("<|im_start|>assistant\nOne, two")


def test_chat_echo_is_the_last_assistant_message(model):
    msgs = [{"role": "user", "content": "Count"}, {"role": "assistant", "content": "One, two"}]
    assert (
        _plan(
            model, messages=msgs, echo=True, continue_final_message=True, add_generation_prompt=False
        ).chat.echo
        == "One, two"
    )
    assert _plan(model, echo=True).chat.echo == "", "the last message is the user's: nothing to echo"


@pytest.mark.parametrize(
    "body, param, words",
    [
        (
            {"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": [WEATHER]},
            "tool_choice",
            ["nope", "get_weather"],
        ),
        ({"tool_choice": "required"}, "tool_choice", ["tools"]),
        ({"tools": []}, "tools", ["empty"]),
        ({"functions": [WEATHER["function"]]}, "functions", ["tools"]),
        ({"function_call": "auto"}, "function_call", ["tool_choice"]),
        ({"continue_final_message": True}, "continue_final_message", ["add_generation_prompt"]),
        (
            {"continue_final_message": True, "add_generation_prompt": False},
            "continue_final_message",
            ["assistant"],
        ),
        ({"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs", ["tools"]),
        ({"chat_template": "{{ raise_exception('no way') }}"}, "chat_template", ["no way"]),
        (
            {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
            ["tool_choice"],
        ),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objectx"}}}],
                "tool_choice": "required",
            },
            "tools",
            ["objectx"],
        ),
        (
            {"messages": [{"role": "user", "content": "x", "tool_calls": HISTORY[1]["tool_calls"]}]},
            "messages[0].tool_calls",
            ["assistant"],
        ),
    ],
)
def test_refusals_name_the_field(model, body, param, words):
    err = _refused(model, **body)
    assert err.param == param, err.message
    for w in words:
        assert w in err.message


def test_request_templates_need_the_operators_consent(model):
    err = _refused(model, trust_template=False, chat_template="{{ messages }}")
    assert err.param == "chat_template" and "--trust-request-chat-template" in err.message


def test_auto_needs_a_parser(model):
    err = _refused(model, parser="none", tools=[WEATHER])
    assert err.param == "tool_choice" and "--tool-call-parser" in err.message
    assert _plan(model, parser="none", tools=[WEATHER], tool_choice="required").chat.tool_choice == "required"
    assert _plan(model, parser="llama3_json", tools=[WEATHER]).chat.parser == "llama3_json"


def test_a_cached_model_gets_the_current_template(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": "old", "eos_token": "<|endoftext|>"})
    )
    update_chat_template(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config == {"chat_template": CHAT_TEMPLATE, "eos_token": "<|endoftext|>"}


# ---- the response, from hand-fed scheduler outputs -------------------------------------------
def _run(model, plan, text: str, finish=FinishReason.STOP):
    """Feeds `text`'s tokens one output at a time through a real Generation's choice states
    and ChatFormat: returns the non-streamed body and the streamed chunks."""
    gen = Generation(plan, model, engine=None, metrics=None)
    fmt, stream_fmt = ChatFormat(model, gen), ChatFormat(model, gen)
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    chunks, whole = stream_fmt.opening_chunks(), ChoiceText(0)
    for k, token in enumerate(ids):
        out = RequestOutput(
            plan.choices[0].request_id,
            token_ids=[token],
            index=k,
            finish_reason=finish if k == len(ids) - 1 else None,
        )
        delta = gen.choices[0].on_output(out)
        whole.add(delta)
        chunks.append(stream_fmt.chunk(delta))
    return fmt.response([whole]), chunks


def _assembled(chunks) -> tuple[str, dict]:
    content, calls = "", {}
    for chunk in chunks:
        delta = chunk["choices"][0]["delta"]
        content += delta.get("content") or ""
        for tc in delta.get("tool_calls", []):
            call = calls.setdefault(tc["index"], {"arguments": ""})
            call.update({k: v for k, v in tc.items() if k in ("id", "type")})
            call.setdefault("name", tc.get("function", {}).get("name"))
            call["arguments"] += tc["function"].get("arguments", "")
    return content, calls


def test_named_response_and_stream(model):
    plan = _plan(
        model, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}}
    )
    body, chunks = _run(model, plan, '{"city":"Oslo","days":2}')
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop", "vLLM: a named call keeps stop"
    assert choice["message"]["content"] == ""
    [call] = choice["message"]["tool_calls"]
    assert call["id"].startswith("chatcmpl-tool-") and call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": '{"city":"Oslo","days":2}'}
    header = chunks[1]["choices"][0]["delta"]["tool_calls"][0]
    assert header["function"] == {"name": "get_weather", "arguments": ""} and header["index"] == 0
    content, calls = _assembled(chunks)
    assert content == "" and json.loads(calls[0]["arguments"]) == {"city": "Oslo", "days": 2}
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_required_and_auto_responses_end_with_tool_calls(model):
    required = _plan(model, tools=[WEATHER, TIME], tool_choice="required")
    body, chunks = _run(
        model,
        required,
        '[{"name":"get_weather","parameters":{"city":"Oslo"}},{"name":"get_time","parameters":{}}]',
    )
    msg = body["choices"][0]["message"]
    assert [c["function"]["name"] for c in msg["tool_calls"]] == ["get_weather", "get_time"]
    assert body["choices"][0]["finish_reason"] == "tool_calls" and msg["content"] == ""
    _, calls = _assembled(chunks)
    assert [json.loads(calls[i]["arguments"]) for i in (0, 1)] == [{"city": "Oslo"}, {}]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"

    auto = _plan(model, tools=[WEATHER])
    text = 'Checking.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    body, chunks = _run(model, auto, text)
    msg = body["choices"][0]["message"]
    assert msg["content"] == "Checking." and body["choices"][0]["finish_reason"] == "tool_calls"
    assert json.loads(msg["tool_calls"][0]["function"]["arguments"]) == {"city": "Rome"}
    content, calls = _assembled(chunks)
    assert (
        content == "Checking."
        and calls[0]["id"].startswith("chatcmpl-tool-")
        and calls[0]["name"] == "get_weather"
    )
    body, _ = _run(model, auto, "No tools needed.", finish=FinishReason.LENGTH)
    assert body["choices"][0]["message"] == {
        "role": "assistant",
        "content": "No tools needed.",
        "refusal": None,
        "tool_calls": [],
    }
    assert body["choices"][0]["finish_reason"] == "length"


def test_echo_prepends_the_last_message(model):
    plan = _plan(
        model,
        messages=[{"role": "user", "content": "Count"}, {"role": "assistant", "content": "One,"}],
        echo=True,
        continue_final_message=True,
        add_generation_prompt=False,
    )
    body, chunks = _run(model, plan, " two")
    assert body["choices"][0]["message"]["content"] == "One, two"
    assert _assembled(chunks)[0] == "One, two"


def test_the_parser_flag_and_its_variable(monkeypatch):
    assert parse_settings(GatewaySettings, []).tool_call_parser == "hermes"
    assert (
        parse_settings(GatewaySettings, ["--tool-call-parser", "llama3_json"]).tool_call_parser
        == "llama3_json"
    )
    monkeypatch.setenv("CONVEYOR_TOOL_CALL_PARSER", "none")
    assert parse_settings(GatewaySettings, []).tool_call_parser == "none"
    with pytest.raises(ValidationError, match="tool_call_parser"):
        parse_settings(GatewaySettings, ["--tool-call-parser", "mistral"])


@pytest.mark.parametrize(
    "tool_choice, parser, skipped",
    [
        ("auto", "hermes", False),
        ("required", "hermes", False),
        ("none", "hermes", True),
        ("auto", "llama3_json", True),
    ],
)
def test_hermes_keeps_special_tokens_so_a_special_tool_call_tag_reaches_the_parser(
    model, tool_choice, parser, skipped
):
    """As vLLM's hermes parser: some models mark <tool_call> special; skipped, the calls vanish."""
    plan = _plan(model, parser, tools=[WEATHER], tool_choice=tool_choice)
    assert plan.output.skip_special_tokens is skipped
