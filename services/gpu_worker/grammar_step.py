"""One step's grammar masks for its constrained rows, kept beside the sampler's other
masks: added to the logits before the draw, to the raw logits of sampled logprobs (so that
alternatives are tokens the grammar allows), and alone to a row its other masks left
without any token.
"""

from __future__ import annotations

import torch

from services.gpu_worker.logit_masks import below_min_tokens, has_token_masks
from services.gpu_worker.sampling_row import SamplingRow


class GrammarStep:
    """The grammar masks of one step: `additive[k]` is for row `idx[k]`."""

    def __init__(self, idx: list[int], additive: torch.Tensor):
        self.idx, self.additive = idx, additive

    def mask_rows(self, logits: torch.Tensor, row_ids: list[int]) -> None:
        """Adds the masks to `logits`, whose row j is the step's row `row_ids[j]`."""
        where = {i: k for k, i in enumerate(self.idx)}
        pairs = [(j, where[i]) for j, i in enumerate(row_ids) if i in where]
        if pairs:
            targets, sources = zip(*pairs)
            logits[list(targets)] += self.additive[list(sources)]

    def rescue(self, work: torch.Tensor, raw: torch.Tensor, rows: list[SamplingRow]) -> None:
        """A constrained row that its other masks left without any token gets the grammar's
        mask alone on its raw logits: the grammar wins where they clash. vLLM does so for
        min_tokens, which would ban the stop tokens that a complete grammar allows alone;
        here also for allowed_token_ids and bad_words, which otherwise force a token
        outside the grammar."""
        suspects = [
            k for k, i in enumerate(self.idx) if has_token_masks(rows[i].params) or below_min_tokens(rows[i])
        ]
        if not suspects:
            return
        at = [self.idx[k] for k in suspects]
        dead = torch.isneginf(work[at]).all(dim=1).tolist()
        for k, i, is_dead in zip(suspects, at, dead):
            if is_dead:
                work[i] = raw[i].to(torch.float32) + self.additive[k]
