"""Prompt logprobs: for a request that asks (`sampling.prompt_logprobs`), the logprob of
each prompt token its prefill chunk predicts, and the N most likely alternatives. Only
those requests' hidden rows go through the lm_head, a bounded slice at a time, so no
other request pays anything and a long prompt never holds all its logits at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from services.gpu_worker.sampling_row import SamplingRow
from shared.messages import PromptLogprobs, TokenLogprobs

# fp32 logits held at once: 32 Mi floats (128 MiB) bound one slice, e.g. 220 positions of a
# 152k vocab (Qwen) or all 2048 positions of a 16k one. The log_softmax doubles it briefly.
SLICE_ELEMENTS = 1 << 25


@dataclass
class PromptSpan:
    """One request's positions in this step that predict a prompt token: hidden rows
    [first_index, first_index + len(targets)) of the batch predict the prompt tokens at
    positions start, start + 1, …, which are `targets`."""

    request_id: str
    first_index: int
    start: int
    targets: list[int]
    num_top: int


def prompt_span(
    request_id: str, row: SamplingRow, computed: int, count: int, last_index: int
) -> PromptSpan | None:
    """The span of a row scheduled for tokens [computed, computed + count), whose last token
    is hidden row `last_index`, or None if it asks for nothing or predicts no prompt token
    here. Position p predicts token p + 1; only prompt tokens 1 .. P-1 are wanted (the
    last prompt position predicts the first generated token, which the sampler handles)."""
    num_top = row.params.prompt_logprobs
    end = min(computed + count, row.num_prompt_tokens - 1)  # exclusive end of predicting positions
    if num_top is None or end <= computed:
        return None
    return PromptSpan(
        request_id,
        first_index=last_index - count + 1,
        start=computed + 1,
        targets=row.token_ids[computed + 1 : end + 1],
        num_top=max(num_top, 0),
    )


def compute_prompt_logprobs(
    compute_logits: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    vocab_size: int,
    spans: list[PromptSpan],
) -> dict[str, PromptLogprobs]:
    """log_softmax in fp32 of the raw logits (no penalty, temperature or mask: as vLLM
    reports them) at every span's positions, SLICE_ELEMENTS of logits at a time."""
    rows = torch.cat([torch.arange(s.first_index, s.first_index + len(s.targets)) for s in spans]).to(
        hidden.device
    )
    targets = torch.tensor([t for s in spans for t in s.targets], dtype=torch.long, device=hidden.device)
    num_top = [s.num_top for s in spans for _ in s.targets]
    height = max(1, SLICE_ELEMENTS // vocab_size)
    entries: list[TokenLogprobs] = []
    for lo in range(0, len(num_top), height):
        hi = lo + height
        entries += _slice_entries(compute_logits(hidden[rows[lo:hi]]), targets[lo:hi], num_top[lo:hi])
    out, k = {}, 0
    for s in spans:
        out[s.request_id] = PromptLogprobs(s.start, entries[k : k + len(s.targets)])
        k += len(s.targets)
    return out


def _slice_entries(logits: torch.Tensor, targets: torch.Tensor, num_top: list[int]) -> list[TokenLogprobs]:
    """One entry per row: the target token's logprob and the row's own top num_top."""
    logprobs = logits.float().log_softmax(dim=-1)
    chosen = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
    width = min(max(num_top), logprobs.shape[1])
    if width == 0:
        return [TokenLogprobs(t, lp) for t, lp in zip(targets.tolist(), chosen)]
    top_values, top_ids = (x.tolist() for x in logprobs.topk(width, dim=-1))
    return [
        TokenLogprobs(t, lp, list(zip(ids[:n], values[:n])))
        for t, lp, ids, values, n in zip(targets.tolist(), chosen, top_ids, top_values, num_top)
    ]
