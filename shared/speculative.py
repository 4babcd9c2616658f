"""Speculative decoding's shared rules: the configuration (`--speculative-config`, vLLM's
JSON), n-gram prompt lookup, and which requests may be speculated.

Where proposals are made: n-gram proposals come from a request's own tokens, which the
scheduler holds (the worker holds them too, but the scheduler must know a step's tokens to
budget them and to give the request blocks for them before the step is sent). The worker
verifies every row's proposals in the step's one forward pass (engine.py).

Which requests: those whose next tokens depend on nothing but the model's logits, so that
checking k proposals in one pass gives exactly the tokens k passes would: greedy, without
penalties, bad words or a grammar, past min_tokens. Others decode as before in the same
batch, and the scheduler's figures count the steps each kind took.
"""

from __future__ import annotations

import json
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shared.messages import SamplingParams


class SpeculativeConfig(BaseModel):
    """vLLM's `--speculative-config` keys for prompt lookup (method "ngram")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["ngram"]
    num_speculative_tokens: int = Field(gt=0, le=16)
    prompt_lookup_max: int = Field(4, gt=0)
    prompt_lookup_min: int = Field(1, gt=0)
    # vLLM's name: no proposals in a step of a worker running more requests than this.
    disable_by_batch_size: Optional[int] = Field(None, gt=0)

    @model_validator(mode="after")
    def _lookup_range(self) -> "SpeculativeConfig":
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"prompt_lookup_min ({self.prompt_lookup_min}) exceeds prompt_lookup_max "
                             f"({self.prompt_lookup_max})")
        return self


def parse_config(text: Optional[str]) -> Optional[SpeculativeConfig]:
    """The configuration from its JSON text (None or "": off); ValueError saying what is wrong."""
    if not text:
        return None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"speculative config is not JSON: {e}") from None
    if isinstance(raw, dict) and raw.get("method") == "draft_model":
        raise ValueError('speculative config: method "draft_model" is not built yet; "ngram" is')
    try:
        return SpeculativeConfig.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'config'}: {err['msg']}" for err in e.errors())
        raise ValueError(f"speculative config: {problems}") from None


def speculable(params: SamplingParams, num_output_tokens: int) -> bool:
    """Whether a request's next tokens are each the argmax of masks that do not depend on
    the tokens before them (logit_bias and allowed_token_ids are fixed; a grammar, bad
    words, penalties and min_tokens' stop-token ban are not)."""
    return (params.temperature == 0.0 and params.structured is None and not params.bad_words
            and params.presence_penalty == 0.0 and params.frequency_penalty == 0.0
            and params.repetition_penalty == 1.0 and num_output_tokens >= params.min_tokens)


def ngram_propose(token_ids: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Prompt lookup, as vLLM's: for n from max_n down to min_n, find the latest earlier
    place where the last n tokens occurred, and propose the (up to) k tokens that followed
    it there. [] when no n-gram of the tail recurs."""
    total = len(token_ids)
    for n in range(min(max_n, total - 1), min_n - 1, -1):
        tail = token_ids[total - n:]
        # Latest match first: recent text is the likeliest to be copied again.
        for start in range(total - n - 1, -1, -1):
            if token_ids[start:start + n] == tail:
                follow = token_ids[start + n:start + n + k]
                if follow:
                    return follow
    return []
