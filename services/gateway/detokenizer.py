"""Token ids to text, one token at a time, and stop strings matched in that text.

`IncrementalDetokenizer` never emits half a UTF-8 character: text is held back while the
decoded tail ends in U+FFFD (at the end it goes out as is). It decodes a short window of
recent tokens, so each token costs the same however long the output (vLLM's offsets).

`StopStringMatcher` holds back the longest tail that could still begin a stop string, and
cuts the text where the first stop string to complete starts (or, asked to include it, ends).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

REPLACEMENT = "\ufffd"
# Prompt tokens decoded before the output, so a tokenizer that drops a word's leading
# space at the start of a decode (SentencePiece) decodes the first output token right.
PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """`add(token_id)` returns the text that token completes (often "", for a partial
    character); `flush()` returns what is still held back at the end."""

    def __init__(self, decode: Callable[[list[int]], str], prompt_token_ids: Sequence[int] = ()):
        self._decode = decode
        self._ids: list[int] = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        # A prompt ending mid-character must not lend its bytes to the output's first one.
        while self._ids and decode(self._ids).endswith(REPLACEMENT):
            self._ids.pop()
        # _ids[prefix:read] was decoded already and its text emitted; _ids[read:] is pending.
        self._prefix = 0
        self._read = len(self._ids)

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        if len(text) <= len(prefix_text) or text.endswith(REPLACEMENT):
            return ""  # an incomplete character (or a token that decodes to nothing yet)
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(prefix_text) :]

    def flush(self) -> str:
        """The held-back tail, decoded as it is (an unfinished character becomes U+FFFD)."""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return text[len(prefix_text) :] if len(text) > len(prefix_text) else ""


class StopStringMatcher:
    """`push(text)` returns (text safe to emit, matched); after a match nothing more is
    taken. `flush()` releases the held-back tail once the output ends without a match."""

    def __init__(self, stop: Sequence[str], include: bool = False):
        assert all(stop), "stop strings are non-empty (validated at the edge)"
        self.stop = list(stop)
        self.include = include  # vLLM's include_stop_str_in_output: the text ends after the stop string
        self._held = ""
        self.matched = False

    def push(self, text: str) -> tuple[str, bool]:
        if self.matched:
            return "", True
        if not self.stop:
            return text, False
        buf = self._held + text
        # NOTE: emitted text never ends with a prefix of a stop string (that tail is held),
        # so any occurrence lies entirely within `buf`. The one completed first wins (the
        # longest on a tie), as if the text came one character at a time: the result does
        # not depend on how it was split into tokens.
        found = [(i + len(s), i) for s in self.stop if (i := buf.find(s)) >= 0]
        if found:
            end, start = min(found)
            self._held = ""
            self.matched = True
            return buf[: end if self.include else start], True
        keep = self._partial_tail(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.matched else held

    def _partial_tail(self, buf: str) -> int:
        """Length of the longest tail of `buf` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:n]):
                    best = n
                    break
        return best


def special_tokens_decoder(
    model: Any, skip_special_tokens: bool, spaces_between_special_tokens: bool
) -> Callable[[list[int]], str]:
    """The decode function of vLLM's two options. Without spaces between special tokens,
    each run of ordinary tokens is decoded apart and the special (added) tokens joined to it
    as their bare text, so the tokenizer puts no space around them."""
    if skip_special_tokens or spaces_between_special_tokens:
        return lambda ids: model.decode(ids, skip_special_tokens)
    added = {i: t.content for i, t in model.tokenizer.added_tokens_decoder.items()}
    if not added:
        return lambda ids: model.decode(ids, False)

    def decode(ids: list[int]) -> str:
        parts: list[str] = []
        run: list[int] = []
        for t in ids:
            if t in added:
                parts += [model.decode(run, False) if run else "", added[t]]
                run = []
            else:
                run.append(t)
        return "".join(parts) + (model.decode(run, False) if run else "")

    return decode
