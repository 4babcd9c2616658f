"""The draft model of speculative decoding (method "draft_model"): a smaller model with the
target's tokenizer proposes a row's next tokens by greedy decoding, at the start of the step
that verifies them.

Its paged KV cache has the target's blocks: the same block ids and slots, so the scheduler's
block accounting covers both. A row's `draft_computed` counts its tokens whose K/V the draft
cache holds. The draft runs only on the rows the scheduler asks proposals of, so first it
catches up on what it has not seen (the whole prompt the first time, else the tokens emitted
since it last drafted), which also gives it the first proposal; then one pass per further
proposal. Of the proposals it ran through itself, those the target accepts stay valid in its
cache; the rest are overwritten later, as the target's rejected ones are.

    tokens:        t0 .. t(n-1) | d1 d2 .. dk          (n = the row's tokens, t(n-1) its last)
    pass 1:        t(draft_computed) .. t(n-1)  -> d1  (catch up)
    pass j > 1:    d(j-1)                       -> dj
    after a accepted: draft_computed = n + min(a, k - 1)

Greedy proposals are one token for sure, which is what the target's rejection sampling
assumes (shared/speculative.py): sampled outputs keep their distribution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from services.gpu_worker.batch import ScheduledRow, build_batch
from services.gpu_worker.device_clock import device_time
from services.gpu_worker.model import DecoderModel


class DraftRow(Protocol):
    block_ids: list[int]
    draft_computed: int

    @property
    def token_ids(self) -> list[int]: ...


@dataclass
class Drafts:
    tokens: list[list[int]]  # per row asked, its proposals
    ms: float  # its passes' wall time, the device's work included (device_clock.py)
    passes: int


class Drafter:
    def __init__(
        self,
        model: DecoderModel,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        block_size: int,
        name: str,
    ):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.name = name

    @torch.inference_mode()
    def propose(self, rows: list[DraftRow], counts: list[int]) -> Drafts:
        """counts[i] proposals after rows[i]'s last token (each row decoding: its last token
        not in any cache yet)."""
        t0 = device_time(self.model.device)
        proposals: list[list[int]] = [[] for _ in rows]
        live = [i for i, c in enumerate(counts) if c > 0]
        passes = 0
        while live:
            scheduled = []
            for i in live:
                r, tokens = rows[i], rows[i].token_ids + proposals[i]
                start = r.draft_computed if not proposals[i] else len(tokens) - 1
                scheduled.append(ScheduledRow(tokens, r.block_ids, start, len(tokens) - start))
            batch = build_batch(scheduled, self.block_size, self.model.device)
            hidden = self.model.forward(batch.input_ids, batch.positions, batch.meta, self.kv_caches)
            best = self.model.compute_logits(hidden[batch.last_token_index]).argmax(dim=-1).tolist()
            for k, s in enumerate(batch.order):
                i = live[s]
                if not proposals[i]:
                    rows[i].draft_computed = len(rows[i].token_ids)
                proposals[i].append(best[k])
            live = [i for i in live if len(proposals[i]) < counts[i]]
            passes += 1
        # Each pass's .tolist() waits for its kernels already; device_time keeps the time true
        # should a pass ever end without reading its result back.
        return Drafts(proposals, (device_time(self.model.device) - t0) * 1000.0, passes)

    @staticmethod
    def verified(row: DraftRow, proposed: int, accepted: int) -> None:
        """After the target kept `accepted` of the `proposed` tokens (row.token_ids as
        before them): the draft cache holds those of them it ran through, all but the last."""
        row.draft_computed += min(accepted, proposed - 1)
