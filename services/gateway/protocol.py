"""The OpenAI API's request bodies as pydantic models: types and ranges only (the rules
that need the model are validation.py's). Names and defaults are OpenAI's, extensions
vLLM's. Strict: "0.5" is not a number, 1.0 not an integer; unknown fields are kept in
`model_extra`, where fields.py refuses vLLM's unimplemented ones and logs the rest.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_N = 128
MAX_LOGPROBS = 20


class StrictBody(BaseModel):
    """The base of every request body, the gateway's other routes' included (tokenize_routes.py)."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="allow")


class StreamOptions(StrictBody):
    include_usage: bool = False
    continuous_usage_stats: bool = Field(False, description="with include_usage: usage on every chunk")


class _SamplingFields(StrictBody):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = Field(None, description="the served model's name (default: the only one)")
    n: int = Field(1, ge=1, le=MAX_N, description="completions to generate for the prompt")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, description="0: greedy (default 1)")
    top_p: float | None = Field(None, gt=0, le=1)
    stop: Any | None = Field(None, description="a string or a list of strings; not included in the output")
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = Field(None, description="token id (as a string) -> -100..100")
    response_format: dict[str, Any] | None = None  # output_constraints.py reads it
    # vLLM's extensions.
    top_k: int | None = Field(None, ge=-1, le=INT64_MAX, description="-1 or 0: off")
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=100)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0, le=INT64_MAX)
    priority: int = Field(0, ge=INT64_MIN, le=INT64_MAX, description="lower runs first")
    cache_salt: str | None = Field(None, min_length=1, description="isolates this request's prefix cache")
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: int | None = Field(
        None, ge=-1, description="keep the last k prompt tokens; -1: max_model_len"
    )
    truncation_side: Literal["left", "right"] | None = None
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    return_tokens_as_token_ids: bool | None = None
    return_token_ids: bool | None = None
    request_id: str | None = Field(None, min_length=1, max_length=256, description="the response's id")
    structured_outputs: dict[str, Any] | None = None  # output_constraints.py reads these
    guided_json: Any | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: str | None = None
    guided_decoding_backend: str | None = None
    # vLLM's fields Conveyor does not implement are refused by fields.py when set (never
    # declared here, so each is checked against its default in one table).

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v: Any) -> Any:
        if v is None or isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v)):
            return v
        raise ValueError("must be a string or a list of strings")


class CompletionRequest(_SamplingFields):
    prompt: Any = Field(..., description="a string, a list of token ids, or a batch: a list of those")
    max_tokens: int | None = Field(None, ge=0, description="0 only with echo: the prompt alone")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    add_special_tokens: bool = Field(True, description="a string prompt's BOS, as the tokenizer adds it")
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        if v == [] or v == "":
            raise ValueError("must not be empty")
        if isinstance(v, str) or _is_token_ids(v):
            return v
        if isinstance(v, list) and v and all(isinstance(p, str) or _is_token_ids(p) for p in v):
            return v
        raise ValueError("must be a string, a list of token ids, or a list of those")


class ToolFunction(StrictBody):
    """A function the model may call: its name and the JSON schema of its arguments."""

    name: str = Field(..., min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(StrictBody):
    type: Literal["function"]
    function: ToolFunction


class NamedFunction(StrictBody):
    name: str = Field(..., min_length=1)


class NamedToolChoice(StrictBody):
    """tool_choice {"type": "function", "function": {"name": ...}}: call exactly that one."""

    type: Literal["function"]
    function: NamedFunction


class CalledFunction(StrictBody):
    name: str
    arguments: Any | None = None  # a JSON string as OpenAI sends it (a dict is read too, as vLLM)


class AssistantToolCall(StrictBody):
    """A call a past assistant turn made, as the history sends it back."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(StrictBody):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any | None = None
    name: str | None = None
    tool_calls: list[AssistantToolCall] | None = None  # assistant turns only
    tool_call_id: str | None = None  # tool turns: the call this answers

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, v: Any) -> Any:
        if v is None or isinstance(v, str):
            return v
        if isinstance(v, list):
            for i, part in enumerate(v):
                if not (
                    isinstance(part, dict)
                    and part.get("type") == "text"
                    and isinstance(part.get("text"), str)
                ):
                    raise ValueError(
                        f"part {i} must be {{'type': 'text', 'text': <string>}} "
                        "(only text content is supported)"
                    )
            return v
        raise ValueError("must be a string, a list of text parts, or null")

    def text(self) -> str:
        return (
            self.content if isinstance(self.content, str) else "".join(p["text"] for p in self.content or [])
        )


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = Field(True, description="end the prompt with the assistant's turn opening")
    # Tool calling and the template's inputs (services/gateway/tool_calls.py reads them).
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="default: auto when tools are given, else none"
    )
    parallel_tool_calls: bool | None = Field(None, description="false: at most one call")
    functions: Any | None = None  # OpenAI's legacy spellings of tools / tool_choice: refused
    function_call: Any | None = None
    continue_final_message: bool = Field(
        False, description="the prompt ends inside the last (assistant) message"
    )
    echo: bool = Field(False, description="prepend the last message's content when it is the assistant's")
    add_special_tokens: bool = Field(
        False, description="the tokenizer's special tokens (a BOS) on top of the template's"
    )
    chat_template: str | None = Field(None, description="a Jinja template used instead of the model's")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="extra variables for the template")


def _is_token_ids(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)
