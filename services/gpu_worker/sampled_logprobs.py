"""The logprobs of the tokens a step sampled, for the rows whose SamplingParams ask
(`logprobs` N): the chosen token's and the N most likely alternatives'. Prompt tokens'
logprobs are prompt_logprobs.py's.
"""

from __future__ import annotations

import torch

from services.gpu_worker.grammar_step import GrammarStep
from services.gpu_worker.sampling_row import SamplingRow
from shared.messages import TokenLogprobs


def sampled_logprobs(
    raw: torch.Tensor, token_ids: torch.Tensor, rows: list[SamplingRow], grammar: GrammarStep | None
) -> list[TokenLogprobs | None]:
    """Raw logprobs (before the token masks, penalties, temperature and filters), as
    vLLM's default; but, as in vLLM, after the grammar's mask, which it applies to the
    model's logits before its sampler: alternatives are tokens the grammar allows.
    None for a row that did not ask."""
    out: list[TokenLogprobs | None] = [None] * len(rows)
    idx = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
    if not idx:
        return out
    logprobs = raw[idx].to(torch.float32)
    if grammar is not None:
        grammar.mask_rows(logprobs, idx)
    logprobs = logprobs.log_softmax(dim=-1)
    wanted = [min(max(n, 0), raw.shape[1]) for i in idx if (n := rows[i].params.logprobs) is not None]
    top_values, top_ids = logprobs.topk(max(wanted), dim=-1)
    chosen_ids = token_ids[idx]
    chosen = logprobs.gather(1, chosen_ids.unsqueeze(1)).squeeze(1)
    rows_out = zip(idx, wanted, chosen_ids.tolist(), chosen.tolist(), top_ids.tolist(), top_values.tolist())
    for i, n, token_id, logprob, ids, values in rows_out:
        out[i] = TokenLogprobs(token_id, logprob, list(zip(ids[:n], values[:n])))
    return out
