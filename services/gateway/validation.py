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

import msgspec

from services.gateway import fields
from services.gateway.errors import ApiError, bad_request
from services.gateway.output_constraints import Constraint, request_constraint
from services.gateway.protocol import ChatCompletionRequest, CompletionRequest
from services.gateway.reasoning import after_thinking, reasoning_plan, tags_are_special
from services.gateway.served_model import ContextLimits, ServedModel
from services.gateway.tool_calls import ChatConfig, ChatPlan, chat_options, render_prompt
from shared.messages import SamplingParams

COMPLETION_DEFAULT_MAX_TOKENS = 16
# Body fields passed on as they are; left out (None), SamplingParams' defaults (OpenAI's) apply.
_PASSED_ON = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")


@dataclass(frozen=True)
class ChoicePlan:
    index: int  # OpenAI's order: prompt_index * n + j
    request_id: str  # the scheduler request: "<id>-<index>"
    sampling: SamplingParams
    prompt_token_ids: list[int]
    prompt_index: int = 0


@dataclass(frozen=True)
class OutputOptions:
    """How a choice's tokens become the response (vLLM's output fields); defaults: OpenAI's."""

    echo: bool = False  # completions: the prompt's text (and logprobs) before the output
    echo_only: bool = False  # echo with max_tokens 0: the one token generated is dropped
    prompt_texts: tuple[str, ...] = ()  # per prompt, what echo shows
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    return_tokens_as_token_ids: bool = False  # logprobs name tokens "token_id:<id>"
    return_token_ids: bool = False  # prompt_token_ids / token_ids in the response
    continuous_usage: bool = False  # usage on every streamed chunk


@dataclass(frozen=True)
class GenerationPlan:
    request_id: str  # cmpl-... / chatcmpl-...
    prompts: list[list[int]]  # a batch on /v1/completions; chat has one
    choices: list[ChoicePlan]
    stop: list[str]
    logprobs: int | None  # alternatives per token; None: no logprobs
    priority: int
    cache_salt: str | None
    stream: bool
    include_usage: bool
    chat: ChatPlan | None = None  # chat requests: tool calling and echo (tool_calls.py)
    output: OutputOptions = OutputOptions()
    constraint: Constraint | None = None  # also on every choice's sampling; kept for its field name

    @property
    def prompt_token_ids(self) -> list[int]:
        """The only prompt of a single-prompt request (chat's)."""
        assert len(self.prompts) == 1, "a batch has one prompt per choice: read ChoicePlan.prompt_token_ids"
        return self.prompts[0]


def completion_plan(
    body: CompletionRequest, model: ServedModel, limits: ContextLimits | None = None
) -> GenerationPlan:
    limits = limits or model.limits
    _check_common(body, model, limits)
    if body.suffix:
        raise bad_request("suffix is not supported", "suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise bad_request(f"best_of is not supported (only best_of == n, here {body.n})", "best_of")
    if body.max_tokens == 0 and not body.echo:
        raise bad_request("max_tokens: must be at least 1 (0 only with echo: the prompt alone)", "max_tokens")
    texts, prompts = _completion_prompts(body, model, limits)
    echo_only = body.echo and body.max_tokens == 0
    # vLLM's echo without generation: one token is generated and dropped.
    max_tokens = (
        1 if echo_only else body.max_tokens if body.max_tokens is not None else COMPLETION_DEFAULT_MAX_TOKENS
    )
    for i, prompt in enumerate(prompts):
        where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        _check_length(len(prompt), max_tokens, body.max_tokens is None, "max_tokens", where, limits)
    prompt_logprobs = body.prompt_logprobs
    if prompt_logprobs is None and body.echo:
        prompt_logprobs = body.logprobs  # vLLM: echoed logprobs need the prompt's, as many alternatives
    output = replace(
        _output_options(body),
        echo=body.echo,
        echo_only=echo_only,
        prompt_texts=tuple(texts) if body.echo else (),
    )
    return _plan("cmpl", body, prompts, max_tokens, body.logprobs, model, limits, output, prompt_logprobs)


def chat_plan(
    body: ChatCompletionRequest,
    model: ServedModel,
    limits: ContextLimits | None = None,
    config: ChatConfig = ChatConfig(),
) -> GenerationPlan:
    limits = limits or model.limits
    # include_reasoning (false: no reasoning in the answer) means something only with a parser.
    _check_common(body, model, limits, accepted=("include_reasoning",) if config.reasoning_parser else ())
    chat = chat_options(body, config)
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")
    prompt = fields.truncate(
        chat_prompt(body, model), body.truncate_prompt_tokens, body.truncation_side, limits
    )
    field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if requested is None:
        if len(prompt) >= limits.max_model_len:
            raise bad_request(
                f"This model's maximum context length is {limits.max_model_len} tokens, and the "
                f"messages take {len(prompt)} tokens, leaving none for the completion. "
                "Please reduce the length of the messages.",
                "messages",
            )
        max_tokens = limits.max_model_len - len(prompt)
    else:
        max_tokens = requested
        _check_length(len(prompt), max_tokens, False, field, "messages", limits)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    output = _output_options(body)
    if chat.reads_tool_calls and config.tool_call_parser == "hermes":
        # As vLLM's hermes parser: some models mark <tool_call> special, and skipping special
        # tokens would hide the calls from the parser.
        output = replace(output, skip_special_tokens=False)
    if config.reasoning_parser:
        chat = replace(chat, reasoning=reasoning_plan(config.reasoning_parser, body, prompt, model))
        if tags_are_special(model.tokenizer):  # skipped, the tags would vanish from the text split
            output = replace(output, skip_special_tokens=False)
    return _plan(
        "chatcmpl", body, [prompt], max_tokens, logprobs, model, limits, output, body.prompt_logprobs, chat
    )


# ---- shared rules -----------------------------------------------------------------------
def check_model_name(name: str | None, model: ServedModel) -> None:
    """A 404 unless `name` is the served model's (or not given)."""
    if name is not None and name != model.name:
        raise ApiError(
            404,
            f"The model `{name}` does not exist; this server serves `{model.name}`.",
            "model",
            code="model_not_found",
        )


def _check_common(
    body: CompletionRequest | ChatCompletionRequest,
    model: ServedModel,
    limits: ContextLimits,
    accepted: tuple[str, ...] = (),
) -> None:
    check_model_name(body.model, model)
    if body.stream_options is not None and not body.stream:
        raise bad_request("stream_options is only allowed when stream is true", "stream_options")
    fields.check_extra_fields(body, accepted)
    if body.truncation_side is not None and body.truncate_prompt_tokens is None:
        raise bad_request("truncation_side needs truncate_prompt_tokens", "truncation_side")
    for i, s in enumerate(_stop_list(body.stop)):
        if not s:
            raise bad_request(f"stop[{i}]: stop strings must not be empty", "stop")
    for i, t in enumerate(body.stop_token_ids or []):
        fields.check_token(t, f"stop_token_ids[{i}]", limits)


def _check_length(
    prompt_len: int, max_tokens: int, defaulted: bool, field: str, prompt_field: str, limits: ContextLimits
) -> None:
    limit = limits.max_model_len
    if prompt_len + max_tokens > limit:
        default = ", its default" if defaulted else ""
        raise bad_request(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} in the {prompt_field}, {max_tokens} for "
            f"{field}{default}). Please reduce the length of the {prompt_field} or {field}.",
            field if prompt_len < limit else prompt_field,
        )


def _stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def _completion_prompts(
    body: CompletionRequest, model: ServedModel, limits: ContextLimits
) -> tuple[list[str], list[list[int]]]:
    """Each prompt of the batch as (text, ids): a string is tokenized, token ids are checked
    and decoded (what echo shows); then vLLM's truncate_prompt_tokens applies."""
    batch = (
        body.prompt
        if isinstance(body.prompt, list) and not isinstance(body.prompt[0], int)
        else [body.prompt]
    )
    texts, prompts = [], []
    for i, prompt in enumerate(batch):
        where = "prompt" if len(batch) == 1 else f"prompt[{i}]"
        if isinstance(prompt, str):
            ids = model.encode(prompt, body.add_special_tokens)
            if not ids:
                raise bad_request(f"{where}: must not be empty", "prompt")
        else:
            for k, t in enumerate(prompt):
                fields.check_token(t, f"{where}[{k}]", limits)
            ids = list(prompt)
        kept = fields.truncate(ids, body.truncate_prompt_tokens, body.truncation_side, limits)
        whole_text = isinstance(prompt, str) and len(kept) == len(ids)
        texts.append(prompt if whole_text else model.decode(kept, body.skip_special_tokens))
        prompts.append(kept)
    return texts, prompts


def chat_prompt(body: ChatCompletionRequest, model: ServedModel) -> list[int]:
    """The chat request's messages rendered by the model's template, as /v1/chat/completions
    and /tokenize both see them; an empty rendering is the client's 400."""
    ids = render_prompt(body, model)
    if not ids:
        raise bad_request("messages: the chat template made an empty prompt", "messages")
    return ids


def _output_options(body: CompletionRequest | ChatCompletionRequest) -> OutputOptions:
    so = body.stream_options
    return OutputOptions(
        include_stop_str_in_output=body.include_stop_str_in_output,
        skip_special_tokens=body.skip_special_tokens,
        spaces_between_special_tokens=body.spaces_between_special_tokens,
        return_tokens_as_token_ids=bool(body.return_tokens_as_token_ids),
        return_token_ids=bool(body.return_token_ids),
        continuous_usage=bool(so and so.include_usage and so.continuous_usage_stats),
    )


def _plan(
    kind: str,
    body: CompletionRequest | ChatCompletionRequest,
    prompts: list[list[int]],
    max_tokens: int,
    logprobs: int | None,
    model: ServedModel,
    limits: ContextLimits,
    output: OutputOptions,
    prompt_logprobs: int | None,
    chat: ChatPlan | None = None,
) -> GenerationPlan:
    if body.min_tokens > max_tokens:
        raise bad_request(
            f"min_tokens ({body.min_tokens}) must not exceed max_tokens ({max_tokens})", "min_tokens"
        )
    constraint = request_constraint(body)
    if chat is not None and chat.structured is not None:  # tool_choice required / named (no other constraint)
        constraint = Constraint("tools", chat.structured)
    if constraint is not None and chat is not None and chat.reasoning is not None:
        field = "tool_choice" if chat.structured is not None else constraint.field
        constraint = replace(
            constraint, output=after_thinking(chat.reasoning, constraint.output, model.tokenizer, field)
        )
    uid = uuid.uuid4().hex
    # A sampled request without a seed gets one here: each token's draw is seeded by (seed,
    # position), so a request replayed after a scheduler restart continues with the very
    # tokens its client already has. A client that sends no seed still gets a fresh draw per call.
    greedy = body.temperature == 0
    seed = body.seed if body.seed is not None or greedy else secrets.randbits(62)
    base = _sampling(body, max_tokens, logprobs, limits, model, constraint, prompt_logprobs)
    choices = [
        ChoicePlan(
            p * body.n + j,
            f"{kind}-{uid}-{p * body.n + j}",
            msgspec.structs.replace(base, seed=None if seed is None else seed + j),
            prompt,
            p,
        )
        for p, prompt in enumerate(prompts)
        for j in range(body.n)
    ]
    return GenerationPlan(
        request_id=f"{kind}-{body.request_id or uid}",
        prompts=prompts,
        choices=choices,
        stop=_stop_list(body.stop),
        logprobs=logprobs,
        priority=body.priority,
        cache_salt=body.cache_salt,
        stream=body.stream,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        output=output,
        constraint=constraint,
        chat=chat,
    )


def _sampling(
    body: CompletionRequest | ChatCompletionRequest,
    max_tokens: int,
    logprobs: int | None,
    limits: ContextLimits,
    model: ServedModel,
    constraint: Constraint | None,
    prompt_logprobs: int | None,
) -> SamplingParams:
    """Every choice's parameters but its seed: a seeded request's choice j draws with seed + j."""
    given = {name: getattr(body, name) for name in _PASSED_ON if getattr(body, name) is not None}
    return SamplingParams(
        **given,
        top_k=max(body.top_k or 0, 0),
        max_tokens=max_tokens,
        min_tokens=body.min_tokens,
        stop_token_ids=list(body.stop_token_ids or []),
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
        logit_bias=fields.logit_bias(body.logit_bias, limits),
        allowed_token_ids=fields.allowed_token_ids(body.allowed_token_ids, limits),
        bad_words=fields.bad_words(body.bad_words, model),
        structured=constraint.output if constraint else None,
        prompt_logprobs=prompt_logprobs,
    )
