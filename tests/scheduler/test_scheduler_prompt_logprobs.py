"""Prompt logprobs in the scheduler, with a model-free worker that reports them as the
engine does: a request that asks takes no prefix-cache hit (but fills the cache for
others), its chunks are assembled onto its first output, whole and exactly once, through
chunked prefill, preemption, failed steps, migration and a scheduler restart."""

from __future__ import annotations

from collections import defaultdict

import msgspec

from services.scheduler.core import SchedulerCore
from services.scheduler.policy import Limits
from shared.messages import (
    PromptLogprobs,
    RequestOutput,
    SamplingParams,
    StepPlan,
    StepResult,
    SubmitRequest,
    TokenLogprobs,
)
from tests.scheduler.fake_worker import FakeWorker
from tests.scheduler.helpers import expected_tokens, run, step, submit


def fake_logprob(position: int, token: int) -> float:
    return -((position * 31 + token) % 1000) / 100.0


def expected_prompt_logprobs(prompt: list[int], top: int) -> list[TokenLogprobs]:
    return [
        TokenLogprobs(t, fake_logprob(q, t), [(t, fake_logprob(q, t))][:top])
        for q, t in enumerate(prompt)
        if q > 0
    ]


class PromptLogprobsWorker(FakeWorker):
    """Also reports prompt logprobs, chunk by chunk, for the rows whose sampling asks;
    `fail_steps`: indexes of plans that fail as a forward pass does (rows dropped)."""

    def __init__(self, worker_id: str, fail_steps: tuple[int, ...] = (), **kw):
        super().__init__(worker_id, **kw)
        self.asking: dict[str, tuple[list[int], int, int]] = {}  # rid -> (tokens, num prompt, top)
        self.fail_steps = set(fail_steps)
        self.results: list[StepResult] = []

    def execute(self, plan: StepPlan) -> StepResult:
        self.results.append(self._execute(plan))
        return self.results[-1]

    def _execute(self, plan: StepPlan) -> StepResult:
        for rid in plan.finished_ids:
            self.asking.pop(rid, None)
        for new in plan.new_requests:
            if new.sampling.prompt_logprobs is not None:
                self.asking[new.request_id] = (
                    new.token_ids,
                    new.num_prompt_tokens,
                    new.sampling.prompt_logprobs,
                )
        if len(self.plans) in self.fail_steps:
            self.plans.append(plan)
            for rid in [*plan.finished_ids, *plan.num_scheduled_tokens]:
                self.rows.pop(rid, None)
                self.asking.pop(rid, None)
            return StepResult(plan.step_id, self.worker_id, error="step failed: injected")
        computed = {n.request_id: n.num_computed_tokens for n in plan.new_requests}
        computed.update({rid: row["computed"] for rid, row in self.rows.items() if rid not in computed})
        result = super().execute(plan)
        chunks = {}
        for rid, count in plan.num_scheduled_tokens.items():
            if rid in self.asking:
                tokens, num_prompt, top = self.asking[rid]
                start, end = computed[rid] + 1, min(computed[rid] + count, num_prompt - 1) + 1
                if start < end:
                    chunks[rid] = PromptLogprobs(
                        start, expected_prompt_logprobs(tokens[:end], top)[start - 1 :]
                    )
        return msgspec.structs.replace(result, prompt_logprobs=chunks)


def _core(workers, limits=Limits(max_prefill_chunk=32)) -> SchedulerCore:
    core = SchedulerCore(limits)
    for w in workers:
        core.add_worker(w.register(), 0.0)
    return core


def _outputs(core: SchedulerCore, by_request=None) -> dict[str, list[RequestOutput]]:
    by_request = defaultdict(list) if by_request is None else by_request
    for _, out in core.outputs:
        assert out.index == sum(len(o.token_ids) for o in by_request[out.request_id]), "index off"
        by_request[out.request_id].append(out)
    core.outputs.clear()
    return by_request


def _delivered(outs: list[RequestOutput]) -> list[TokenLogprobs]:
    """The prompt logprobs of a request's outputs: on its first output only."""
    assert all(not o.prompt_logprobs for o in outs[1:]), "prompt logprobs after the first output"
    return outs[0].prompt_logprobs


def _prompt(core: SchedulerCore, rid: str) -> list[int]:
    return core.requests[rid].prompt_token_ids


def test_chunks_are_assembled_on_the_first_output():
    w = PromptLogprobsWorker("w0", num_blocks=128)
    core = _core([w])
    submit(core, "asks", 100, max_tokens=3, prompt_logprobs=2)
    submit(core, "one-token", 1, max_tokens=2, prompt_logprobs=2)
    submit(core, "finishes-at-once", 40, max_tokens=1, prompt_logprobs=0)
    submit(core, "plain", 50, max_tokens=3)
    prompts = {rid: _prompt(core, rid) for rid in core.requests}
    run(core, [w])
    outs = _outputs(core)
    assert sum(1 for p in w.plans if p.num_scheduled_tokens.get("asks", 0) > 1) == 4, "prefilled in 4 chunks"
    assert _delivered(outs["asks"]) == expected_prompt_logprobs(prompts["asks"], 2)
    assert [t for o in outs["asks"] for t in o.token_ids] == expected_tokens("asks", 100, 3)
    assert _delivered(outs["one-token"]) == [], "a 1-token prompt has no prompt logprobs"
    (only,) = outs["finishes-at-once"]
    assert only.finish_reason == "length"
    assert only.prompt_logprobs == expected_prompt_logprobs(prompts["finishes-at-once"], 0), (
        "on its one output"
    )
    assert all(not o.prompt_logprobs for o in outs["plain"])
    assert not core.requests


def test_no_prefix_cache_hit_for_them_but_they_fill_the_cache():
    w = PromptLogprobsWorker("w0", num_blocks=128)
    core = _core([w])
    shared = list(range(100, 164))  # 4 full blocks
    submit(core, "warm", 0, prompt=shared + [7], max_tokens=1)
    run(core, [w])
    pool = core.workers["w0"].pool
    queried = pool.prefix_queries
    submit(core, "asks", 0, prompt=shared + [8], max_tokens=1, prompt_logprobs=1)
    submit(core, "asks-too", 0, prompt=list(range(500, 564)) + [9], max_tokens=1, prompt_logprobs=1)
    submit(core, "shares-asks-too", 0, prompt=list(range(500, 564)) + [10], max_tokens=1)
    first = step(core, w)
    new = {n.request_id: n for n in first.new_requests}
    assert new["asks"].num_computed_tokens == 0, "the cached prefix is not reused"
    assert "shares-asks-too" not in new, "it waits for the prefix asks-too computes"
    run(core, [w])
    outs = _outputs(core)
    assert _delivered(outs["asks"]) == expected_prompt_logprobs(shared + [8], 1)
    assert outs["asks"][-1].usage.cached_tokens == 0
    assert outs["shares-asks-too"][-1].usage.cached_tokens == 64, "asks-too filled the cache for it"
    assert pool.prefix_queries == queried + 65, "only shares-asks-too looked the cache up"


def test_a_request_that_asks_does_not_wait_for_a_prefix_being_computed():
    w = PromptLogprobsWorker("w0", num_blocks=128)
    core = _core([w])
    shared = list(range(300, 364))
    submit(core, "plain", 0, prompt=shared + [1], max_tokens=1)
    submit(core, "asks", 0, prompt=shared + [2], max_tokens=1, prompt_logprobs=1)
    first = step(core, w)
    assert {n.request_id for n in first.new_requests} == {"plain", "asks"}


def test_a_prompt_recomputed_after_preemption_mid_prefill_is_delivered_once():
    # 6 blocks of 16: a (40 tokens) and b (80 tokens, asks) prefill side by side in chunks of
    # 16 until b's fourth block finds none free: b, the newer, is preempted mid-prompt, with
    # positions 1..48 already received, and recomputed from 0 once a is done.
    w = PromptLogprobsWorker("w0", num_blocks=6)
    core = _core([w], Limits(max_prefill_chunk=16))
    submit(core, "a", 40, max_tokens=12, arrival=0.0)
    submit(core, "b", 80, max_tokens=2, arrival=1.0, prompt_logprobs=1)
    prompt_b = _prompt(core, "b")
    outs = defaultdict(list)
    for _ in range(200):
        if not step(core, w):
            break
        _outputs(core, outs)
    sent = [n for p in w.plans for n in p.new_requests if n.request_id == "b"]
    assert core.counters.preemptions >= 1 and len(sent) >= 2
    assert all(n.num_computed_tokens == 0 and len(n.token_ids) == 80 for n in sent), (
        "preempted before its first token"
    )
    assert all(n.sampling.prompt_logprobs == 1 for n in sent), "still asking: nothing was delivered"
    reported = sum(len(r.prompt_logprobs["b"].entries) for r in w.results if "b" in r.prompt_logprobs)
    assert reported > 79, "the worker reported some positions twice"
    assert _delivered(outs["b"]) == expected_prompt_logprobs(prompt_b, 1)


def test_a_request_resumed_after_its_first_token_does_not_ask_again():
    w = PromptLogprobsWorker("w0", num_blocks=6)
    core = _core([w], Limits())
    submit(core, "a", 40, max_tokens=20, arrival=0.0)
    submit(core, "b", 40, max_tokens=20, arrival=1.0, prompt_logprobs=3)
    prompt_b = _prompt(core, "b")
    run(core, [w])
    sent = [n for p in w.plans for n in p.new_requests if n.request_id == "b"]
    assert len(sent) >= 2 and len(sent[-1].token_ids) > 40, "preempted after generating"
    assert sent[0].sampling.prompt_logprobs == 3
    assert all(n.sampling.prompt_logprobs is None for n in sent[1:])
    outs = _outputs(core)
    assert _delivered(outs["b"]) == expected_prompt_logprobs(prompt_b, 3)
    assert [t for o in outs["b"] for t in o.token_ids] == expected_tokens("b", 40, 20)


def test_failed_steps_and_migration_deliver_them_once_complete():
    a = PromptLogprobsWorker("a", fail_steps=(1,))
    b = PromptLogprobsWorker("b")
    core = _core([a])
    submit(core, "mid-prompt", 100, max_tokens=2, prompt_logprobs=1)
    submit(core, "after-first", 20, max_tokens=10, prompt_logprobs=1)
    prompts = {rid: _prompt(core, rid) for rid in core.requests}
    for _ in range(4):  # a chunk, a failed step, then the recomputation starts again
        step(core, a)
    outs = _outputs(core)
    assert core.counters.step_errors == 1 and outs["after-first"], "after-first has its first token"
    assert core.requests["mid-prompt"].num_computed_tokens < 100
    core.add_worker(b.register(), 0.0)
    core.remove_worker("a", "killed")
    run(core, [b])
    _outputs(core, outs)
    moved = {n.request_id: n for n in b.plans[0].new_requests}
    assert moved["mid-prompt"].num_computed_tokens == 0 and moved["mid-prompt"].sampling.prompt_logprobs == 1
    assert moved["after-first"].sampling.prompt_logprobs is None
    for rid, prompt in prompts.items():
        assert _delivered(outs[rid]) == expected_prompt_logprobs(prompt, 1), rid


def test_a_restarted_scheduler_replays_them_from_the_prompt():
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=1)
    submit_msg = SubmitRequest("r", list(range(1000, 1090)), params, "tcp://gateway", 0.0)
    old_worker = PromptLogprobsWorker("w0")
    first = _core([old_worker])
    first.add_request(submit_msg)
    step(first, old_worker)  # a chunk, then the scheduler is gone
    assert old_worker.results[0].prompt_logprobs["r"].start == 1
    assert not first.outputs
    w = PromptLogprobsWorker("w0")
    second = _core([w])
    second.add_request(submit_msg)
    run(second, [w])
    assert _delivered(_outputs(second)["r"]) == expected_prompt_logprobs(submit_msg.prompt_token_ids, 1)
