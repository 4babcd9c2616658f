"""Structured outputs at the gateway: every spelling becomes one StructuredOutput on every
choice, and whatever xgrammar cannot compile is a 400 naming its field, answered before
anything is enqueued (the in-process app has no Redis behind it)."""

from __future__ import annotations

import json

import pytest
import xgrammar as xgr
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from xgrammar.testing import _is_grammar_accept_string as accepts

from services.gateway.app import create_app
from services.gateway.errors import ApiError
from services.gateway.output_constraints import Constraint, GrammarChecker, json_schema_constraint
from services.gateway.protocol import ChatCompletionRequest, CompletionRequest
from services.gateway.validation import chat_plan, completion_plan
from shared.config import GatewaySettings
from shared.messages import StructuredOutput
from shared.ports import free_port
from shared.structured_grammar import choice_grammar

_KEYS = [
    "type",
    "properties",
    "items",
    "enum",
    "required",
    "json",
    "regex",
    "choice",
    "grammar",
    "json_object",
    "$schema",
    "$ref",
    "anyOf",
    "minimum",
    "pattern",
    "additionalProperties",
    "const",
    "maxItems",
]
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def _completion(served, **body):
    return completion_plan(CompletionRequest.model_validate({"prompt": "hello", **body}), served)


def _chat(served, **body):
    return chat_plan(
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **body}),
        served,
    )


def _structured(plan) -> StructuredOutput:
    outputs = {c.sampling.structured for c in plan.choices}
    assert len(outputs) == 1, "every choice carries the same constraint"
    return outputs.pop()


@pytest.mark.parametrize(
    "body, kind, spec",
    [
        ({"response_format": {"type": "json_object"}}, "json_object", ""),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "p", "schema": SCHEMA, "strict": True},
                }
            },
            "json_schema",
            SCHEMA,
        ),
        ({"structured_outputs": {"json": SCHEMA}}, "json_schema", SCHEMA),
        ({"structured_outputs": {"json": json.dumps(SCHEMA)}}, "json_schema", SCHEMA),
        ({"structured_outputs": {"regex": "[a-z]{3}"}}, "regex", "[a-z]{3}"),
        ({"structured_outputs": {"choice": ["yes", "no"]}}, "choice", ["yes", "no"]),
        ({"structured_outputs": {"grammar": 'root ::= "a" | "b"'}}, "grammar", 'root ::= "a" | "b"'),
        ({"structured_outputs": {"json_object": True}}, "json_object", ""),
        ({"guided_json": SCHEMA}, "json_schema", SCHEMA),
        ({"guided_regex": "\\d+"}, "regex", "\\d+"),
        ({"guided_choice": ["red", "blue"]}, "choice", ["red", "blue"]),
        (
            {"guided_grammar": 'root ::= "x"+', "guided_decoding_backend": "xgrammar"},
            "grammar",
            'root ::= "x"+',
        ),
    ],
)
def test_every_spelling_becomes_one_structured_output_on_both_routes(served_model, body, kind, spec):
    for plan in (_completion(served_model, n=2, **body), _chat(served_model, n=2, **body)):
        so = _structured(plan)
        assert so.kind == kind
        if kind in ("json_schema", "choice"):
            assert json.loads(so.spec) == spec
        else:
            assert so.spec == spec
        assert plan.constraint.output == so


def test_text_format_and_no_constraint_leave_the_output_free(served_model):
    assert _structured(_completion(served_model)) is None
    assert _structured(_chat(served_model, response_format={"type": "text"})) is None


def test_disable_additional_properties_closes_every_object(served_model):
    schema = {
        "type": "object",
        "properties": {"inner": {"type": "object", "properties": {"x": {"type": "integer"}}}},
    }
    so = _structured(
        _completion(served_model, structured_outputs={"json": schema, "disable_additional_properties": True})
    )
    got = json.loads(so.spec)
    assert (
        got["additionalProperties"] is False and got["properties"]["inner"]["additionalProperties"] is False
    )


def _refused(served, **body) -> ApiError:
    with pytest.raises(ApiError) as info:
        _completion(served, **body)
    assert info.value.status == 400
    return info.value


@pytest.mark.parametrize(
    "body, param, words",
    [
        (
            {"response_format": {"type": "json_object"}, "guided_regex": "a"},
            "guided_regex",
            ["one output constraint", "response_format", "guided_regex"],
        ),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", ["exactly one"]),
        ({"response_format": {"type": "xml"}}, "response_format.type", ["json_schema"]),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema",
            ["schema"],
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
            "response_format.json_schema.schema",
            ["not a valid JSON schema"],
        ),
        ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json", ["not valid JSON"]),
        (
            {"structured_outputs": {"json": {"type": "integer", "multipleOf": 3}}},
            "structured_outputs.json",
            ["multipleOf"],
        ),
        ({"structured_outputs": {"json": {"$ref": "#/nope"}}}, "structured_outputs.json", ["nope"]),
        ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs.regex", ["parenthesis"]),
        ({"guided_regex": "a\x00"}, "guided_regex", ["NUL"]),
        ({"structured_outputs": {"grammar": "root ::= foo"}}, "structured_outputs.grammar", ["foo"]),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice", ["non-empty list"]),
        ({"guided_choice": []}, "guided_choice", ["non-empty list"]),
        (
            {"structured_outputs": {"regex": "a", "whitespace_pattern": " *"}},
            "structured_outputs.whitespace_pattern",
            ["not supported"],
        ),
        (
            {"structured_outputs": {"structural_tag": "{}"}},
            "structured_outputs.structural_tag",
            ["not supported"],
        ),
        ({"structured_outputs": {"regexp": "a"}}, "structured_outputs", ["unknown keys", "regexp"]),
        (
            {"guided_json": SCHEMA, "guided_whitespace_pattern": " "},
            "guided_whitespace_pattern",
            ["not supported"],
        ),
        (
            {"guided_regex": "a", "guided_decoding_backend": "outlines"},
            "guided_decoding_backend",
            ["xgrammar"],
        ),
    ],
)
def test_invalid_constraints_are_400s_naming_the_field(served_model, body, param, words):
    err = _refused(served_model, **body)
    assert err.param == param, err.message
    for w in words:
        assert w in err.message, err.message
    assert "/project/cpp" not in err.message, "xgrammar's source location is not for the client"


def test_choice_grammar_accepts_exactly_the_choices():
    choices = ['say "hi"', "a\\b", "line\nbreak", "é"]
    grammar = xgr.Grammar.from_ebnf(choice_grammar(choices))
    for text in choices:
        assert accepts(grammar, text), text
    for text in ("a", "say", 'say "hi" ', "e"):
        assert not accepts(grammar, text), text


def test_grammar_checker_compiles_against_the_served_tokenizer(tokenizer):
    checker = GrammarChecker(tokenizer, 4096)
    for so in (
        StructuredOutput("json_schema", json.dumps(SCHEMA)),
        StructuredOutput("json_object"),
        StructuredOutput("regex", "[0-9]+"),
        StructuredOutput("grammar", 'root ::= "a"'),
        StructuredOutput("choice", '["x", "y"]'),
    ):
        checker.compile(Constraint("f", so))
    assert json_schema_constraint(SCHEMA, "tools[0]").output.kind == "json_schema"
    with pytest.raises(ApiError) as info:
        json_schema_constraint({"type": "object", "required": 3}, "tools[0].function.parameters")
    assert info.value.param == "tools[0].function.parameters"


@pytest.fixture
def client(served_model):
    settings = GatewaySettings(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    with TestClient(create_app(settings, served_model), raise_server_exceptions=False) as c:
        yield c


def test_http_refuses_an_invalid_schema_before_the_queue(client):
    """A 400 for the schema, not the 503 every valid request gets without Redis."""
    bad = {
        "prompt": "x",
        "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": []}},
    }
    r = client.post("/v1/completions", json=bad)
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format.json_schema.schema"
    good = {"messages": [{"role": "user", "content": "x"}], "structured_outputs": {"choice": ["a", "b"]}}
    assert client.post("/v1/chat/completions", json=good).status_code == 503


_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.text(max_size=6)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(_KEYS), inner, max_size=3)
    ),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    field=st.sampled_from(["response_format", "structured_outputs", "guided_json", "guided_choice"]),
    value=_json,
)
def test_any_constraint_value_is_a_plan_or_a_400(served_model, field, value):
    """Whatever a client sends there, it is refused with a 400 naming the field, or compiles."""
    if field == "response_format" and isinstance(value, dict) and value:
        value = {"type": "json_schema", "json_schema": {"name": "x", "schema": value}}
    try:
        body = CompletionRequest.model_validate({"prompt": "hello", field: value})
    except ValueError:
        return  # a wrong type: pydantic's 400, named by its path
    try:
        plan = completion_plan(body, served_model)
    except ApiError as e:
        assert e.status == 400 and e.param and e.param.split(".")[0] == field, e.message
        return
    if plan.constraint is not None:
        GrammarChecker(served_model.tokenizer, 4096).compile(plan.constraint)
