"""Every request field of vLLM 0.32 either does what vLLM does (named here with the test
that shows it) or is refused with a 400 naming it: none is silently ignored. The lists are
vLLM's own (its CompletionRequest / ChatCompletionRequest); a field added to Conveyor's
protocol must be in them or in OURS, and each list entry must be declared, so that it never
falls through to the unknown fields that are merely logged."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from services.gateway.app import create_app
from services.gateway.protocol import ChatCompletionRequest, CompletionRequest
from shared.config import GatewaySettings
from shared.ports import free_port

REPO = Path(__file__).resolve().parents[2]

VLLM_COMPLETION = [
    "model",
    "prompt",
    "echo",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "max_tokens",
    "n",
    "presence_penalty",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "suffix",
    "temperature",
    "top_p",
    "user",
    "use_beam_search",
    "top_k",
    "min_p",
    "repetition_penalty",
    "watermarking",
    "length_penalty",
    "stop_token_ids",
    "include_stop_str_in_output",
    "ignore_eos",
    "min_tokens",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "truncate_prompt_tokens",
    "truncation_side",
    "allowed_token_ids",
    "prompt_logprobs",
    "logprob_token_ids",
    "bad_words",
    "prompt_embeds",
    "add_special_tokens",
    "response_format",
    "structured_outputs",
    "priority",
    "request_id",
    "session_id",
    "return_tokens_as_token_ids",
    "return_token_ids",
    "routed_experts_prompt_start",
    "return_token_offsets",
    "mm_payload",
    "return_mm_kwargs",
    "cache_salt",
    "kv_transfer_params",
    "ec_transfer_params",
    "vllm_xargs",
    "repetition_detection",
    "thinking_token_budget",
    "stream_interval",
]

VLLM_CHAT = [
    "messages",
    "model",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "max_tokens",
    "max_completion_tokens",
    "n",
    "presence_penalty",
    "response_format",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "temperature",
    "top_p",
    "tools",
    "tool_choice",
    "reasoning_effort",
    "thinking_token_budget",
    "include_reasoning",
    "parallel_tool_calls",
    "user",
    "use_beam_search",
    "top_k",
    "min_p",
    "repetition_penalty",
    "watermarking",
    "length_penalty",
    "stop_token_ids",
    "include_stop_str_in_output",
    "ignore_eos",
    "min_tokens",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "truncate_prompt_tokens",
    "truncation_side",
    "prompt_logprobs",
    "logprob_token_ids",
    "allowed_token_ids",
    "bad_words",
    "echo",
    "add_generation_prompt",
    "continue_final_message",
    "add_special_tokens",
    "documents",
    "chat_template",
    "chat_template_kwargs",
    "media_io_kwargs",
    "mm_processor_kwargs",
    "structured_outputs",
    "priority",
    "request_id",
    "session_id",
    "return_tokens_as_token_ids",
    "return_token_ids",
    "routed_experts_prompt_start",
    "return_token_offsets",
    "return_prompt_text",
    "mm_payload",
    "return_mm_kwargs",
    "cache_salt",
    "kv_transfer_params",
    "ec_transfer_params",
    "vllm_xargs",
    "repetition_detection",
    "stream_interval",
]

# Conveyor's own (or older vLLM spellings), not in vLLM 0.32's lists.
OURS = {
    "best_of",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "guided_whitespace_pattern",
    "guided_decoding_backend",
    "functions",
    "function_call",
}

_V, _F, _S = (
    "tests/gateway/test_validation.py",
    "tests/gateway/test_completion_fields.py",
    "tests/gateway/test_structured_requests.py",
)
_E, _T, _R = (
    "tests/gateway/test_api_e2e.py",
    "tests/gateway/test_eval_e2e.py",
    "tests/gateway/test_tool_rendering.py",
)
_MAPS = f"{_V}::test_completion_plan_maps_every_parameter"

IMPLEMENTED_BOTH = {
    "model": f"{_V}::test_body_limit_key_and_unknown_model",
    "frequency_penalty": _MAPS,
    "presence_penalty": _MAPS,
    "temperature": _MAPS,
    "top_p": _MAPS,
    "top_k": _MAPS,
    "min_p": _MAPS,
    "repetition_penalty": _MAPS,
    "stop_token_ids": _MAPS,
    "ignore_eos": _MAPS,
    "min_tokens": _MAPS,
    "priority": _MAPS,
    "cache_salt": _MAPS,
    "max_tokens": _MAPS,
    "seed": f"{_E}::test_seed_reproducibility",
    "n": f"{_E}::test_n_choices",
    "stop": f"{_E}::test_stop_string_is_trimmed_and_the_request_aborted",
    "stream": f"{_E}::test_completion_streaming_equals_non_streaming_with_usage",
    "stream_options": f"{_F}::test_tokens_as_ids_token_ids_and_continuous_usage_in_a_stream",
    "user": f"{_V}::test_completion_plan_maps_every_parameter",  # accepted, used for nothing (as vLLM)
    "logit_bias": f"{_F}::test_token_level_fields_become_sampling_params",
    "allowed_token_ids": f"{_F}::test_token_level_fields_become_sampling_params",
    "bad_words": f"{_F}::test_bad_words_are_tokenized_as_vllm_does",
    "include_stop_str_in_output": (
        f"{_F}::test_include_stop_str_in_output_keeps_the_stop_string_and_stop_token"
    ),
    "skip_special_tokens": f"{_F}::test_skip_special_tokens_false_shows_them",
    "spaces_between_special_tokens": f"{_F}::test_skip_special_tokens_false_shows_them",
    "truncate_prompt_tokens": f"{_F}::test_truncate_prompt_tokens_keeps_the_end_unless_right",
    "truncation_side": f"{_F}::test_truncate_prompt_tokens_keeps_the_end_unless_right",
    "prompt_logprobs": f"{_F}::test_prompt_logprobs_in_vllms_shape_with_ranks",
    "response_format": f"{_S}::test_every_spelling_becomes_one_structured_output_on_both_routes",
    "structured_outputs": f"{_S}::test_every_spelling_becomes_one_structured_output_on_both_routes",
    "request_id": f"{_F}::test_add_special_tokens_and_request_id",
    "return_tokens_as_token_ids": f"{_F}::test_tokens_as_ids_token_ids_and_continuous_usage_in_a_stream",
    "return_token_ids": f"{_F}::test_tokens_as_ids_token_ids_and_continuous_usage_in_a_stream",
}
IMPLEMENTED_COMPLETION = {
    **IMPLEMENTED_BOTH,
    "prompt": f"{_F}::test_a_batch_gives_one_choice_per_prompt_and_n_in_openais_order",
    "echo": f"{_F}::test_echo_with_logprobs_puts_the_prompt_first",
    "logprobs": f"{_T}::test_lm_eval_loglikelihood_requests_match_transformers",
    "add_special_tokens": f"{_F}::test_add_special_tokens_and_request_id",
}
# The chat-only fields of the tool-calling work (its tests, in its own modules).
TOOL_FIELDS = {
    "tools": f"{_R}::test_tools_past_calls_and_tool_results_reach_the_prompt",
    "tool_choice": f"{_R}::test_named_tool_choice_constrains_the_output_to_the_arguments",
    "parallel_tool_calls": f"{_R}::test_required_tool_choice_constrains_the_output_to_an_array_of_calls",
    "chat_template": f"{_R}::test_template_fields_reach_the_template",
    "chat_template_kwargs": f"{_R}::test_template_fields_reach_the_template",
    "continue_final_message": f"{_R}::test_template_fields_reach_the_template",
    "add_special_tokens": f"{_R}::test_template_fields_reach_the_template",
    "echo": f"{_R}::test_chat_echo_is_the_last_assistant_message",
}
IMPLEMENTED_CHAT = {
    **IMPLEMENTED_BOTH,
    **TOOL_FIELDS,
    "messages": f"{_E}::test_chat_streaming_equals_non_streaming",
    "logprobs": f"{_E}::test_logprobs",
    "top_logprobs": f"{_E}::test_logprobs",
    "max_completion_tokens": f"{_V}::test_chat_uses_the_template_and_its_logprob_fields",
    "add_generation_prompt": (
        "tests/gateway/test_tokenize_routes.py::test_tokenize_messages_as_the_chat_route_renders_them"
    ),
}

# Refused: a value other than the default -> 400 naming the field.
REFUSED_BOTH = {
    "use_beam_search": True,
    "length_penalty": 0.5,
    "watermarking": True,
    "logprob_token_ids": [1],
    "session_id": "s",
    "routed_experts_prompt_start": 2,
    "return_token_offsets": True,
    "mm_payload": "none",
    "return_mm_kwargs": True,
    "kv_transfer_params": {"a": 1},
    "ec_transfer_params": {"a": 1},
    "vllm_xargs": {"a": 1},
    "repetition_detection": {"window": 4},
    "thinking_token_budget": 10,
    "stream_interval": 4,
}
REFUSED_COMPLETION = {**REFUSED_BOTH, "suffix": "tail", "prompt_embeds": "AAAA"}
REFUSED_CHAT = {
    **REFUSED_BOTH,
    "reasoning_effort": "low",
    "include_reasoning": False,
    "documents": [{"title": "t", "text": "x"}],
    "media_io_kwargs": {"image": {}},
    "mm_processor_kwargs": {"a": 1},
    "return_prompt_text": True,
}

ROUTES = {
    "completion": (
        CompletionRequest,
        VLLM_COMPLETION,
        IMPLEMENTED_COMPLETION,
        REFUSED_COMPLETION,
        "/v1/completions",
        {"prompt": "hello"},
    ),
    "chat": (
        ChatCompletionRequest,
        VLLM_CHAT,
        IMPLEMENTED_CHAT,
        REFUSED_CHAT,
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}]},
    ),
}


@pytest.mark.parametrize("route", ROUTES)
def test_every_vllm_field_is_implemented_or_refused(route):
    _, vllm, implemented, refused, _, _ = ROUTES[route]
    assert set(implemented) & set(refused) == set(), "a field is one or the other"
    missing = set(vllm) - set(implemented) - set(refused)
    assert not missing, f"vLLM fields neither implemented nor refused on {route}: {sorted(missing)}"
    extra = (set(implemented) | set(refused)) - set(vllm)
    assert not extra, f"not vLLM fields: {sorted(extra)}"


@pytest.mark.parametrize("route", ROUTES)
def test_the_protocol_declares_no_field_outside_vllms_and_ours(route):
    model, vllm, *_ = ROUTES[route]
    unknown = set(model.model_fields) - set(vllm) - OURS
    assert not unknown, (
        f"{route} accepts fields that are neither vLLM's nor listed in OURS: {sorted(unknown)}"
    )


def _implemented(route_filter=None):
    return [
        (route, field, test)
        for route, (_, _, implemented, _, _, _) in ROUTES.items()
        for field, test in implemented.items()
        if route_filter is None or route_filter(route, field)
    ]


@pytest.mark.parametrize("route, field, test", _implemented(), ids=[f"{r}-{f}" for r, f, _ in _implemented()])
def test_an_implemented_field_is_declared_and_its_test_exists(route, field, test):
    """Declared, it is parsed and used; undeclared, it would only be logged as unknown."""
    model = ROUTES[route][0]
    assert field in model.model_fields, f"{field} is listed as implemented but {model.__name__} ignores it"
    path, name = test.split("::")
    tree = ast.parse((REPO / path).read_text())
    names = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    assert name in names, f"{test} (named for {field}) does not exist"


@pytest.fixture(scope="module")
def client():
    from conveyor.tiny_model import build_tokenizer
    from services.gateway.served_model import ServedModel

    served = ServedModel(
        name="tiny",
        path=Path("/nonexistent/tiny"),
        tokenizer=build_tokenizer(4096),
        max_model_len=64,
        vocab_size=4096,
    )
    settings = GatewaySettings(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    with TestClient(create_app(settings, served), raise_server_exceptions=False) as c:
        yield c


@pytest.mark.parametrize("route, field", [(r, f) for r, spec in ROUTES.items() for f in spec[3]])
def test_a_refused_field_is_a_400_naming_it(client, route, field):
    _, _, _, refused, path, base = ROUTES[route]
    r = client.post(path, json={**base, field: refused[field]})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and field in err["message"], err
