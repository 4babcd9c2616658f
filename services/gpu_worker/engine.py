"""Executes step plans: keeps one row per running request, applies the plan's deltas,
runs the forward pass over every scheduled token and samples where a request is due.

A plan is validated completely before anything changes, so a bad plan (unknown request,
out-of-range block, tokens beyond the blocks) is answered with an error and leaves the
worker exactly as it was. If the forward pass itself fails, the rows named in the plan
are dropped (their cache contents are unknown) and the scheduler must resend them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.gpu_worker.batch import ForwardBatch, ScheduledRow, build_batch
from services.gpu_worker.device_clock import device_time
from services.gpu_worker.draft_verification import StepSamples, read_samples, sample_positions
from services.gpu_worker.drafter import Drafter
from services.gpu_worker.grammar_masks import Grammars
from services.gpu_worker.logit_masks import mask_problem
from services.gpu_worker.model import DecoderModel
from services.gpu_worker.prompt_logprobs import compute_prompt_logprobs, prompt_span
from services.gpu_worker.sampler import Sampler
from services.gpu_worker.sampling_row import SamplingRow
from services.gpu_worker.tp_group import RankFailure
from shared.messages import NewRequest, PromptLogprobs, SamplingParams, StepPlan, StepResult, StepTimings


class PlanError(ValueError):
    """A step plan that contradicts the worker's state; the message says which part."""


@dataclass
class RequestRow:
    request_id: str
    block_ids: list[int]
    num_computed_tokens: int
    sampling: SamplingRow  # holds the tokens too
    draft_computed: int = 0  # its tokens in the draft model's cache (drafter.py)

    @property
    def token_ids(self) -> list[int]:
        return self.sampling.token_ids


class Engine:
    def __init__(
        self,
        model: DecoderModel,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        block_size: int,
        num_blocks: int,
        max_model_len: int,
        eos_token_ids: list[int],
        worker_id: str = "in-process",
        grammars: Grammars | None = None,
        drafter: Drafter | None = None,
    ):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_model_len = max_model_len
        self.worker_id = worker_id
        self.device = model.device
        self.sampler = Sampler(model.shape.vocab_size, eos_token_ids, model.device)
        self.grammars = grammars  # None: this engine refuses structured outputs
        self.drafter = drafter  # None: it verifies proposals, but drafts none
        self._draft_ms, self._draft_passes = 0.0, 0  # the current step's
        self.rows: dict[str, RequestRow] = {}

    def close(self) -> None:
        """Stops what the engine started (a tensor-parallel model's follower ranks)."""
        self.model.close()

    # ---- the one entry point ----------------------------------------------------------
    def execute(self, plan: StepPlan) -> StepResult:
        t0 = device_time(self.device)
        try:
            self._validate(plan)
        except PlanError as e:
            return StepResult(step_id=plan.step_id, worker_id=self.worker_id, error=f"invalid step plan: {e}")
        self._apply(plan)
        try:
            return self._run(plan, t0)
        except RankFailure:  # not this plan's fault: the worker cannot run any step, it must leave
            raise
        except Exception as e:  # noqa: BLE001 — reported to the scheduler, never fatal here
            named = set(plan.num_scheduled_tokens) | {r.request_id for r in plan.new_requests}
            for request_id in named:
                self.rows.pop(request_id, None)
            return StepResult(
                step_id=plan.step_id,
                worker_id=self.worker_id,
                error=f"step failed: {type(e).__name__}: {e}; dropped rows {sorted(named)}",
            )

    # ---- validation: nothing mutates here ------------------------------------------------
    def _validate(self, plan: StepPlan) -> None:
        finished = set(plan.finished_ids)
        live = {rid for rid in self.rows if rid not in finished}
        # Each request's tokens, computed tokens and blocks as the plan leaves them.
        tokens: dict[str, int] = {rid: len(self.rows[rid].token_ids) for rid in live}
        computed: dict[str, int] = {rid: self.rows[rid].num_computed_tokens for rid in live}
        blocks: dict[str, int] = {rid: len(self.rows[rid].block_ids) for rid in live}

        for new in plan.new_requests:
            rid = new.request_id
            if rid in tokens:
                raise PlanError(f"new request {rid!r} already has a row on this worker")
            self._check_new(new)
            tokens[rid], computed[rid] = len(new.token_ids), new.num_computed_tokens
            blocks[rid] = len(new.block_ids)

        for cached in plan.cached_requests:
            rid = cached.request_id
            if rid not in live:
                raise PlanError(f"cached request {rid!r} is unknown to this worker")
            if cached.num_computed_tokens != computed[rid]:
                raise PlanError(
                    f"request {rid!r}: plan says {cached.num_computed_tokens} computed tokens, "
                    f"worker has {computed[rid]}"
                )
            self._check_blocks(rid, cached.new_block_ids)
            blocks[rid] += len(cached.new_block_ids)

        self._check_drafts(plan, tokens, computed)
        for rid, count in plan.num_scheduled_tokens.items():
            if rid not in tokens:
                raise PlanError(f"scheduled request {rid!r} is unknown to this worker")
            end = computed[rid] + count
            if count < 1 or end > tokens[rid]:
                raise PlanError(
                    f"request {rid!r}: {count} tokens scheduled after {computed[rid]} computed, "
                    f"but it has {tokens[rid]} tokens"
                )
            if end > blocks[rid] * self.block_size:
                raise PlanError(f"request {rid!r}: {end} tokens need more than its {blocks[rid]} blocks")

    def _check_new(self, new: NewRequest) -> None:
        rid, n = new.request_id, len(new.token_ids)
        if n == 0 or not 0 < new.num_prompt_tokens <= n:
            raise PlanError(f"request {rid!r}: {n} token ids with num_prompt_tokens={new.num_prompt_tokens}")
        if n > self.max_model_len:
            raise PlanError(f"request {rid!r}: {n} tokens exceed max_model_len {self.max_model_len}")
        if not 0 <= new.num_computed_tokens < n:
            raise PlanError(f"request {rid!r}: num_computed_tokens {new.num_computed_tokens} not in [0, {n})")
        if any(not 0 <= t < self.model.shape.vocab_size for t in new.token_ids):
            raise PlanError(f"request {rid!r}: token id out of range [0, {self.model.shape.vocab_size})")
        self._check_sampling(rid, new.sampling)
        self._check_blocks(rid, new.block_ids)

    def _check_drafts(self, plan: StepPlan, tokens: dict[str, int], computed: dict[str, int]) -> None:
        """Proposed tokens, and the numbers to draft, each on a decoding row scheduled for them;
        `tokens` then counts the drafts, which the step verifies as its tokens."""
        if plan.num_draft_tokens and self.drafter is None:
            raise PlanError("draft tokens asked of a worker without a draft model")
        for rid in plan.num_draft_tokens.keys() & plan.draft_token_ids.keys():
            raise PlanError(f"request {rid!r}: both proposed tokens and a number to draft")
        asked = {rid: [0] * max(n, 0) for rid, n in plan.num_draft_tokens.items()}  # stand-ins, checked alike
        for rid, drafts in [*plan.draft_token_ids.items(), *asked.items()]:
            if rid not in tokens or plan.num_scheduled_tokens.get(rid) != 1 + len(drafts) or not drafts:
                raise PlanError(
                    f"request {rid!r}: {len(drafts)} drafts, but scheduled for "
                    f"{plan.num_scheduled_tokens.get(rid)} tokens (1 + drafts)"
                )
            if computed[rid] + 1 != tokens[rid]:
                raise PlanError(f"request {rid!r}: drafts for a request that is not decoding")
            if any(not 0 <= t < self.model.shape.vocab_size for t in drafts):
                raise PlanError(
                    f"request {rid!r}: draft token id out of range [0, {self.model.shape.vocab_size})"
                )
            if tokens[rid] + len(drafts) > self.max_model_len:
                raise PlanError(f"request {rid!r}: drafts run past max_model_len {self.max_model_len}")
            tokens[rid] += len(drafts)  # verified as tokens of this step

    def _check_sampling(self, rid: str, params: SamplingParams) -> None:
        problem = mask_problem(params, self.model.shape.vocab_size)
        if problem:
            raise PlanError(f"request {rid!r}: {problem}")
        if params.structured is not None and self.grammars is None:
            raise PlanError(f"request {rid!r}: structured output on an engine built without a tokenizer")

    def _check_blocks(self, rid: str, block_ids: list[int]) -> None:
        bad = [b for b in block_ids if not 0 <= b < self.num_blocks]
        if bad:
            raise PlanError(f"request {rid!r}: block ids {bad[:5]} out of range [0, {self.num_blocks})")

    # ---- applying deltas -----------------------------------------------------------------
    def _apply(self, plan: StepPlan) -> None:
        for rid in plan.finished_ids:
            self.rows.pop(rid, None)
        for new in plan.new_requests:
            params = new.sampling
            row = SamplingRow(params, list(new.token_ids), new.num_prompt_tokens)
            if params.structured is not None:  # resumed rows catch up on what they generated
                assert self.grammars is not None  # else _check_sampling refused the request
                row.grammar = self.grammars.row_grammar(params, row.output_token_ids)
            self.rows[new.request_id] = RequestRow(
                new.request_id, list(new.block_ids), new.num_computed_tokens, row
            )
        for cached in plan.cached_requests:
            self.rows[cached.request_id].block_ids.extend(cached.new_block_ids)

    # ---- forward + sample ------------------------------------------------------------------
    def _run(self, plan: StepPlan, t0: float) -> StepResult:
        scheduled = list(plan.num_scheduled_tokens.items())
        if not scheduled:
            return StepResult(step_id=plan.step_id, worker_id=self.worker_id)
        rows = [self.rows[rid] for rid, _ in scheduled]
        drafted = self._draft(plan)
        # A row with drafts runs its last token and the drafts after it, as a short chunk.
        drafts = [plan.draft_token_ids.get(rid) or drafted.get(rid, []) for rid, _ in scheduled]
        batch = build_batch(
            [
                ScheduledRow(r.token_ids + d if d else r.token_ids, r.block_ids, r.num_computed_tokens, n)
                for r, d, (_, n) in zip(rows, drafts, scheduled)
            ],
            self.block_size,
            self.device,
        )
        t1 = device_time(self.device)  # the batch's copies to the device are prepare time
        hidden = self.model.forward(batch.input_ids, batch.positions, batch.meta, self.kv_caches)

        # Only requests that reach the end of their tokens sample; a prefill chunk in the
        # middle of a prompt produces nothing. A row with drafts samples at each of its
        # 1 + len(drafts) positions: what the model chose after its last token and after
        # each draft, so the drafts it agrees with are accepted in order.
        due = [
            (k, i)
            for k, i in enumerate(batch.order)
            if rows[i].num_computed_tokens + scheduled[i][1] == len(rows[i].token_ids) + len(drafts[i])
        ]
        picks, sampling = sample_positions(
            due, rows, drafts, batch.last_token_index, bool(due and (plan.draft_token_ids or drafted))
        )
        logits = self.model.compute_logits(hidden[picks]) if due else None
        t2 = device_time(self.device)  # the forward pass and the logits have run
        samples = (
            read_samples(self.sampler(logits, sampling), due, rows, drafts)
            if logits is not None
            else StepSamples({}, {}, {}, {})
        )
        prompt_logprobs = self._prompt_logprobs(rows, scheduled, batch, hidden)
        self._advance(rows, scheduled, samples.accepted, samples.sampled, drafted)
        t3 = device_time(self.device)
        return StepResult(
            step_id=plan.step_id,
            worker_id=self.worker_id,
            sampled_token_ids=samples.sampled,
            logprobs=samples.logprobs,
            accepted_token_ids=samples.accepted,
            accepted_logprobs=samples.accepted_logprobs,
            draft_token_ids=drafted,
            prompt_logprobs=prompt_logprobs,
            timings=StepTimings(
                prepare_ms=_ms(t0, t1),
                forward_ms=_ms(t1, t2),
                sample_ms=_ms(t2, t3),
                total_ms=_ms(t0, t3),
                draft_ms=self._draft_ms,
                draft_passes=self._draft_passes,
            ),
        )

    def _advance(
        self,
        rows: list[RequestRow],
        scheduled: list[tuple[str, int]],
        accepted: dict[str, list[int]],
        sampled: dict[str, int],
        drafted: dict[str, list[int]],
    ) -> None:
        """Each row past what the step computed, with its accepted drafts and new token."""
        for r, (_, n) in zip(rows, scheduled):
            kept = accepted.get(r.request_id)
            if kept is None:
                r.num_computed_tokens += n
            else:  # its last token and the accepted drafts are in the cache; the rest is overwritten later
                r.num_computed_tokens += 1 + len(kept)
                if r.request_id in drafted:
                    Drafter.verified(r, len(drafted[r.request_id]), len(kept))
                for token in kept:
                    r.sampling.append(token)
            if r.request_id in sampled:
                r.sampling.append(sampled[r.request_id])

    def _draft(self, plan: StepPlan) -> dict[str, list[int]]:
        """The draft model's proposals for the rows the plan asks them of (prepare time)."""
        self._draft_ms, self._draft_passes = 0.0, 0
        if not plan.num_draft_tokens:
            return {}
        assert self.drafter is not None  # _validate
        ids = list(plan.num_draft_tokens)
        out = self.drafter.propose(
            [self.rows[rid] for rid in ids], [plan.num_draft_tokens[rid] for rid in ids]
        )
        self._draft_ms, self._draft_passes = out.ms, out.passes
        return dict(zip(ids, out.tokens))

    def _prompt_logprobs(
        self,
        rows: list[RequestRow],
        scheduled: list[tuple[str, int]],
        batch: ForwardBatch,
        hidden: torch.Tensor,
    ) -> dict[str, PromptLogprobs]:
        """For the rows whose sampling asks: every prompt token this step's chunk predicts.
        A row resumed after its first token gets no prompt_logprobs from the scheduler (it
        has them already); one recomputed mid-prompt reports again and the scheduler keeps
        one entry per position."""
        spans = [
            span
            for k, i in enumerate(batch.order)
            if (
                span := prompt_span(
                    rows[i].request_id,
                    rows[i].sampling,
                    rows[i].num_computed_tokens,
                    scheduled[i][1],
                    batch.last_token_index[k],
                )
            )
            is not None
        ]
        if not spans:
            return {}
        return compute_prompt_logprobs(self.model.compute_logits, hidden, self.model.shape.vocab_size, spans)


def _ms(start: float, end: float) -> float:
    return (end - start) * 1000.0
