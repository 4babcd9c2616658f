"""The scheduling policy, driven by hand-made step results from a model-free worker:
budgets, chunked prefill, admission, preemption, prefix reuse, priorities, aborts, stops
and worker loss."""

from __future__ import annotations

from services.scheduler.core import SchedulerCore
from services.scheduler.policy import Limits
from shared.messages import ErrorCode, FinishReason
from tests.scheduler.fake_worker import FakeWorker
from tests.scheduler.helpers import Outputs, expected_tokens, run, step, submit


def _core(limits=Limits(), workers=(), now=0.0):
    core = SchedulerCore(limits)
    for w in workers:
        core.add_worker(w.register(), now)
    return core


def test_budget_max_seqs_and_chunk_are_respected():
    w = FakeWorker("w0", num_blocks=256)
    core = _core(Limits(max_num_seqs=4, max_num_batched_tokens=64, max_prefill_chunk=32), [w])
    for i in range(10):
        submit(core, f"r{i}", 40, max_tokens=5)
    run(core, [w])
    assert w.plans
    for plan in w.plans:
        assert sum(plan.num_scheduled_tokens.values()) <= 64
        assert len(plan.num_scheduled_tokens) <= 4
        assert max(plan.num_scheduled_tokens.values(), default=0) <= 32
    out = Outputs().collect(core)
    assert all(out.tokens[f"r{i}"] == expected_tokens(f"r{i}", 40, 5) for i in range(10))
    assert {o.finish_reason for o in out.finish.values()} == {"length"}


def test_chunked_prefill_interleaves_with_running_decodes():
    w = FakeWorker("w0", num_blocks=512)
    core = _core(Limits(max_num_batched_tokens=256, max_prefill_chunk=128), [w])
    for i in range(3):
        submit(core, f"short{i}", 8, max_tokens=50)
    step(core, w)  # the short prompts prefill
    submit(core, "long", 1000, max_tokens=2)
    plans = [step(core, w) for _ in range(8)]
    for plan in plans:  # every step still decodes the three running requests...
        assert all(plan.num_scheduled_tokens[f"short{i}"] == 1 for i in range(3))
        assert plan.num_scheduled_tokens["long"] <= 128  # ...and the long prompt gets one chunk
    assert sum(p.num_scheduled_tokens["long"] for p in plans) == 1000
    assert core.requests["long"].output_token_ids, "sampled when its last chunk completed"


def test_admission_waits_for_free_blocks():
    # 8 blocks of 16 tokens: two 50-token requests (4 blocks each once decoding) fill it.
    w = FakeWorker("w0", num_blocks=8)
    core = _core(workers=[w])
    for i in range(3):
        submit(core, f"r{i}", 50, max_tokens=3)
    plan = step(core, w)
    assert set(plan.num_scheduled_tokens) == {"r0", "r1"}
    assert core.workers["w0"].pool.num_free == 0
    run(core, [w])
    out = Outputs().collect(core)
    assert len(out.finish) == 3 and core.counters.preemptions == 0
    assert core.workers["w0"].pool.num_free == 8


def test_preemption_frees_blocks_and_resumes_with_generated_tokens():
    # 6 blocks: two 40-token requests fit (3 blocks each) until decoding needs a 4th block.
    w = FakeWorker("w0", num_blocks=6)
    core = _core(workers=[w])
    submit(core, "a", 40, max_tokens=20, arrival=0.0)
    submit(core, "b", 40, max_tokens=20, arrival=1.0)
    run(core, [w])
    assert core.counters.preemptions >= 1
    dropped = [rid for p in w.plans for rid in p.finished_ids]
    assert "b" in dropped, "the newer request is the victim"
    resent = [n for p in w.plans for n in p.new_requests if n.request_id == "b"]
    assert len(resent) >= 2 and len(resent[-1].token_ids) > 40, "resumed with its generated tokens"
    out = Outputs().collect(core)
    assert out.tokens["a"] == expected_tokens("a", 40, 20)
    assert out.tokens["b"] == expected_tokens("b", 40, 20), "no token lost or repeated"
    assert core.workers["w0"].pool.num_free == 6


def test_prefix_cache_reuse_and_salt_isolation():
    w = FakeWorker("w0", num_blocks=64)
    core = _core(workers=[w])
    shared = list(range(100, 164))  # 4 full blocks
    submit(core, "first", 0, prompt=shared + [7, 8], max_tokens=2)
    run(core, [w])
    submit(core, "second", 0, prompt=shared + [9], max_tokens=2)
    submit(core, "salted", 0, prompt=shared + [9], max_tokens=2, salt="tenant-b")
    plan = step(core, w)
    new = {n.request_id: n for n in plan.new_requests}
    assert new["second"].num_computed_tokens == 64
    assert plan.num_scheduled_tokens["second"] == 1
    assert new["salted"].num_computed_tokens == 0
    run(core, [w])
    out = Outputs().collect(core)
    assert out.finish["second"].usage.cached_tokens == 64
    assert out.finish["salted"].usage.cached_tokens == 0
    pool = core.workers["w0"].pool
    assert pool.prefix_hits == 64 and pool.num_used == 0


def test_fully_cached_prompt_still_computes_its_last_token():
    w = FakeWorker("w0")
    core = _core(workers=[w])
    prompt = list(range(200, 232))  # exactly 2 blocks
    submit(core, "a", 0, prompt=prompt, max_tokens=1)
    run(core, [w])
    submit(core, "b", 0, prompt=prompt, max_tokens=1)
    plan = step(core, w)
    assert plan.new_requests[0].num_computed_tokens == 16
    assert plan.num_scheduled_tokens["b"] == 16


def test_priority_then_arrival_order():
    w = FakeWorker("w0")
    core = _core(Limits(max_num_seqs=1), [w])
    submit(core, "low", 8, priority=5, arrival=0.0)
    submit(core, "high", 8, priority=0, arrival=1.0)
    submit(core, "high-later", 8, priority=0, arrival=2.0)
    order = []
    for _ in range(50):
        plan = step(core, w, now=3.0)
        if plan is None:
            break
        order += [n.request_id for n in plan.new_requests]
    assert order == ["high", "high-later", "low"]


def test_aging_lets_an_old_low_priority_request_pass_a_flood():
    w = FakeWorker("w0")
    core = _core(Limits(max_num_seqs=1, aging_seconds=10.0), [w])
    submit(core, "old-low", 8, priority=1, arrival=0.0)
    for i in range(5):
        submit(core, f"flood{i}", 8, priority=0, arrival=20.0 + i)
    plan = step(core, w, now=25.0)  # waited 25 s: effective priority 1 - 2 = -1
    assert [n.request_id for n in plan.new_requests] == ["old-low"]


def test_aborts_waiting_running_and_in_flight():
    w = FakeWorker("w0")
    core = _core(Limits(max_num_seqs=1), [w])
    submit(core, "running", 8, max_tokens=100)
    submit(core, "waiting", 8)
    step(core, w)
    core.abort("waiting", "client disconnected")
    out = Outputs().collect(core)
    assert out.finish["waiting"].finish_reason == "abort"
    core.abort("running")
    plan = step(core, w)
    assert "running" in plan.finished_ids and not plan.num_scheduled_tokens
    assert core.workers["w0"].pool.num_used == 0

    submit(core, "inflight", 8, max_tokens=100)
    plan = core.next_plan("w0", 0.0, 0.0)
    core.abort("inflight")  # arrives while its step runs
    core.on_step_result(w.execute(plan))
    out.collect(core)
    assert out.finish["inflight"].finish_reason == "abort" and out.tokens["inflight"] == []
    assert core.next_plan("w0", 0.0, 0.0).finished_ids == ["inflight"]
    assert core.workers["w0"].pool.num_used == 0


def test_stop_conditions():
    w = FakeWorker("w0", max_model_len=64, eos_token_ids=(0, 3))
    w.eos_at = {"eos": 2, "ignored": 2, "min": 1}
    core = _core(workers=[w])
    submit(core, "eos", 8, max_tokens=10)
    submit(core, "ignored", 8, max_tokens=5, ignore_eos=True)
    submit(core, "maxlen", 60, max_tokens=10)
    stop_token = expected_tokens("stopid", 8, 3)[2]
    submit(core, "stopid", 8, max_tokens=10, stop_token_ids=[stop_token])
    run(core, [w])
    out = Outputs().collect(core)
    assert out.finish["eos"].finish_reason == "stop" and out.finish["eos"].stop_token_id == 0
    assert len(out.tokens["eos"]) == 3
    assert out.finish["ignored"].finish_reason == "length" and len(out.tokens["ignored"]) == 5
    assert out.finish["maxlen"].finish_reason == "length" and len(out.tokens["maxlen"]) == 4  # 60 + 4 = 64
    assert out.finish["stopid"].finish_reason == "stop" and out.tokens["stopid"][-1] == stop_token


def test_worker_loss_migrates_requests_without_losing_tokens():
    a, b = FakeWorker("a"), FakeWorker("b")
    core = _core(workers=[a, b])
    for i in range(6):
        submit(core, f"r{i}", 20 + i, max_tokens=12)
    for _ in range(5):
        step(core, a)
        step(core, b)
    on_a = [r.request_id for r in core.workers["a"].running]
    assert on_a, "the router spread the requests"
    core.remove_worker("a", "killed")
    run(core, [b])
    out = Outputs().collect(core)
    for i in range(6):
        assert out.tokens[f"r{i}"] == expected_tokens(f"r{i}", 20 + i, 12)
    assert core.counters.migrations == len(on_a)
    assert core.workers["b"].pool.num_used == 0


def test_requests_wait_for_a_worker_and_bad_input_is_refused():
    core = SchedulerCore()
    assert submit(core, "early", 8)  # no worker yet: it waits
    assert not submit(core, "early", 8) and not submit(core, "empty", 0)
    (to_dup, dup), (_, empty) = core.outputs
    core.outputs.clear()
    assert to_dup == "tcp://gateway" and dup.request_id == "early" and "duplicate" in dup.error
    assert empty.request_id == "empty" and "empty" in empty.error
    for refused in (dup, empty):
        assert refused.finish_reason == FinishReason.ERROR and refused.error_code == ErrorCode.INVALID_REQUEST
    assert [e["error"] for e in core.errors] == [
        f"request 'early' refused: {dup.error}",
        "request 'empty' refused: empty prompt",
    ]
    assert list(core.requests) == ["early"], "the original is undisturbed"
    w = FakeWorker("late")
    core.add_worker(w.register(), 0.0)
    run(core, [w])
    assert Outputs().collect(core).finish["early"].finish_reason == "length"
    core.on_step_result(w.execute(core.next_plan("late", 0, 0) or _empty_plan()))  # stale: ignored


def _empty_plan():
    from shared.messages import StepPlan

    return StepPlan(999)


def test_requests_sharing_a_prefix_that_is_being_computed_wait_for_it():
    """Arriving together, only the first computes the shared prefix; the others are
    admitted once it is cached and reuse all of it (the ideal hit rate)."""
    w = FakeWorker("w0", num_blocks=256)
    core = _core(Limits(max_num_batched_tokens=2048, max_prefill_chunk=32), [w])
    shared = list(range(300, 364))  # 4 blocks, computed in 2 chunks of 32
    for i in range(8):
        submit(core, f"r{i}", 0, prompt=shared + [i, i + 1], max_tokens=2)
    first = step(core, w)
    assert [n.request_id for n in first.new_requests] == ["r0"], "the others wait for r0's prefix"
    run(core, [w])
    out = Outputs().collect(core)
    assert all(out.finish[f"r{i}"].usage.cached_tokens == 64 for i in range(1, 8))
    assert core.workers["w0"].pool.prefix_hits == 7 * 64


def test_unrelated_requests_are_not_held_back_by_a_prefix_being_computed():
    w = FakeWorker("w0", num_blocks=256)
    core = _core(Limits(max_prefill_chunk=32), [w])
    submit(core, "long", 0, prompt=list(range(300, 428)), max_tokens=1)
    submit(core, "other", 0, prompt=list(range(900, 940)), max_tokens=1)
    first = step(core, w)
    assert {n.request_id for n in first.new_requests} == {"long", "other"}
