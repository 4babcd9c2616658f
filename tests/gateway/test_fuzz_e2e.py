"""Property-based fuzzing of the HTTP API (hypothesis, over 1,000 requests): no input
produces a 5xx, and every 4xx names what is wrong.

Each request is a valid one with ONE field changed to an arbitrary JSON value (or
removed), so a refusal must name that field in its `param` or `message`; some bodies are
arbitrary JSON or not JSON at all. The gateway runs with --max-model-len 64, so valid
requests stay short and length limits are hit often; valid ones really run.
"""

from __future__ import annotations

import json
from collections import Counter

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.gateway.conftest import start_gateway

pytestmark = pytest.mark.slow

EXAMPLES_PER_TEST = 500  # x 3 tests
STATUSES: Counter[int] = Counter()  # over the module, to check the fuzz reached generation

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.integers(-3, 130),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-3, 3),
    st.text(max_size=12),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)

SAMPLING_FIELDS = [
    "model",
    "n",
    "max_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "stream",
    "stream_options",
    "user",
    "logit_bias",
    "top_k",
    "min_p",
    "repetition_penalty",
    "stop_token_ids",
    "ignore_eos",
    "min_tokens",
    "priority",
    "cache_salt",
    # vLLM's fields of issue 12
    "allowed_token_ids",
    "bad_words",
    "include_stop_str_in_output",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "truncate_prompt_tokens",
    "truncation_side",
    "prompt_logprobs",
    "return_tokens_as_token_ids",
    "return_token_ids",
    "structured_outputs",
    "guided_regex",
    "guided_choice",
    "guided_json",
    "request_id",
    "use_beam_search",
    "length_penalty",
]
COMPLETION_FIELDS = SAMPLING_FIELDS + [
    "prompt",
    "logprobs",
    "echo",
    "suffix",
    "best_of",
    "add_special_tokens",
    "response_format",
]
CHAT_FIELDS = SAMPLING_FIELDS + [
    "messages",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
    "tools",
    "tool_choice",
    "response_format",
    "add_generation_prompt",
    "parallel_tool_calls",
    "function_call",
    "continue_final_message",
    "echo",
    "add_special_tokens",
    "chat_template",
    "chat_template_kwargs",
]

# Values that are often valid, so that the requests which pass validation vary too.
plausible = {
    "prompt": st.one_of(
        st.text(max_size=80),
        st.lists(st.integers(-2, 5000), max_size=70),
        st.lists(st.text(max_size=10), max_size=3),
    ),
    "messages": st.lists(
        st.fixed_dictionaries(
            {
                "role": st.sampled_from(["user", "assistant", "system", "tool", "bot"]),
                "content": st.one_of(
                    st.text(max_size=40),
                    st.none(),
                    st.lists(
                        st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=8)}),
                        max_size=2,
                    ),
                ),
            }
        ),
        max_size=3,
    ),
    "stop": st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=3)),
    "stop_token_ids": st.lists(st.integers(-1, 4100), max_size=3),
    "stream_options": st.fixed_dictionaries(
        {"include_usage": st.booleans(), "continuous_usage_stats": st.booleans()}
    ),
    "allowed_token_ids": st.lists(st.integers(-1, 4100), max_size=3),
    "bad_words": st.lists(st.text(max_size=6), max_size=3),
    "structured_outputs": st.one_of(
        st.fixed_dictionaries({"regex": st.text(max_size=8)}),
        st.fixed_dictionaries({"choice": st.lists(st.text(max_size=5), max_size=3)}),
        st.fixed_dictionaries({"json": json_values}),
    ),
    "guided_regex": st.text(max_size=10),
    "response_format": st.one_of(
        st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "x"])}),
        st.fixed_dictionaries(
            {
                "type": st.just("json_schema"),
                "json_schema": st.fixed_dictionaries({"name": st.just("n"), "schema": json_values}),
            }
        ),
    ),
}


def _valid(kind: str, model: str) -> dict:
    if kind == "completion":
        return {"model": model, "prompt": "fuzz me", "max_tokens": 2, "temperature": 0}
    return {"model": model, "messages": [{"role": "user", "content": "fuzz"}], "max_tokens": 2}


def _mutations(fields):
    field = st.sampled_from(fields)
    return field.flatmap(
        lambda f: st.tuples(
            st.just(f), st.one_of(st.just("<removed>"), json_values, plausible.get(f, json_values))
        )
    )


@pytest.fixture(scope="module")
def fuzz_gateway(stack):
    gw = start_gateway(stack, "gateway-fuzz", "--max-model-len", "64")
    with httpx.Client(base_url=gw.url, timeout=60) as client:
        yield gw, client


def _check(response: httpx.Response, field: str | None) -> None:
    STATUSES[response.status_code] += 1
    assert response.status_code < 500, response.text
    if response.status_code == 200:
        if response.headers["content-type"].startswith("text/event-stream"):
            assert response.text.endswith("data: [DONE]\n\n") or '"error"' in response.text, response.text
        else:
            assert response.json()["choices"], response.text
        return
    err = response.json()["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] and "code" in err and "param" in err
    if field is not None:
        said = f"{err['param'] or ''} {err['message']}"
        assert field in said, f"{field} not named in {err}"


def _post(client, path, body):
    return client.post(
        path, content=json.dumps(body, allow_nan=True), headers={"Content-Type": "application/json"}
    )


@settings(
    max_examples=EXAMPLES_PER_TEST,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(mutation=_mutations(COMPLETION_FIELDS))
def test_fuzz_completions(fuzz_gateway, gateway_model_dir, mutation):
    _, client = fuzz_gateway
    field, value = mutation
    body = _valid("completion", gateway_model_dir.name)
    if value == "<removed>":
        body.pop(field, None)
    else:
        body[field] = value
    _check(_post(client, "/v1/completions", body), field)


@settings(
    max_examples=EXAMPLES_PER_TEST,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(mutation=_mutations(CHAT_FIELDS))
def test_fuzz_chat(fuzz_gateway, gateway_model_dir, mutation):
    _, client = fuzz_gateway
    field, value = mutation
    body = _valid("chat", gateway_model_dir.name)
    if value == "<removed>":
        body.pop(field, None)
    else:
        body[field] = value
    _check(_post(client, "/v1/chat/completions", body), field)


@settings(
    max_examples=EXAMPLES_PER_TEST,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
    body=st.one_of(json_values.map(lambda v: json.dumps(v).encode()), st.binary(max_size=40)),
)
def test_fuzz_arbitrary_bodies(fuzz_gateway, path, body):
    _, client = fuzz_gateway
    _check(client.post(path, content=body, headers={"Content-Type": "application/json"}), None)


def test_the_fuzz_ran_valid_and_invalid_requests():
    """Runs after the fuzz tests above (file order): both kinds were common."""
    assert STATUSES[200] >= 100 and STATUSES[400] >= 300, STATUSES
