"""One request's sampling state as the worker keeps it: its SamplingParams, its tokens (the
prompt, then what it generated) and its grammar's place. The engine appends to it; the
sampler, its masks and penalties, and prompt logprobs read it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.gpu_worker.grammar_masks import RowGrammar
from shared.messages import SamplingParams


@dataclass
class SamplingRow:
    """One request's state the sampler needs; the engine keeps one per request, and this
    is the one place its tokens live (the engine's forward pass reads them from here)."""

    params: SamplingParams
    token_ids: list[int]  # prompt, then what was generated so far
    num_prompt_tokens: int
    grammar: RowGrammar | None = None  # set for structured outputs; follows every appended token

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        """A copy: add a generated token with `append`."""
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def append(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        if self.grammar is not None:
            self.grammar.accept(token_id)

    def ahead(self, drafts: list[int]) -> list[SamplingRow]:
        """This row, then copies of it as it would be after each of `drafts` in turn: the
        rows that sample the positions of a speculated step. Everything that depends on the
        tokens before (penalties, bad words, min_tokens, a seeded draw's position, the
        grammar's state) is then as at that position. A grammar that refuses a draft keeps
        the place before it: that draft is rejected, so what follows it is never used. Every
        row gets a matcher of its own: the batch fill runs matchers on threads at once."""
        rows = [self]
        grammar = self.grammar
        for j, token_id in enumerate(drafts):
            if grammar is not None:
                forked = grammar.fork()
                grammar = forked if forked.try_accept(token_id) else grammar.fork()
            rows.append(
                SamplingRow(self.params, self.token_ids + drafts[: j + 1], self.num_prompt_tokens, grammar)
            )
        return rows


def row_column(values: list[int] | list[float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One value per row as a [B, 1] tensor, ready to broadcast against [B, vocab]."""
    return torch.tensor(values, dtype=dtype, device=device).unsqueeze(1)
