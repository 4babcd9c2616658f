"""Speculative decoding's verification in the worker: a row with drafts samples at each of
its 1 + len(drafts) positions, each as the row will be with the drafts before it as its
tokens; the drafts its samples agree with, in order, are accepted, and the sample after
the last of them is the step's new token (the rule: shared/speculative.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, cast

from services.gpu_worker.sampler import SamplerOutput
from services.gpu_worker.sampling_row import SamplingRow
from shared.messages import TokenLogprobs


class VerifiedRow(Protocol):
    request_id: str
    sampling: SamplingRow


@dataclass
class StepSamples:
    """What a step's samples give each due request, as StepResult carries it."""

    sampled: dict[str, int]
    logprobs: dict[str, TokenLogprobs]
    accepted: dict[str, list[int]]  # rows with drafts only
    accepted_logprobs: dict[str, list[TokenLogprobs]]


def sample_positions(
    due: list[tuple[int, int]],
    rows: Sequence[VerifiedRow],
    drafts: list[list[int]],
    last_token_index: list[int],
    speculative: bool,
) -> tuple[list[int], list[SamplingRow]]:
    """The hidden rows to sample (`due`: (batch index, row index) of each request at the end
    of its tokens) and the sampling row for each. A row with drafts samples at its last
    token and after each draft, each position sampled as the row will be with the drafts
    before it as its tokens: what one step per token would draw."""
    if speculative:
        picks = [
            p for k, i in due for p in range(last_token_index[k] - len(drafts[i]), last_token_index[k] + 1)
        ]
        return picks, [s for _, i in due for s in rows[i].sampling.ahead(drafts[i])]
    # the common step: one position per row
    return [last_token_index[k] for k, _ in due], [rows[i].sampling for _, i in due]


def read_samples(
    out: SamplerOutput, due: list[tuple[int, int]], rows: Sequence[VerifiedRow], drafts: list[list[int]]
) -> StepSamples:
    """Each due row's new token and logprobs from `out` (sampled at sample_positions'), and
    for a row with drafts the ones accepted: those before the first its samples disagree with."""
    sampled: dict[str, int] = {}
    logprobs: dict[str, TokenLogprobs] = {}
    accepted: dict[str, list[int]] = {}
    accepted_logprobs: dict[str, list[TokenLogprobs]] = {}
    at = 0
    for _, i in due:
        rid, d = rows[i].request_id, drafts[i]
        n_ok = next((j for j, t in enumerate(d) if out.token_ids[at + j] != t), len(d)) if d else 0
        sampled[rid] = out.token_ids[at + n_ok]
        if (chosen := out.logprobs[at + n_ok]) is not None:
            logprobs[rid] = chosen
        if d:
            accepted[rid] = d[:n_ok]
            if out.logprobs[at] is not None:  # then at each of the row's positions: one params
                accepted_logprobs[rid] = cast("list[TokenLogprobs]", out.logprobs[at : at + n_ok])
        at += 1 + len(d)
    return StepSamples(sampled, logprobs, accepted, accepted_logprobs)
