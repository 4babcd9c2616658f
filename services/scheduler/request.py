"""A request as the scheduler tracks it, from arrival to its one finish.

The scheduler is the only owner of a request's logical state: its tokens, its blocks on
the worker it runs on, how many of its tokens are in that worker's cache, and why it
stopped. After its arrival it moves between the waiting list, a worker's running list
and its states only through transitions.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.scheduler.block_pool import hash_blocks
from services.scheduler.speculation import Acceptance
from shared.messages import (
    ErrorCode,
    FinishReason,
    PromptLogprobs,
    RequestStatus,
    SamplingParams,
    SubmitRequest,
    TokenLogprobs,
)


@dataclass(eq=False)  # identity semantics: requests live in lists and sets
class Request:
    submit: SubmitRequest  # what the gateway sent: id, prompt, sampling, reply_to, priority …
    entry_id: str = ""  # the Redis stream entry to acknowledge when it finishes

    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.QUEUED
    worker_id: str | None = None  # the worker it runs on; None while it waits (for any worker)
    block_ids: list[int] = field(default_factory=list)
    new_block_ids: list[int] = field(default_factory=list)  # appended since the last plan
    num_cached_blocks: int = 0  # leading blocks already registered in the prefix cache
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prefix-cache hit at first admission (reported in usage)
    on_worker: bool = False  # the worker holds a row for it
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    finish_reason: FinishReason | None = None
    error_code: ErrorCode | None = None
    error: str | None = None
    _hashes: dict[int, list[bytes]] = field(default_factory=dict, repr=False)  # see block_hashes_for
    # Prompt logprobs received so far, by the position of the token they are for: a chunk
    # computed again (after a preemption or a failed step) overwrites, never duplicates.
    prompt_logprobs: dict[int, TokenLogprobs] = field(default_factory=dict, repr=False)
    acceptance: Acceptance = field(default_factory=Acceptance, repr=False)  # its speculation so far

    # What the gateway sent (SubmitRequest), read through.
    @property
    def request_id(self) -> str:
        return self.submit.request_id

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.submit.prompt_token_ids

    @property
    def sampling(self) -> SamplingParams:
        return self.submit.sampling

    @property
    def reply_to(self) -> str:
        return self.submit.reply_to

    @property
    def arrival_time(self) -> float:
        return self.submit.arrival_time

    @property
    def priority(self) -> int:
        return self.submit.priority

    @property
    def cache_salt(self) -> str | None:
        return self.submit.cache_salt

    @property
    def queue_timeout_s(self) -> float | None:
        return self.submit.queue_timeout_s

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def needs_prompt_logprobs(self) -> bool:
        """It asked for prompt logprobs and has not delivered them yet (they go out with its
        first token). Such a request computes its whole prompt: no prefix-cache hit, which
        would skip exactly those positions. Once delivered, a resumed request is plain."""
        return self.sampling.prompt_logprobs is not None and not self.output_token_ids

    def add_prompt_logprobs(self, chunk: PromptLogprobs) -> None:
        assert chunk.start >= 1 and chunk.start + len(chunk.entries) <= len(self.prompt_token_ids), (
            f"{self.request_id}: prompt logprobs for positions {chunk.start}..+{len(chunk.entries)} "
            f"of a {len(self.prompt_token_ids)}-token prompt"
        )
        for k, entry in enumerate(chunk.entries):
            self.prompt_logprobs[chunk.start + k] = entry

    def take_prompt_logprobs(self) -> list[TokenLogprobs]:
        """The whole prompt's logprobs (positions 1 .. P-1), for its first output; the
        worker computed every position, so a gap is a bug."""
        num_prompt = len(self.prompt_token_ids)
        missing = [p for p in range(1, num_prompt) if p not in self.prompt_logprobs]
        assert not missing, f"{self.request_id}: no prompt logprobs for positions {missing[:10]}"
        entries = [self.prompt_logprobs[p] for p in range(1, num_prompt)]
        self.prompt_logprobs = {}  # delivered: nothing will ask for them again
        return entries

    def block_hashes_for(self, block_size: int) -> list[bytes]:
        """Chained hashes of its full blocks of `block_size` tokens (as vLLM's block_hasher),
        cached per block size: tokens are only appended, so they hold wherever it moves. A
        function of its tokens and salt, so predicates and choosers may call it. Read-only."""
        hashes = self._hashes.get(block_size, [])
        if len(hashes) < self.num_tokens // block_size:
            hashes = self._hashes[block_size] = hash_blocks(
                self.all_token_ids, block_size, self.cache_salt, prior=hashes
            )
        return hashes


def check_stop(req: Request, eos_token_ids: list[int], max_model_len: int) -> FinishReason | None:
    """Why `req` must stop after its newest token, or None. The order matters: a stop
    token wins over reaching max_tokens on the same token (OpenAI reports "stop")."""
    token = req.output_token_ids[-1]
    params = req.sampling
    stop_token = (token in eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids
    if stop_token and len(req.output_token_ids) >= params.min_tokens:
        return FinishReason.STOP
    if len(req.output_token_ids) >= params.max_tokens or req.num_tokens >= max_model_len:
        return FinishReason.LENGTH
    return None
