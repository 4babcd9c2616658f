"""Reasoning output (--reasoning-parser): the split of a text into thinking and answer, whole and
streamed in pieces cut anywhere; where each parser starts the thinking; and, through a chat plan
and the response shapes fed hand-made scheduler outputs token by token, the message and the
deltas a client sees, tool calls read from the answer only, and the refusals (the in-process
app, no Redis behind it: a refused request is a 400, an accepted one the 503 of no Redis)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from conveyor.tiny_model import build_tokenizer
from services.gateway.app import create_app
from services.gateway.errors import ApiError
from services.gateway.generation import ChoiceText, Generation
from services.gateway.protocol import ChatCompletionRequest
from services.gateway.reasoning import ANSWER, MAYBE, THINKING, ReasoningPlan, ReasoningSplit
from services.gateway.responses import ChatFormat
from services.gateway.served_model import ServedModel
from services.gateway.tool_calls import ChatConfig
from services.gateway.validation import chat_plan
from shared.config import GatewaySettings
from shared.messages import FinishReason, RequestOutput
from shared.ports import free_port
from tests.gateway.tool_examples import TOOLS
from tests.stack import REPO, service_env

# (where the output starts, the output, the expected (reasoning, content)); reasoning None:
# the output never thought.
CASES = [
    (THINKING, "abc</think>xyz", ("abc", "xyz")),
    (THINKING, "<think>abc</think>xyz", ("abc", "xyz")),
    (THINKING, "\n<think>\nabc\n</think>\n\nxyz", ("\nabc\n", "\n\nxyz")),
    (THINKING, "abc", ("abc", "")),  # never closed (cut by max_tokens): all reasoning
    (THINKING, "<think>abc", ("abc", "")),
    (THINKING, "</think>xyz", ("", "xyz")),
    (THINKING, "abc</think>", ("abc", "")),
    (THINKING, "a<b</thinkx</th</think>y</think>z<think>", ("a<b</thinkx</th", "y</think>z<think>")),
    (THINKING, "é🙂</think>ü", ("é🙂", "ü")),
    (THINKING, "", ("", "")),
    (MAYBE, "<think>abc</think>xyz", ("abc", "xyz")),
    (MAYBE, " \n<think>abc</think>xyz", ("abc", "xyz")),
    (MAYBE, "<think>abc", ("abc", "")),
    (MAYBE, "abc</think>xyz", (None, "abc</think>xyz")),  # qwen3: no <think>, no thinking
    (MAYBE, "Hi <think>x</think>y", (None, "Hi <think>x</think>y")),
    (MAYBE, "<thin", (None, "<thin")),
    (MAYBE, " \n", (None, " \n")),
    (MAYBE, "", (None, "")),
    (ANSWER, "<think>abc</think>xyz", (None, "<think>abc</think>xyz")),
    (ANSWER, "abc", (None, "abc")),
]


def _streamed(start: str, pieces: list[str]) -> tuple[str, str, bool]:
    split = ReasoningSplit(ReasoningPlan(start))
    reasoning = content = ""
    for k, piece in enumerate(pieces):
        r, c = split.feed(piece, final=k == len(pieces) - 1)
        reasoning, content = reasoning + r, content + c
    return reasoning, content, split.thought


@pytest.mark.parametrize("start, text, expected", CASES)
def test_the_whole_split(start, text, expected):
    assert ReasoningSplit(ReasoningPlan(start)).whole(text) == expected


@pytest.mark.parametrize("start, text, expected", CASES)
def test_streamed_pieces_cut_anywhere_assemble_into_the_whole_split(start, text, expected):
    reasoning, content = expected
    want = (reasoning or "", content, reasoning is not None)
    assert _streamed(start, list(text) or [""]) == want, "one character at a time"
    for i in range(len(text) + 1):
        assert _streamed(start, [text[:i], text[i:]]) == want, i
        for j in range(i, len(text) + 1):
            assert _streamed(start, [text[:i], text[i:j], text[j:]]) == want, (i, j)


def test_only_a_possible_tag_is_held_back():
    split = ReasoningSplit(ReasoningPlan(THINKING))
    assert split.feed("Let me think", False) == ("Let me think", "")
    assert split.feed(" </th", False) == (" ", ""), "the tail that may be </think> waits"
    assert split.feed("e", False) == ("</the", ""), "it was not"
    assert split.feed(" end</think>\n\nThe", False) == (" end", "\n\nThe")
    assert split.feed(" answer", False) == ("", " answer")
    maybe = ReasoningSplit(ReasoningPlan(MAYBE))
    assert maybe.feed("\n<thi", False) == ("", ""), "qwen3: undecided until it is or is not <think>"
    assert maybe.feed("nk>x", False) == ("x", "")
    assert ReasoningSplit(ReasoningPlan(MAYBE)).feed("Sure", False) == ("", "Sure")


# ---- where the thinking starts ------------------------------------------------------------
@pytest.fixture
def roomy_model(tokenizer):
    return ServedModel(
        name="tiny", path=Path("/nonexistent/tiny"), tokenizer=tokenizer, max_model_len=2048, vocab_size=4096
    )


def _chat(model, parser="deepseek_r1", messages=None, **body):
    config = ChatConfig(reasoning_parser=parser, trust_request_chat_template=True)
    request = ChatCompletionRequest.model_validate(
        {
            "messages": messages or [{"role": "user", "content": "Is 9.11 more than 9.8?"}],
            "max_tokens": 40,
            **body,
        }
    )
    return chat_plan(request, model, config=config)


def _start(model, parser, **body) -> str:
    return _chat(model, parser, **body).chat.reasoning.start


# The tiny model's template is ChatML, with Qwen3's empty think block when thinking is off.
OPENING = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}assistant\n<think>\n"
CLOSING = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}assistant\n<think>\n\n</think>\n\n"
EARLIER_TURN = "<think>old</think>{% for m in messages %}{{ m['content'] }}\n{% endfor %}assistant\n"


def test_where_each_parser_starts_thinking(roomy_model):
    m = roomy_model
    assert _start(m, "deepseek_r1") == THINKING, "R1 may leave <think> out: thinking from the start"
    assert _start(m, "qwen3") == MAYBE, "qwen3: thinking only after a <think>"
    for parser in ("qwen3", "deepseek_r1"):
        off = {"chat_template_kwargs": {"enable_thinking": False}}
        assert _start(m, parser, **off) == ANSWER, "the template closed the think block"
        assert _start(m, parser, chat_template=OPENING, **off) == ANSWER, (
            "the request's switch, as vLLM reads it"
        )
        assert _start(m, parser, chat_template=OPENING) == THINKING, "the template opened it"
        assert _start(m, parser, chat_template=CLOSING) == ANSWER
    assert _start(m, "qwen3", chat_template=EARLIER_TURN) == MAYBE, (
        "an earlier turn's </think> is not this one's"
    )
    continued = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>\nThe user"}]
    assert (
        _start(m, "qwen3", messages=continued, continue_final_message=True, add_generation_prompt=False)
        == THINKING
    ), "the continued message left it open"


def test_no_parser_no_reasoning_plan(roomy_model):
    request = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}]})
    assert chat_plan(request, roomy_model).chat.reasoning is None


# ---- the answer a client sees ---------------------------------------------------------------
def _outputs(model, plan, text: str, finish=FinishReason.STOP) -> list[RequestOutput]:
    """`text` as the worker would send it: one token per output, the last one finishing."""
    rid = plan.choices[0].request_id
    ids = model.encode(text, False)
    return [
        RequestOutput(rid, [t], index=k, finish_reason=finish if k == len(ids) - 1 else None)
        for k, t in enumerate(ids)
    ]


def _message(model, plan, text: str, finish=FinishReason.STOP) -> dict:
    gen = Generation(plan, model, engine=None, metrics=None)
    whole = ChoiceText(0)
    for out in _outputs(model, plan, text, finish):
        whole.add(gen.choices[0].on_output(out))
    return ChatFormat(model, gen).response([whole])["choices"][0]


def _stream(model, plan, text: str, finish=FinishReason.STOP) -> tuple[list[dict], dict]:
    """The deltas, and what they put together (as a client would)."""
    gen = Generation(plan, model, engine=None, metrics=None)
    fmt = ChatFormat(model, gen)
    deltas = [c["choices"][0]["delta"] for c in fmt.opening_chunks()]
    last = None
    for out in _outputs(model, plan, text, finish):
        last = fmt.chunk(gen.choices[0].on_output(out))["choices"][0]
        deltas.append(last["delta"])
    joined: dict = {"finish_reason": last["finish_reason"], "tool_calls": []}
    for d in deltas:
        for key in ("content", "reasoning", "reasoning_content"):
            if d.get(key) is not None:
                joined[key] = joined.get(key, "") + d[key]
        joined["tool_calls"] += d.get("tool_calls", [])
    return deltas, joined


THOUGHT = "<think>\nThe user asks which is larger.\n</think>\n\n9.8 is larger."


@pytest.mark.parametrize("parser", ["qwen3", "deepseek_r1"])
def test_thinking_and_answer_whole_and_streamed(roomy_model, parser):
    m = roomy_model
    msg = _message(m, _chat(m, parser), THOUGHT)["message"]
    assert msg["reasoning"] == msg["reasoning_content"] == "\nThe user asks which is larger.\n"
    assert msg["content"] == "\n\n9.8 is larger."
    deltas, joined = _stream(m, _chat(m, parser, stream=True), THOUGHT)
    assert joined["reasoning"] == joined["reasoning_content"] == msg["reasoning"]
    assert joined["content"] == msg["content"], "the deltas put together equal the message"
    assert all("<think>" not in json.dumps(d) and "</think>" not in json.dumps(d) for d in deltas)
    thinking = [k for k, d in enumerate(deltas) if d.get("reasoning")]
    answering = [k for k, d in enumerate(deltas) if d.get("content")]
    assert max(thinking) <= min(answering), "reasoning deltas while thinking, content deltas after"


@pytest.mark.parametrize(
    "parser, reasoning, content",
    [
        ("deepseek_r1", "Hmm, let me see", None),  # never closed: all reasoning, no content
        ("qwen3", None, "Hmm, let me see"),  # nothing opened: all answer
    ],
)
def test_unterminated_and_untagged_outputs(roomy_model, parser, reasoning, content):
    m = roomy_model
    choice = _message(m, _chat(m, parser), "Hmm, let me see", FinishReason.LENGTH)
    assert (choice["message"]["reasoning"], choice["message"]["content"]) == (reasoning, content)
    assert choice["finish_reason"] == "length"
    _, joined = _stream(m, _chat(m, parser, stream=True), "Hmm, let me see", FinishReason.LENGTH)
    assert joined.get("reasoning") == reasoning and (joined.get("content") or None) == content


def test_thinking_off_is_all_content_tags_and_all(roomy_model):
    m = roomy_model
    text = "<think>x</think>y"
    msg = _message(m, _chat(m, "deepseek_r1", chat_template_kwargs={"enable_thinking": False}), text)[
        "message"
    ]
    assert msg["reasoning"] is None and msg["content"] == text


def test_include_reasoning_false_leaves_the_thinking_out(roomy_model):
    m = roomy_model
    msg = _message(m, _chat(m, "qwen3", include_reasoning=False), THOUGHT)["message"]
    assert (
        msg["reasoning"] is None
        and msg["reasoning_content"] is None
        and msg["content"] == "\n\n9.8 is larger."
    )
    deltas, joined = _stream(m, _chat(m, "qwen3", include_reasoning=False, stream=True), THOUGHT)
    assert "reasoning" not in joined and joined["content"] == msg["content"]


def test_without_a_parser_the_answer_is_unchanged(roomy_model):
    request = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}]})
    msg = _message(roomy_model, chat_plan(request, roomy_model), THOUGHT)["message"]
    assert msg["content"] == THOUGHT and "reasoning" not in msg and "reasoning_content" not in msg


def test_tool_calls_are_read_from_the_answer_only(roomy_model):
    m = roomy_model
    mentioned = '<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>'
    called = (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "days": 1, "unit": "celsius"}}'
        "</tool_call>"
    )
    text = f"<think>Maybe {mentioned}? No.</think>\n{called}"
    choice = _message(m, _chat(m, "qwen3", tools=TOOLS), text)
    msg = choice["message"]
    assert [c["function"]["name"] for c in msg["tool_calls"]] == ["get_weather"]
    assert msg["reasoning"] == f"Maybe {mentioned}? No." and msg["content"] is None
    assert choice["finish_reason"] == "tool_calls"
    _, joined = _stream(m, _chat(m, "qwen3", tools=TOOLS, stream=True), text)
    assert [c["function"]["name"] for c in joined["tool_calls"]] == ["get_weather"]
    assert joined["reasoning"] == msg["reasoning"] and not joined.get("content")
    assert joined["finish_reason"] == "tool_calls"


def test_special_think_tokens_are_kept_in_the_text():
    """A tokenizer that marks the tags special would have them skipped from the text."""
    tok = build_tokenizer(4096)
    tok.add_tokens(["<think>", "</think>"], special_tokens=True)
    m = ServedModel(
        name="tiny", path=Path("/nonexistent/tiny"), tokenizer=tok, max_model_len=512, vocab_size=len(tok)
    )
    plan = _chat(m, "deepseek_r1")
    assert plan.output.skip_special_tokens is False
    ids = m.encode("<think>abc</think>xyz", False)
    assert tok.convert_tokens_to_ids("</think>") in ids, "one token"
    assert m.decode(ids, skip_special_tokens=True) == "abcxyz", "what skipping would leave"
    msg = _message(m, plan, "<think>abc</think>xyz")["message"]
    assert (msg["reasoning"], msg["content"]) == ("abc", "xyz")


# ---- refusals ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "body, param",
    [
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"structured_outputs": {"regex": "[a-z]+"}}, "structured_outputs.regex"),
        ({"guided_choice": ["yes", "no"]}, "guided_choice"),
        ({"tools": TOOLS, "tool_choice": "required"}, "tool_choice"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
            "tool_choice",
        ),
    ],
)
def test_a_constraint_is_refused_where_the_think_tags_are_not_single_tokens(roomy_model, body, param):
    for parser in ("qwen3", "deepseek_r1"):
        with pytest.raises(ApiError) as info:
            _chat(roomy_model, parser, **body)
        assert info.value.status == 400 and info.value.param == param
        assert param.split(".")[0] in info.value.message and "enable_thinking" in info.value.message
        assert "single tokens" in info.value.message
        plan = _chat(roomy_model, parser, chat_template_kwargs={"enable_thinking": False}, **body)
        assert plan.constraint is not None, "thinking off: the whole output is the answer, constrained"
        assert plan.choices[0].sampling.structured.think_end == -1


@pytest.mark.parametrize(
    "body",
    [
        {"response_format": {"type": "json_object"}},
        {"structured_outputs": {"regex": "[a-z]+"}},
        {"tools": TOOLS, "tool_choice": "required"},
    ],
)
def test_a_constraint_starts_after_the_thinking(body):
    """With <think> and </think> single tokens (as in Qwen3's and DeepSeek-R1's tokenizers) the
    worker is told where the thinking ends, and for qwen3 (the output may not think at all)
    where it would open."""
    tok = build_tokenizer(4094)
    tok.add_tokens(["<think>", "</think>"])
    m = ServedModel(
        name="tiny", path=Path("/nonexistent/tiny"), tokenizer=tok, max_model_len=2048, vocab_size=len(tok)
    )
    open_id, close_id = tok.convert_tokens_to_ids(["<think>", "</think>"])
    for parser, think_open in (("qwen3", open_id), ("deepseek_r1", -1)):
        structured = _chat(m, parser, **body).choices[0].sampling.structured
        assert (structured.think_end, structured.think_open) == (close_id, think_open), parser
        off = _chat(m, parser, chat_template_kwargs={"enable_thinking": False}, **body).choices[0].sampling
        assert (off.structured.think_end, off.structured.think_open) == (-1, -1), (
            "no thinking: from the start"
        )


@pytest.fixture(scope="module")
def client():
    served = ServedModel(
        name="tiny",
        path=Path("/nonexistent/tiny"),
        tokenizer=build_tokenizer(4096),
        max_model_len=256,
        vocab_size=4096,
    )
    settings = GatewaySettings(redis_url=f"redis://127.0.0.1:{free_port()}/0", reasoning_parser="deepseek_r1")
    with TestClient(create_app(settings, served), raise_server_exceptions=False) as c:
        yield c


def _post(client, **body):
    return client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], **body})


def test_the_gateway_refuses_and_accepts_by_its_parser(client):
    r = _post(client, response_format={"type": "json_object"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text
    r = _post(
        client, response_format={"type": "json_object"}, chat_template_kwargs={"enable_thinking": False}
    )
    assert r.status_code == 503, "accepted (no Redis behind this app)"
    assert _post(client, include_reasoning=False).status_code == 503, (
        "with a parser, include_reasoning is read"
    )
    r = _post(client, include_reasoning="no")
    assert r.status_code == 400 and r.json()["error"]["param"] == "include_reasoning", r.text
    r = client.post("/v1/completions", json={"prompt": "hi", "response_format": {"type": "json_object"}})
    assert r.status_code == 503, "/v1/completions is never parsed: its constraints stand"


@pytest.mark.parametrize("how", ["flag", "env"])
def test_an_unknown_parser_stops_the_gateway_naming_the_choices(how):
    args, env = (
        (["--reasoning-parser", "qwq"], service_env())
        if how == "flag"
        else ([], service_env(CONVEYOR_REASONING_PARSER="qwq"))
    )
    proc = subprocess.run(
        [sys.executable, "-m", "services.gateway", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "reasoning" in proc.stderr and "qwen3" in proc.stderr and "deepseek_r1" in proc.stderr, proc.stderr
