"""Speculative decoding's shared rules: the configuration (`--speculative-config`, vLLM's
JSON) and n-gram prompt lookup.

Where proposals are made: n-gram proposals come from a request's own tokens, which the
scheduler holds (the worker holds them too, but the scheduler must know a step's tokens to
budget them and to give the request blocks for them before the step is sent). A draft
model's come from the worker, which holds the model: the scheduler decides how many a row
carries (and gives it blocks for them), the worker drafts them at the start of the step
(services/gpu_worker/drafter.py). Either way the worker verifies every row's proposals in
the step's one forward pass (engine.py).

Which requests: all of them. The worker samples each position of a speculated row as the
row will be once the proposals before it are its tokens (its grammar, penalties, bad words,
min_tokens and its seeded draw all at that position), and keeps the proposals that equal
what it sampled. For a greedy row that is exactly what k + 1 steps would give. For a sampled
row it is rejection sampling with a proposal that is one token for sure: a proposal is kept
with the probability the row gives it, and a rejected one is replaced by a draw from the
rest of that distribution; so the output distribution is unchanged, and a seeded request
draws the same tokens as without speculation.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class SpeculativeConfig(BaseModel):
    """vLLM's `--speculative-config` keys for prompt lookup (method "ngram") and for a draft
    model (method "draft_model", with `model`: a smaller model sharing the target's tokenizer)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["ngram", "draft_model"]
    num_speculative_tokens: int = Field(gt=0, le=16)
    model: str | None = None  # draft_model: its directory or .gguf file
    # vLLM's defaults: both 5 when neither is given, else the one given for both.
    prompt_lookup_max: int | None = Field(None, gt=0)
    prompt_lookup_min: int | None = Field(None, gt=0)
    # vLLM's name: no proposals in a step of a worker running more requests than this.
    disable_by_batch_size: int | None = Field(None, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _lookup_defaults(cls, raw: object) -> object:  # the JSON as given: any value, checked after
        if isinstance(raw, dict) and raw.get("method") == "ngram":
            low, high = raw.get("prompt_lookup_min"), raw.get("prompt_lookup_max")
            raw = {
                **raw,
                "prompt_lookup_min": low if low is not None else high if high is not None else 5,
                "prompt_lookup_max": high if high is not None else low if low is not None else 5,
            }
        return raw

    @model_validator(mode="after")
    def _method_keys(self) -> SpeculativeConfig:
        if self.method == "draft_model":
            if not self.model:
                raise ValueError(
                    'method "draft_model" needs "model": the draft model\'s directory or .gguf file'
                )
            given = [k for k in ("prompt_lookup_max", "prompt_lookup_min") if getattr(self, k) is not None]
            if given:
                raise ValueError(f'{", ".join(given)}: only for method "ngram"')
            return self
        if self.model is not None:
            raise ValueError('model: only for method "draft_model"')
        assert self.prompt_lookup_min is not None and self.prompt_lookup_max is not None
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(
                f"prompt_lookup_min ({self.prompt_lookup_min}) exceeds prompt_lookup_max "
                f"({self.prompt_lookup_max})"
            )
        return self


def parse_config(text: str | None) -> SpeculativeConfig | None:
    """The configuration from its JSON text (None or "": off); ValueError saying what is wrong."""
    if not text:
        return None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"speculative config is not JSON: {e}") from None
    try:
        return SpeculativeConfig.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or 'config'}: {err['msg']}" for err in e.errors()
        )
        raise ValueError(f"speculative config: {problems}") from None


def draft_model_of(text: str | None) -> str | None:
    """The draft model a worker loads for this configuration (None: none)."""
    spec = parse_config(text)
    return spec.model if spec is not None and spec.method == "draft_model" else None


def ngram_propose(token_ids: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Prompt lookup, as vLLM's: for n from max_n down to min_n, find the latest earlier
    place where the last n tokens occurred, and propose the (up to) k tokens that followed
    it there. [] when no n-gram of the tail recurs."""
    total = len(token_ids)
    for n in range(min(max_n, total - 1), min_n - 1, -1):
        tail = token_ids[total - n :]
        # Latest match first: recent text is the likeliest to be copied again.
        for start in range(total - n - 1, -1, -1):
            if token_ids[start : start + n] == tail:
                follow = token_ids[start + n : start + n + k]
                if follow:
                    return follow
    return []


class NgramIndex:
    """`ngram_propose` for a sequence that only grows, in O(max_n) a call: for every n-gram
    length it keeps where each n-gram last started with a token after it, brought up to
    date with the tokens added since the last call. The scheduler keeps one per request
    (its copy in Python costs microseconds a token; a scan, milliseconds a step)."""

    def __init__(self, min_n: int, max_n: int):
        self.min_n, self.max_n = min_n, max_n
        self._reset()

    def _reset(self) -> None:
        self.starts: dict[int, dict[tuple[int, ...], int]] = {
            n: {} for n in range(self.min_n, self.max_n + 1)
        }
        self.length = 0  # tokens indexed

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        total = len(token_ids)
        if total < self.length:  # not the sequence it indexed: start over
            self._reset()
        # An n-gram starting at s is indexed once token s + n exists: it has a follower.
        for n, starts in self.starts.items():
            for s in range(max(0, self.length - n), total - n):
                starts[tuple(token_ids[s : s + n])] = s
        self.length = total
        for n in range(min(self.max_n, total - 1), self.min_n - 1, -1):
            start = self.starts[n].get(tuple(token_ids[total - n :]))
            if start is not None:
                return token_ids[start + n : start + n + k]
        return []
