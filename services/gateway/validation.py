"""From a validated request body to what the scheduler runs: the prompt's token ids and,
per choice, one scheduler request with its SamplingParams. Here live the rules that need
the model (its name, chat template, `ContextLimits`); each refusal is a 400 (404 for an
unknown model) naming the field. max_tokens defaults as vLLM's: 16 for /v1/completions,
the rest of the context for /v1/chat/completions.
"""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass, replace
from typing import Optional, Union

import msgspec

from services.gateway.errors import ApiError, bad_request
from services.gateway.protocol import ChatCompletionRequest, CompletionRequest
from services.gateway.served_model import ContextLimits, ServedModel
from services.gateway.tool_calls import ChatConfig, ChatPlan, chat_options, render_prompt
from shared.messages import SamplingParams

COMPLETION_DEFAULT_MAX_TOKENS = 16
# Body fields passed on as they are; left out (None), SamplingParams' defaults (OpenAI's) apply.
_PASSED_ON = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")


@dataclass(frozen=True)
class ChoicePlan:
    index: int
    request_id: str  # the scheduler request: "<id>-<index>"
    sampling: SamplingParams


@dataclass(frozen=True)
class GenerationPlan:
    request_id: str  # cmpl-... / chatcmpl-...
    prompt_token_ids: list[int]
    choices: list[ChoicePlan]
    stop: list[str]
    logprobs: Optional[int]  # alternatives per token; None: no logprobs
    priority: int
    cache_salt: Optional[str]
    stream: bool
    include_usage: bool
    chat: Optional[ChatPlan] = None  # chat requests: tool calling and echo (tool_calls.py)


def completion_plan(body: CompletionRequest, model: ServedModel,
                    limits: Optional[ContextLimits] = None) -> GenerationPlan:
    limits = limits or model.limits
    _check_common(body, model, limits)
    if body.echo:
        raise bad_request("echo is not supported", "echo")
    if body.suffix:
        raise bad_request("suffix is not supported", "suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise bad_request(f"best_of is not supported (only best_of == n, here {body.n})", "best_of")
    prompt = _completion_prompt(body.prompt, model, limits)
    max_tokens = body.max_tokens if body.max_tokens is not None else COMPLETION_DEFAULT_MAX_TOKENS
    _check_length(len(prompt), max_tokens, body.max_tokens is None, "max_tokens", "prompt", limits)
    return _plan("cmpl", body, prompt, max_tokens, body.logprobs, model)


def chat_plan(body: ChatCompletionRequest, model: ServedModel, limits: Optional[ContextLimits] = None,
              config: ChatConfig = ChatConfig()) -> GenerationPlan:
    limits = limits or model.limits
    _check_common(body, model, limits)
    chat = chat_options(body, config)
    if body.response_format is not None and body.response_format.get("type") != "text":
        raise bad_request("response_format: only {'type': 'text'} is supported", "response_format")
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")
    prompt = _chat_prompt(body, model)
    field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if requested is None:
        if len(prompt) >= limits.max_model_len:
            raise bad_request(f"This model's maximum context length is {limits.max_model_len} tokens, and the "
                              f"messages take {len(prompt)} tokens, leaving none for the completion. "
                              "Please reduce the length of the messages.", "messages")
        max_tokens = limits.max_model_len - len(prompt)
    else:
        max_tokens = requested
        _check_length(len(prompt), max_tokens, False, field, "messages", limits)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    return _plan("chatcmpl", body, prompt, max_tokens, logprobs, model, chat)


# ---- shared rules -----------------------------------------------------------------------
def _check_common(body: Union[CompletionRequest, ChatCompletionRequest], model: ServedModel,
                  limits: ContextLimits) -> None:
    if body.model is not None and body.model != model.name:
        raise ApiError(404, f"The model `{body.model}` does not exist; this server serves `{model.name}`.",
                       "model", code="model_not_found")
    if body.stream_options is not None and not body.stream:
        raise bad_request("stream_options is only allowed when stream is true", "stream_options")
    if body.logit_bias:
        raise bad_request("logit_bias is not supported", "logit_bias")
    for i, s in enumerate(_stop_list(body.stop)):
        if not s:
            raise bad_request(f"stop[{i}]: stop strings must not be empty", "stop")
    for i, t in enumerate(body.stop_token_ids or []):
        _check_token(t, f"stop_token_ids[{i}]", limits)


def _check_token(token_id: int, where: str, limits: ContextLimits) -> None:
    vocab = limits.vocab_size
    if not 0 <= token_id < vocab:
        raise bad_request(f"{where}: token id {token_id} is out of range: the model's vocabulary has "
                          f"{vocab} tokens (ids 0 to {vocab - 1})", where.split("[")[0])


def _check_length(prompt_len: int, max_tokens: int, defaulted: bool, field: str, prompt_field: str,
                  limits: ContextLimits) -> None:
    limit = limits.max_model_len
    if prompt_len + max_tokens > limit:
        default = ", its default" if defaulted else ""
        raise bad_request(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} in the {prompt_field}, {max_tokens} for "
            f"{field}{default}). Please reduce the length of the {prompt_field} or {field}.",
            field if prompt_len < limit else prompt_field)


def _stop_list(stop: Union[str, list[str], None]) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def _completion_prompt(prompt: Union[str, list], model: ServedModel, limits: ContextLimits) -> list[int]:
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        if len(prompt) != 1:
            raise bad_request(f"prompt: a batch of {len(prompt)} prompts is not supported; send one prompt "
                              "per request (a list holding one prompt is fine)", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = model.encode(prompt)
        if not ids:
            raise bad_request("prompt: must not be empty", "prompt")
        return ids
    for i, t in enumerate(prompt):
        _check_token(t, f"prompt[{i}]", limits)
    return list(prompt)


def _chat_prompt(body: ChatCompletionRequest, model: ServedModel) -> list[int]:
    ids = render_prompt(body, model)
    if not ids:
        raise bad_request("messages: the chat template made an empty prompt", "messages")
    return ids


def _plan(kind: str, body: Union[CompletionRequest, ChatCompletionRequest], prompt: list[int], max_tokens: int,
          logprobs: Optional[int], model: ServedModel, chat: Optional[ChatPlan] = None) -> GenerationPlan:
    if body.min_tokens > max_tokens:
        raise bad_request(f"min_tokens ({body.min_tokens}) must not exceed max_tokens ({max_tokens})", "min_tokens")
    request_id = f"{kind}-{uuid.uuid4().hex}"
    # A sampled request without a seed gets one here: each token's draw is seeded by (seed,
    # position), so a request replayed after a scheduler restart continues with the very
    # tokens its client already has. Unseeded requests stay random from one call to the next.
    greedy = body.temperature == 0
    seed = body.seed if body.seed is not None or greedy else secrets.randbits(62)
    choices = [ChoicePlan(i, f"{request_id}-{i}", _sampling(body, max_tokens, logprobs, i, seed))
               for i in range(body.n)]
    if chat is not None and chat.structured is not None:  # tool_choice required / named
        choices = [replace(c, sampling=msgspec.structs.replace(c.sampling, structured=chat.structured))
                   for c in choices]
    return GenerationPlan(
        request_id=request_id, prompt_token_ids=prompt, choices=choices, stop=_stop_list(body.stop),
        logprobs=logprobs, priority=body.priority, cache_salt=body.cache_salt, stream=body.stream,
        include_usage=bool(body.stream_options and body.stream_options.include_usage), chat=chat,
    )


def _sampling(body: Union[CompletionRequest, ChatCompletionRequest], max_tokens: int, logprobs: Optional[int],
              index: int, seed: Optional[int]) -> SamplingParams:
    """Choice `index` of n: a seeded request draws with seed + index, so its choices differ."""
    given = {name: getattr(body, name) for name in _PASSED_ON if getattr(body, name) is not None}
    return SamplingParams(
        **given, top_k=max(body.top_k or 0, 0), seed=None if seed is None else seed + index, max_tokens=max_tokens,
        min_tokens=body.min_tokens, stop_token_ids=list(body.stop_token_ids or []), ignore_eos=body.ignore_eos,
        logprobs=logprobs)
