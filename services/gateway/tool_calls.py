"""Tool calling and the chat-only fields, request side: the conversation and tools as the chat
template reads them (past calls' arguments as objects, as vLLM passes them), and tool_choice
turned into an output constraint (required, named) or a parser to read the text with (auto).
Every combination that cannot work is a 400 naming its field, as vLLM's refusals.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from services.gateway.errors import bad_request
from services.gateway.output_constraints import json_schema_constraint
from services.gateway.protocol import (
    AssistantToolCall,
    ChatCompletionRequest,
    ChatMessage,
    NamedToolChoice,
    Tool,
)
from services.gateway.reasoning import ReasoningPlan
from services.gateway.served_model import ServedModel
from shared.messages import StructuredOutput

log = logging.getLogger(__name__)

EMPTY_PARAMETERS = {"type": "object", "properties": {}}  # a function without a schema still takes an object


@dataclass(frozen=True)
class ChatConfig:
    """The gateway's settings that chat requests depend on (GatewaySettings' fields)."""

    tool_call_parser: str = "hermes"
    trust_request_chat_template: bool = False
    reasoning_parser: str | None = None  # qwen3 | deepseek_r1 (reasoning.py)


@dataclass(frozen=True)
class ChatPlan:
    """What the response side needs to know of a chat request beyond sampling.

    tool_choice: none | auto (parse the text with `parser`) | required (the output is a JSON
    array of {"name", "parameters"}) | named (the output is `function_name`'s arguments)."""

    tool_choice: str = "none"
    function_name: str | None = None
    parser: str | None = None
    parallel_tool_calls: bool = True
    structured: StructuredOutput | None = None  # required / named: enforced in the worker's sampler
    echo: str = ""  # chat echo: the output starts with the last (assistant) message's content
    reasoning: ReasoningPlan | None = None  # with a reasoning parser: where the thinking starts

    @property
    def reads_tool_calls(self) -> bool:
        return self.tool_choice != "none"


def chat_options(body: ChatCompletionRequest, config: ChatConfig) -> ChatPlan:
    """The request's tool plan and echo, after refusing what does not fit together."""
    if body.chat_template is not None and not config.trust_request_chat_template:
        # As vLLM: a template runs code-like Jinja in the gateway, so the operator opts in.
        raise bad_request(
            "chat_template: this gateway does not accept chat templates from requests (start it "
            "with --trust-request-chat-template to allow them)",
            "chat_template",
        )
    for legacy in ("functions", "function_call"):
        if getattr(body, legacy) is not None:
            raise bad_request(
                f"{legacy} is OpenAI's deprecated spelling and is not supported: "
                f"use {'tools' if legacy == 'functions' else 'tool_choice'}",
                legacy,
            )
    _check_continue_final_message(body)
    choice = _tool_choice(body, config.tool_call_parser)
    echo = body.messages[-1].text() if body.echo and body.messages[-1].role == "assistant" else ""
    parallel = body.parallel_tool_calls is not False
    if choice == "none":
        return ChatPlan(echo=echo)
    if choice == "auto":
        return ChatPlan("auto", parser=config.tool_call_parser, parallel_tool_calls=parallel, echo=echo)
    tools = body.tools
    assert tools, "_tool_choice refuses tool_choice required or named without tools"
    if choice == "required":
        return ChatPlan(
            "required",
            parallel_tool_calls=parallel,
            echo=echo,
            structured=_json_schema(_required_schema(tools, parallel)),
        )
    name = choice.function.name
    params = next(t.function.parameters for t in tools if t.function.name == name)
    return ChatPlan(
        "named",
        function_name=name,
        parallel_tool_calls=parallel,
        echo=echo,
        structured=_json_schema(params or EMPTY_PARAMETERS),
    )


def render_prompt(body: ChatCompletionRequest, model: ServedModel) -> list[int]:
    """The prompt's token ids: the conversation, the tools and the template's own variables
    rendered by the request's chat template, or the model's."""
    kwargs = dict(body.chat_template_kwargs or {})
    for name in _apply_parameters(type(model.tokenizer).apply_chat_template) & kwargs.keys():
        raise bad_request(
            f"chat_template_kwargs: {name!r} is not a template variable but an argument the "
            "gateway sets from the request's own fields",
            "chat_template_kwargs",
        )
    messages = template_messages(body.messages)
    try:
        return model.apply_chat_template(
            messages,
            body.add_generation_prompt,
            tools=template_tools(body.tools),
            continue_final_message=body.continue_final_message,
            chat_template=body.chat_template,
            add_special_tokens=body.add_special_tokens,
            template_kwargs=kwargs,
        )
    except Exception as e:  # jinja2's TemplateError, or a template's raise_exception()
        field = "chat_template" if body.chat_template else "messages"
        raise bad_request(f"{field}: the chat template refused the request: {e}", field) from e


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The messages as chat templates read them (transformers' convention)."""
    out = []
    for i, msg in enumerate(messages):
        if msg.tool_calls and msg.role != "assistant":
            raise bad_request(
                f"messages[{i}].tool_calls: only assistant messages carry tool calls",
                f"messages[{i}].tool_calls",
            )
        if msg.tool_call_id is not None and msg.role != "tool":
            raise bad_request(
                f"messages[{i}].tool_call_id: only tool messages answer a tool call",
                f"messages[{i}].tool_call_id",
            )
        entry: dict[str, Any] = {"role": msg.role, "content": msg.text()}
        if msg.name:
            entry["name"] = msg.name
        if msg.tool_call_id is not None:
            entry["tool_call_id"] = msg.tool_call_id
        if msg.tool_calls:
            entry["tool_calls"] = [_template_call(call, f"messages[{i}]") for call in msg.tool_calls]
        out.append(entry)
    return out


def template_tools(tools: list[Tool] | None) -> list[dict[str, Any]] | None:
    return None if tools is None else [t.model_dump(exclude_none=True) for t in tools]


# ---- internals ----------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _apply_parameters(apply_chat_template: Callable[..., object]) -> frozenset[str]:
    """apply_chat_template's own arguments (tokenize, tools, ...), given the tokenizer class's
    function: a template kwarg of that name would reach the function, not the template."""
    params = inspect.signature(apply_chat_template).parameters.values()
    return frozenset(p.name for p in params if p.kind is not p.VAR_KEYWORD) | {"messages"}


def _tool_choice(
    body: ChatCompletionRequest, tool_call_parser: str
) -> Literal["none", "auto", "required"] | NamedToolChoice:
    """none | auto | required | the named function's choice, with vLLM's defaults and refusals."""
    if body.tools is not None and not body.tools:
        raise bad_request(
            "tools must not be an empty array: give at least one tool or leave the field out", "tools"
        )
    choice = body.tool_choice
    if choice is None:
        choice = "auto" if body.tools else "none"
    if choice == "none":
        return "none"  # the tools are still rendered into the prompt, as vLLM does
    if not body.tools:
        raise bad_request("tool_choice needs tools: set tools, or tool_choice 'none'", "tool_choice")
    if choice == "auto":
        if tool_call_parser == "none":
            raise bad_request(
                'tool_choice "auto" needs a tool call parser: this gateway runs with '
                "--tool-call-parser none; use tool_choice 'required' or a named function",
                "tool_choice",
            )
        return "auto"
    _refuse_other_constraints(body)
    if choice == "required":
        return "required"
    names = [t.function.name for t in body.tools]
    if choice.function.name not in names:
        raise bad_request(
            f"tool_choice names the function {choice.function.name!r}, which is not among tools "
            f"({', '.join(map(repr, names))})",
            "tool_choice",
        )
    return choice


def _refuse_other_constraints(body: ChatCompletionRequest) -> None:
    """tool_choice required / named constrain the output already (vLLM refuses a second constraint)."""
    response_format = getattr(body, "response_format", None)
    if isinstance(response_format, dict):
        response_format = response_format.get("type")
    elif response_format is not None:
        response_format = getattr(response_format, "type", response_format)
    if response_format not in (None, "text"):
        raise bad_request(
            "response_format cannot be combined with tool_choice 'required' or a named function: "
            "both constrain the output",
            "response_format",
        )
    for name in ("structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar"):
        if getattr(body, name, None) is not None:
            raise bad_request(
                f"{name} cannot be combined with tool_choice 'required' or a named function: "
                "both constrain the output",
                name,
            )


def _check_continue_final_message(body: ChatCompletionRequest) -> None:
    if not body.continue_final_message:
        return
    if body.add_generation_prompt:
        raise bad_request(
            "continue_final_message needs add_generation_prompt set to false (it continues the last "
            "message instead of opening a new one)",
            "continue_final_message",
        )
    if body.messages[-1].role != "assistant":
        raise bad_request(
            f"continue_final_message continues the last message, which must be the assistant's "
            f"(here: {body.messages[-1].role!r})",
            "continue_final_message",
        )


def _template_call(call: AssistantToolCall, where: str) -> dict[str, Any]:
    """A past call with its arguments as an object, as templates expect; arguments that are
    not a JSON object become {} (as vLLM: the history stays usable), with a warning."""
    args = call.function.arguments
    if isinstance(args, str) and args:
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            log.warning(
                "%s: arguments of the call to %r are not JSON; rendered as {}", where, call.function.name
            )
            args = {}
    if not isinstance(args, dict):
        if args not in (None, ""):
            log.warning(
                "%s: arguments of the call to %r are not a JSON object; rendered as {}",
                where,
                call.function.name,
            )
        args = {}
    entry: dict[str, Any] = {"type": "function", "function": {"name": call.function.name, "arguments": args}}
    if call.id is not None:
        entry["id"] = call.id
    return entry


def _required_schema(tools: list[Tool], parallel: bool) -> dict[str, Any]:
    """tool_choice required: a JSON array of at least one call, each {"name": one of the tools,
    "parameters": its schema} (vLLM's shape); the tools' $defs move to the top, where refs find them."""
    alternatives: list[dict[str, Any]] = []
    defs: dict[str, Any] = {}
    for tool in tools:
        params = dict(tool.function.parameters or EMPTY_PARAMETERS)
        for name, definition in (params.pop("$defs", None) or {}).items():
            if defs.setdefault(name, definition) != definition:
                raise bad_request(
                    f"tools: two tools define $defs {name!r} differently; "
                    "tool_choice 'required' needs them to agree",
                    "tools",
                )
        alternatives.append(
            {
                "properties": {
                    "name": {"type": "string", "enum": [tool.function.name]},
                    "parameters": params,
                },
                "required": ["name", "parameters"],
            }
        )
    schema: dict[str, Any] = {
        "type": "array",
        "minItems": 1,
        "items": {"type": "object", "anyOf": alternatives},
    }
    if not parallel:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


def _json_schema(schema: dict[str, Any]) -> StructuredOutput:
    """The constraint, checked as any request's (a schema the grammar engine cannot read is a 400)."""
    return json_schema_constraint(schema, "tools").output
