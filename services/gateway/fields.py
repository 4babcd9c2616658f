"""vLLM's request fields beyond OpenAI's basics: the token-level ones converted to what the
worker applies (logit_bias, allowed_token_ids, bad_words), the ones Conveyor does not
implement refused when set to anything but their default, and fields nobody knows logged
once per name (as vLLM does) and otherwise ignored.
"""

from __future__ import annotations

import logging
from typing import Any

from services.gateway.errors import bad_request
from services.gateway.protocol import ChatCompletionRequest, CompletionRequest
from services.gateway.served_model import ContextLimits, ServedModel

log = logging.getLogger(__name__)

LOGIT_BIAS_LIMIT = 100.0  # OpenAI's range, -100..100
MAX_BAD_WORDS = 128  # token sequences after tokenization (vLLM's default limit)

# vLLM 0.32 fields Conveyor does not implement -> the values that mean "not used" (accepted).
# They are not declared in protocol.py: they reach `model_extra` and are checked here.
REFUSED_BOTH: dict[str, tuple] = {
    "use_beam_search": (False,),
    "length_penalty": (1.0,),
    "watermarking": (None, False),
    "logprob_token_ids": (None, []),
    "session_id": (None,),
    "routed_experts_prompt_start": (0,),
    "return_token_offsets": (None, False),
    "mm_payload": ("tensors",),
    "return_mm_kwargs": (None, False),
    "kv_transfer_params": (None,),
    "ec_transfer_params": (None,),
    "vllm_xargs": (None,),
    "repetition_detection": (None,),
    "thinking_token_budget": (None,),
    "stream_interval": (None, 1),
}
REFUSED_COMPLETION: dict[str, tuple] = {**REFUSED_BOTH, "prompt_embeds": (None,)}
REFUSED_CHAT: dict[str, tuple] = {
    **REFUSED_BOTH,
    "reasoning_effort": (None,),
    "include_reasoning": (True,),
    "documents": (None,),
    "media_io_kwargs": (None,),
    "mm_processor_kwargs": (None,),
    "return_prompt_text": (None, False),
}

_logged_unknown: set[str] = set()


def check_extra_fields(
    body: CompletionRequest | ChatCompletionRequest, accepted: tuple[str, ...] = ()
) -> None:
    """A 400 for a refused field set to a non-default value; unknown fields are logged
    once per name (the request goes on without them). `accepted`: refused fields this
    gateway's settings implement (include_reasoning with a reasoning parser)."""
    refused = REFUSED_CHAT if isinstance(body, ChatCompletionRequest) else REFUSED_COMPLETION
    unknown = []
    for name, value in (body.model_extra or {}).items():
        if name in accepted:
            continue
        if name not in refused:
            unknown.append(name)
        elif value not in refused[name]:
            raise bad_request(
                f"{name} is not supported by this server (only its default, "
                f"{_shown(refused[name][0])}, is accepted)",
                name,
            )
    new = sorted(set(unknown) - _logged_unknown)
    if new:
        _logged_unknown.update(new)
        log.warning("The following fields were present in the request but ignored: %s", new)


def _shown(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else repr(value)


# ---- token-level fields ------------------------------------------------------------------
def logit_bias(bias: dict[str, float] | None, limits: ContextLimits) -> dict[int, float]:
    """OpenAI's {"<token id>": bias}: ids within the vocabulary, biases within -100..100."""
    out = {}
    for key, value in (bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise bad_request(
                f"logit_bias: keys are token ids written as strings, not {key!r}", "logit_bias"
            ) from None
        check_token(token, f"logit_bias[{key}]", limits)
        if not -LOGIT_BIAS_LIMIT <= value <= LOGIT_BIAS_LIMIT:
            raise bad_request(f"logit_bias[{key}]: {value} is out of range (-100 to 100)", "logit_bias")
        out[token] = float(value)
    return out


def allowed_token_ids(ids: list[int] | None, limits: ContextLimits) -> list[int] | None:
    if ids is None:
        return None
    if not ids:
        raise bad_request(
            "allowed_token_ids: must not be empty (it would allow no token)", "allowed_token_ids"
        )
    for i, t in enumerate(ids):
        check_token(t, f"allowed_token_ids[{i}]", limits)
    return sorted(set(ids))


def bad_words(words: list[str] | None, model: ServedModel) -> list[list[int]]:
    """Each word as vLLM tokenizes it: alone, and after a space when that gives a different
    word token of the same length (so it is banned at the start and inside the text)."""
    out: list[list[int]] = []
    for i, word in enumerate(words or []):
        bare = model.encode(word.lstrip(), add_special_tokens=False)
        if not bare:
            raise bad_request(f"bad_words[{i}]: {word!r} tokenizes to no token", "bad_words")
        out.append(bare)
        spaced = model.encode(" " + word.lstrip(), add_special_tokens=False)
        if spaced and spaced[0] != bare[0] and len(spaced) == len(bare):
            out.append(spaced)
    if len(out) > MAX_BAD_WORDS:
        raise bad_request(
            f"bad_words: {len(out)} token sequences after tokenization; at most {MAX_BAD_WORDS}", "bad_words"
        )
    return out


def check_token(token_id: int, where: str, limits: ContextLimits) -> None:
    vocab = limits.vocab_size
    if not 0 <= token_id < vocab:
        raise bad_request(
            f"{where}: token id {token_id} is out of range: the model's vocabulary has "
            f"{vocab} tokens (ids 0 to {vocab - 1})",
            where.split("[")[0],
        )


def truncate(prompt: list[int], keep: int | None, side: str | None, limits: ContextLimits) -> list[int]:
    """vLLM's truncate_prompt_tokens: keep `keep` tokens (-1: max_model_len), dropping from
    the left (the start) unless truncation_side is 'right'."""
    if keep is None:
        return prompt
    if keep == -1:
        keep = limits.max_model_len
    if keep > limits.max_model_len:
        raise bad_request(
            f"truncate_prompt_tokens: {keep} is more than the model's maximum context length "
            f"({limits.max_model_len})",
            "truncate_prompt_tokens",
        )
    if len(prompt) <= keep:
        return prompt
    if keep == 0:
        raise bad_request(
            "truncate_prompt_tokens: 0 would leave an empty prompt; keep at least 1 token "
            "(-1: the model's maximum context length)",
            "truncate_prompt_tokens",
        )
    return prompt[:keep] if side == "right" else prompt[len(prompt) - keep :]
