"""The token masks a request sets in its SamplingParams, applied to a step's logits before
penalties and sampling: logit_bias (added), allowed_token_ids (every other id -inf),
bad_words (a banned word's last token -inf wherever the output so far ends with the rest of
it). Each is one batch-wide tensor op over the rows that set it; the grammar's mask is in
grammar_masks.py. Token ids are validated against the vocab before a row exists (engine).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from shared.messages import SamplingParams

if TYPE_CHECKING:
    from services.gpu_worker.sampler import SamplingRow


def has_token_masks(params: SamplingParams) -> bool:
    """Masks that can leave a row without any token (logit_bias only shifts logits)."""
    return params.allowed_token_ids is not None or bool(params.bad_words)


def mask_problem(params: SamplingParams, vocab_size: int) -> str | None:
    """What makes these masks unusable on this vocab (the gateway checks the user's values;
    this guards the worker's invariants), or None."""
    ids = [
        *params.logit_bias,
        *(params.allowed_token_ids or ()),
        *(t for word in params.bad_words for t in word),
    ]
    so = params.structured
    ids += [t for t in (so.think_end, so.think_open) if t != -1] if so is not None else []
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        return f"mask token ids {bad[:5]} out of range [0, {vocab_size})"
    if any(not word for word in params.bad_words):
        return "an empty bad word"
    return None


def apply_token_masks(work: torch.Tensor, rows: list[SamplingRow]) -> None:
    """logit_bias, then allowed_token_ids, then bad_words, in place on `work` ([rows, vocab], fp32)."""
    _add_logit_bias(work, rows)
    _keep_allowed(work, rows)
    _ban_bad_words(work, rows)


def _add_logit_bias(work: torch.Tensor, rows: list[SamplingRow]) -> None:
    row_idx, token_idx, bias = [], [], []
    for i, row in enumerate(rows):
        b = row.params.logit_bias
        row_idx += [i] * len(b)
        token_idx += b.keys()
        bias += b.values()
    if row_idx:
        index = (_ids(row_idx, work), _ids(token_idx, work))
        work.index_put_(index, torch.tensor(bias, dtype=work.dtype, device=work.device), accumulate=True)


def _keep_allowed(work: torch.Tensor, rows: list[SamplingRow]) -> None:
    idx = [i for i, row in enumerate(rows) if row.params.allowed_token_ids is not None]
    if not idx:
        return
    row_idx = [k for k, i in enumerate(idx) for _ in rows[i].params.allowed_token_ids]
    token_idx = [t for i in idx for t in rows[i].params.allowed_token_ids]
    banned = torch.ones(len(idx), work.shape[1], dtype=torch.bool, device=work.device)
    banned[_ids(row_idx, work), _ids(token_idx, work)] = False
    if len(idx) == len(rows):
        work.masked_fill_(banned, float("-inf"))
    else:
        work[idx] = work[idx].masked_fill_(banned, float("-inf"))


def _ban_bad_words(work: torch.Tensor, rows: list[SamplingRow]) -> None:
    """vLLM's rule: a word of one token is always banned; a longer one is banned when the
    generated tokens (not the prompt) end with all of it but its last token."""
    row_idx, token_idx = [], []
    for i, row in enumerate(rows):
        if not row.params.bad_words:
            continue
        tokens, generated = row.token_ids, row.num_output_tokens  # no copy of the output per step
        for word in row.params.bad_words:
            prefix = word[:-1]
            if len(prefix) <= generated and tokens[len(tokens) - len(prefix) :] == prefix:
                row_idx.append(i)
                token_idx.append(word[-1])
    if row_idx:
        work[_ids(row_idx, work), _ids(token_idx, work)] = float("-inf")


def _ids(values: list[int], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=like.device)
