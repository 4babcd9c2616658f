"""Tool calls read back from a choice's text: for tool_choice auto by the parser the gateway's
--tool-call-parser names (hermes, llama3_json), for required and named from the JSON the
grammar forced. Incremental, so one reader serves a stream and a whole response alike: text
goes out as content as soon as it cannot be part of a call, a call once it is complete (a
named call's arguments as they generate). What fails to parse as a call stays text.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

from services.gateway.tool_calls import ChatPlan
from shared.messages import FinishReason

_JSON = json.JSONDecoder()


def new_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = field(default_factory=new_call_id)

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


Piece = str | ToolCall


class Reader(Protocol):
    def advance(self, text: str, pos: int, final: bool) -> tuple[list[Piece], int]:
        """The pieces of `text` from `pos` that are decided (content, or a complete call), and
        where the undecided rest starts; `final`: no more text follows."""
        ...


def _call_from(obj: Any, args_keys: tuple[str, ...]) -> ToolCall | None:
    """{"name": ..., <args key>: {...}} as a call; anything else is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    key = next((k for k in args_keys if k in obj), None)
    if key is None:
        return None
    return ToolCall(obj["name"], json.dumps(obj[key] if obj[key] is not None else {}, ensure_ascii=False))


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


class HermesReader:
    """<tool_call>{"name": ..., "arguments": {...}}</tool_call> anywhere in the text (Hermes,
    Qwen2.5, Qwen3, the tiny model's template). An unclosed call at the end counts when its
    JSON is complete (the output was cut after it)."""

    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def advance(self, text: str, pos: int, final: bool) -> tuple[list[Piece], int]:
        pieces: list[Piece] = []
        while pos < len(text):
            start = text.find(self.OPEN, pos)
            if start == -1:
                # Hold back a tail that may be the start of a tag still generating.
                safe = len(text) if final else len(text) - _tag_prefix_len(text, pos, self.OPEN)
                if safe > pos:
                    pieces.append(text[pos:safe])
                return pieces, max(pos, safe)
            if start > pos:
                pieces.append(text[pos:start])
                pos = start
            end = text.find(self.CLOSE, start + len(self.OPEN))
            if end == -1 and not final:
                return pieces, pos
            stop = len(text) if end == -1 else end + len(self.CLOSE)
            body = text[start + len(self.OPEN) : end if end != -1 else len(text)]
            pieces.append(_parse_json_call(body, ("arguments",)) or text[start:stop])
            pos = stop
        return pieces, pos


class Llama3JsonReader:
    """Llama 3.x's JSON tool calls: the whole output is one or more {"name": ..., "parameters"
    (or "arguments"): {...}} objects (separated by ';'), optionally after <|python_tag|>. An
    output that starts otherwise is text, streamed as it comes (as vLLM's streaming parser)."""

    TAG = "<|python_tag|>"

    def advance(self, text: str, pos: int, final: bool) -> tuple[list[Piece], int]:
        if pos > 0:  # decided already: text
            return ([text[pos:]] if len(text) > pos else []), len(text)
        head = text.lstrip()
        if not head or head.startswith(("{", self.TAG)) or self.TAG.startswith(head):
            if not final:
                return [], 0  # may be calls: wait for the whole output
            calls = self._calls(head.removeprefix(self.TAG))
            return (list(calls) if calls else ([text] if text else [])), len(text)
        return [text], len(text)

    @staticmethod
    def _calls(text: str) -> list[ToolCall] | None:
        calls: list[ToolCall] = []
        i = 0
        while True:
            while i < len(text) and (text[i].isspace() or text[i] == ";"):
                i += 1
            if i == len(text):
                return calls or None
            if text[i] != "{":
                return None
            try:
                obj, i = _JSON.raw_decode(text, i)
            except json.JSONDecodeError:
                return None
            call = _call_from(obj, ("parameters", "arguments"))
            if call is None:
                return None
            calls.append(call)


class RequiredReader:
    """tool_choice required: the grammar forced a JSON array of {"name", "parameters"}; each
    element is a call as soon as it is complete. The output is never content."""

    def advance(self, text: str, pos: int, final: bool) -> tuple[list[Piece], int]:
        pieces: list[Piece] = []
        while True:
            i = _skip_space(text, pos)
            if i < len(text) and text[i] in "[,":
                i = _skip_space(text, i + 1)
            if i >= len(text) or text[i] != "{":
                return pieces, pos
            try:
                obj, pos = _JSON.raw_decode(text, i)
            except json.JSONDecodeError:
                return pieces, pos  # not complete yet
            call = _call_from(obj, ("parameters",))
            if call is not None:
                pieces.append(call)


READERS: dict[str, type[Reader]] = {"hermes": HermesReader, "llama3_json": Llama3JsonReader}


class ToolCallStream:
    """One choice's text turned into OpenAI's message fields, delta by delta (`feed`) or at
    once (`message`), the same either way. Whitespace after the last call is not content; with
    parallel_tool_calls false only the first call is kept (as vLLM)."""

    def __init__(self, chat: ChatPlan):
        self.chat = chat
        self.calls: list[ToolCall] = []
        self._reader: Reader | None = None
        if chat.tool_choice == "named":
            assert chat.function_name is not None  # chat_options names it
            self.calls.append(ToolCall(chat.function_name, ""))
        elif chat.tool_choice == "required":
            self._reader = RequiredReader()
        elif chat.tool_choice == "auto":
            assert chat.parser is not None  # chat_options sets it
            self._reader = READERS[chat.parser]()
        self._text = ""
        self._pos = 0
        # Trailing whitespace is held until more text follows: after the last call it is dropped.
        self._space = ""
        self._content = ""

    def named_header(self) -> dict[str, Any]:
        """A named call's first delta: its id and name, no arguments yet."""
        return {"tool_calls": [{"index": 0, **self.calls[0].as_dict()}]}

    def feed(self, text: str, final: bool) -> dict[str, Any]:
        """The delta for `text`, the choice's next piece of output (`final`: its last)."""
        self._text += text
        if self.chat.tool_choice == "named":
            self.calls[0] = ToolCall(self.calls[0].name, self._text, self.calls[0].id)
            return {"tool_calls": [{"index": 0, "function": {"arguments": text}}]} if text else {}
        if self._reader is None:
            self._content += text
            return {"content": text} if text else {}
        pieces, self._pos = self._reader.advance(self._text, self._pos, final)
        content, new_calls = self._take(pieces, final)
        delta: dict[str, Any] = {"content": content} if content else {}
        if new_calls:
            first = len(self.calls) - len(new_calls)
            delta["tool_calls"] = [{"index": first + k, **c.as_dict()} for k, c in enumerate(new_calls)]
        return delta

    def message(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """The whole output's content and calls."""
        self.feed(text, final=True)
        if self.chat.tool_choice in ("named", "required"):
            calls = self.calls if self._text.strip() else []
            return "", calls  # the output was the calls (vLLM answers content "")
        if self.calls and not self._content.strip():
            return None, self.calls
        return self._content, self.calls

    def finish_reason(self, reason: FinishReason | None) -> str | None:
        """OpenAI's: "tool_calls" when calls ended the turn, except for a named call ("stop")."""
        if reason is FinishReason.STOP and self.calls and self.chat.tool_choice in ("auto", "required"):
            return "tool_calls"
        return None if reason is None else reason.value

    def _take(self, pieces: list[Piece], final: bool) -> tuple[str, list[ToolCall]]:
        out, new = "", []
        for piece in pieces:
            if isinstance(piece, ToolCall):
                if self.chat.parallel_tool_calls or not self.calls:
                    self.calls.append(piece)
                    new.append(piece)
            else:
                text = self._space + piece
                body = text.rstrip()
                out, self._space = out + body, text[len(body) :]
        if final and not self.calls:
            out, self._space = out + self._space, ""
        self._content += out
        return out, new


def _parse_json_call(body: str, args_keys: tuple[str, ...]) -> ToolCall | None:
    try:
        return _call_from(json.loads(body), args_keys)
    except json.JSONDecodeError:
        return None


def _tag_prefix_len(text: str, pos: int, tag: str) -> int:
    """The length of the longest tail of text[pos:] that begins `tag`."""
    for n in range(min(len(tag) - 1, len(text) - pos), 0, -1):
        if tag.startswith(text[len(text) - n :]):
            return n
    return 0
