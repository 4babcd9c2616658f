"""The penalties a request's SamplingParams set on tokens it has seen: the repetition
penalty (HF/vLLM) over prompt and output, the OpenAI frequency and presence penalties over
the output. Applied to the rows that set one, batch-wide, after the token masks.
"""

from __future__ import annotations

from itertools import chain

import torch

from services.gpu_worker.sampling_row import SamplingRow, row_column
from shared.messages import SamplingParams


def has_penalties(params: SamplingParams) -> bool:
    return (
        params.presence_penalty != 0.0 or params.frequency_penalty != 0.0 or params.repetition_penalty != 1.0
    )


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """Repetition penalty (HF/vLLM: over prompt and generated tokens, a positive logit
    is divided by it, a negative one multiplied), then the OpenAI frequency and presence
    penalties (over generated tokens only: frequency x count, presence once). In place."""
    vocab, device = logits.shape[1], logits.device
    params = [row.params for row in rows]
    output_counts = token_counts([row.output_token_ids for row in rows], vocab, device)
    if any(p.repetition_penalty != 1.0 for p in params):
        prompt_counts = token_counts([row.prompt_token_ids for row in rows], vocab, device)
        seen = (prompt_counts > 0) | (output_counts > 0)
        penalty = row_column([p.repetition_penalty for p in params], torch.float32, device)
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits.copy_(torch.where(seen, penalized, logits))
    frequency = row_column([p.frequency_penalty for p in params], torch.float32, device)
    presence = row_column([p.presence_penalty for p in params], torch.float32, device)
    logits.sub_(frequency * output_counts + presence * (output_counts > 0))


def token_counts(token_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[len(token_lists), vocab] float counts, built with one scatter_add for the batch."""
    flat = torch.tensor(list(chain.from_iterable(token_lists)), dtype=torch.long, device=device)
    lengths = torch.tensor([len(t) for t in token_lists], dtype=torch.long, device=device)
    rows = torch.repeat_interleave(torch.arange(len(token_lists), device=device), lengths)
    counts = torch.zeros(len(token_lists) * vocab, dtype=torch.float32, device=device)
    counts.scatter_add_(0, rows * vocab + flat, torch.ones_like(flat, dtype=torch.float32))
    return counts.view(len(token_lists), vocab)
