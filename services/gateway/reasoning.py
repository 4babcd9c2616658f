"""Reasoning output (`--reasoning-parser qwen3 | deepseek_r1`): a chat choice's text split into
its thinking (`<think>…</think>`, answered as `reasoning` and `reasoning_content`) and its
answer (`content`), as vLLM's parsers split it; tool calls are then read from the answer only.

The split works on text, delta by delta, holding back only a tail that could still become a
tag, so a stream's deltas put together equal the whole response's split wherever the tags
fall between tokens. Where the thinking starts is decided once per request (`ReasoningPlan`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import msgspec

from services.gateway.errors import bad_request
from services.gateway.protocol import ChatCompletionRequest
from services.gateway.served_model import ServedModel
from shared.messages import StructuredOutput

PARSERS = ("qwen3", "deepseek_r1")
OPEN, CLOSE = "<think>", "</think>"
PROMPT_TAIL_TOKENS = 16  # enough to hold "</think>\n\n" however finely a tokenizer splits it

# Where a choice's output starts.
THINKING = "thinking"  # inside the thinking: all up to </think> is reasoning (a leading <think> is dropped)
MAYBE = "maybe"  # qwen3, nothing opened: reasoning only if the output opens with <think>, else all answer
ANSWER = "answer"  # thinking is off: the output is all answer, never parsed
_LEAD = "lead"  # ReasoningSplit's first phase: waiting to see whether the output opens with <think>


@dataclass(frozen=True)
class ReasoningPlan:
    start: str  # THINKING, MAYBE or ANSWER
    include_reasoning: bool = True  # vLLM's include_reasoning: false drops the reasoning from the answer

    @property
    def may_think(self) -> bool:
        return self.start != ANSWER


def reasoning_plan(
    parser: str, body: ChatCompletionRequest, prompt: list[int], model: ServedModel
) -> ReasoningPlan:
    """Where the output starts, from the prompt's end and the request's thinking switch:

    - the request turned thinking off (chat_template_kwargs `enable_thinking` or `thinking`
      false, as vLLM reads them), or the prompt ends with a closed think block (Qwen3's
      template with thinking off): all answer;
    - the prompt ends with `<think>` (DeepSeek-R1's, Qwen3-Thinking-2507's and Qwen3.5's
      templates open it), or the parser is deepseek_r1 (whose model may leave the opening tag
      out): thinking from the first token;
    - qwen3 otherwise: thinking only when the output itself opens with `<think>`.
    """
    assert parser in PARSERS, parser
    include = body.model_extra.get("include_reasoning", True) if body.model_extra else True
    if not isinstance(include, bool):
        raise bad_request("include_reasoning: must be a boolean", "include_reasoning")
    kwargs = body.chat_template_kwargs or {}
    if kwargs.get("enable_thinking") is False or kwargs.get("thinking") is False:
        return ReasoningPlan(ANSWER, include)
    opened = _opened_by_prompt(body, prompt, model)
    if opened is not None:
        return ReasoningPlan(THINKING if opened else ANSWER, include)
    return ReasoningPlan(THINKING if parser == "deepseek_r1" else MAYBE, include)


def after_thinking(
    plan: ReasoningPlan, output: StructuredOutput, tokenizer: Any, field: str
) -> StructuredOutput:
    """`output` applied to the answer after the thinking, as vLLM's structured outputs with a
    reasoning parser: the worker lets the output run free up to </think> and starts the
    grammar after it (and, where the output may not think at all, lets the first token be
    the grammar's or <think>). The worker follows token ids, so each tag must be one token
    in this tokenizer (it is in Qwen3's and DeepSeek-R1's); otherwise the request is refused
    rather than constrained from its first token, the thinking included."""
    if not plan.may_think:
        return output
    ids = _tag_ids(tokenizer)
    if ids is None:
        raise bad_request(
            f"{field} cannot be combined with this server's reasoning parser while the model may think "
            f"first: this tokenizer does not have {OPEN} and {CLOSE} as single tokens, so the constraint "
            "cannot start after the thinking. Turn thinking off for the request (chat_template_kwargs "
            '{"enable_thinking": false}) or leave the constraint out',
            field,
        )
    open_id, close_id = ids
    return msgspec.structs.replace(
        output, think_end=close_id, think_open=open_id if plan.start == MAYBE else -1
    )


@functools.lru_cache(maxsize=8)
def _tag_ids(tokenizer: Any) -> tuple[int, int] | None:
    """(<think>'s id, </think>'s id) where each is one token, else None."""
    ids = [tokenizer.encode(tag, add_special_tokens=False) for tag in (OPEN, CLOSE)]
    return (ids[0][0], ids[1][0]) if all(len(i) == 1 for i in ids) else None


@functools.lru_cache(maxsize=8)
def tags_are_special(tokenizer: Any) -> bool:
    """Whether the tokenizer marks <think> or </think> special, so that skipping special
    tokens would erase them from the text the split reads."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return any(t.special and t.content in (OPEN, CLOSE) for t in added.values())


class ReasoningSplit:
    """One choice's text as (reasoning, content) pieces, fed delta by delta (`feed`) or at
    once (`whole`), the same either way."""

    def __init__(self, plan: ReasoningPlan):
        # Until the output's first non-blank text shows whether it opens with <think>, it is
        # held ("lead"); then it is thinking up to </think>, and answer after.
        self._phase = ANSWER if plan.start == ANSWER else _LEAD
        self._unopened = THINKING if plan.start == THINKING else ANSWER  # the phase without a <think>
        self._held = ""
        self.thought = False  # the thinking was entered: the reasoning is "" rather than None

    def feed(self, text: str, final: bool) -> tuple[str, str]:
        """The (reasoning, content) that `text`, the choice's next piece of output, makes safe
        to send; `final`: its last piece (nothing is held back)."""
        buf, self._held = self._held + text, ""
        if self._phase == _LEAD:
            head = buf.lstrip()
            if head.startswith(OPEN):
                buf, self._phase = head[len(OPEN) :], THINKING
            elif OPEN.startswith(head) and not final:
                self._held = buf  # blank so far, or the start of <think>: undecided
                return "", ""
            else:
                self._phase = self._unopened
            self.thought = self._phase == THINKING
        reasoning = ""
        if self._phase == THINKING:
            end = buf.find(CLOSE)
            if end == -1:
                keep = 0 if final else _tag_prefix_len(buf, CLOSE)
                self._held = buf[len(buf) - keep :]
                return buf[: len(buf) - keep], ""
            reasoning, buf = buf[:end], buf[end + len(CLOSE) :]
            self._phase = ANSWER
        return reasoning, buf

    def whole(self, text: str) -> tuple[str | None, str]:
        """A whole output's reasoning (None when it never thought) and content."""
        reasoning, content = self.feed(text, final=True)
        return (reasoning if self.thought else None), content


def _opened_by_prompt(body: ChatCompletionRequest, prompt: list[int], model: ServedModel) -> bool | None:
    """True when the prompt leaves a think block open, False when it ends with one closed,
    None when it ends with neither. Only the prompt's very end counts: an earlier turn's
    </think> (Qwen3 keeps the reasoning of a tool-calling turn) says nothing of this one.
    A continued final message (continue_final_message) counts by its last tag."""
    if body.continue_final_message:
        text = body.messages[-1].text()
        last_open, last_close = text.rfind(OPEN), text.rfind(CLOSE)
        if last_open != -1 or last_close != -1:
            return last_open > last_close
    tail = model.decode(prompt[-PROMPT_TAIL_TOKENS:], skip_special_tokens=False).rstrip()
    if tail.endswith(OPEN):
        return True
    if tail.endswith(CLOSE):
        return False
    return None


def _tag_prefix_len(text: str, tag: str) -> int:
    """The length of the longest tail of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
