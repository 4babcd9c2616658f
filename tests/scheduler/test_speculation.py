"""When speculation pays (services/scheduler/speculation.py): the step cost fitted from a
worker's steps, the threshold it gives for a batch, and a request's proposals following
its recent acceptance."""

from __future__ import annotations

import pytest

from services.scheduler.speculation import (
    PRIOR_FIXED_PER_TOKEN,
    PROBE_EVERY,
    WORKER_DECAY,
    WORKER_PROBE_EVERY,
    Acceptance,
    StepCost,
)


def _fitted(a: float, b: float, sizes) -> StepCost:
    cost = StepCost()
    for tokens in sizes:
        cost.observe(tokens, a + b * tokens)
    return cost


def test_the_step_cost_is_fitted_from_steps_of_differing_sizes():
    memory_bound = _fitted(56.0, 2.5, [1, 5, 3, 1, 2, 5, 4, 1, 5, 2] * 3)
    assert memory_bound.fixed_per_token() == pytest.approx(56.0 / 2.5, rel=1e-6)
    assert memory_bound.threshold(1) == pytest.approx(1 / 23.4, rel=1e-6)
    # A compute-bound worker (a big batch of a small model): proposals must be near-certain.
    compute_bound = _fitted(2.0, 1.0, [60, 64, 70, 64, 80, 64, 66, 72, 64, 68] * 3)
    assert compute_bound.threshold(64) > 0.95
    # The threshold grows with the batch.
    assert memory_bound.threshold(1) < memory_bound.threshold(8) < memory_bound.threshold(64) < 1


def test_without_spread_or_enough_steps_the_prior_holds():
    assert StepCost().fixed_per_token() == PRIOR_FIXED_PER_TOKEN
    assert _fitted(56.0, 2.5, [1] * 50).fixed_per_token() == PRIOR_FIXED_PER_TOKEN, "no slope to see"
    assert _fitted(56.0, 2.5, [1, 5, 2]).fixed_per_token() == PRIOR_FIXED_PER_TOKEN, "too few steps"
    # Noise that makes more tokens look free leaves tokens free, never a negative cost.
    assert _fitted(50.0, -1.0, [1, 5, 3, 1, 2, 5, 4, 1, 5, 2]).threshold(4) < 0.01


def test_proposals_follow_a_request_s_recent_acceptance():
    acc = Acceptance()
    assert acc.wanted(5, 0.04) == 4, "p = 0.5 at first: 0.5 ** 4 >= 1.5 * 0.04 > 0.5 ** 5"
    assert acc.wanted(5, 0.4) == 0, "nothing pays in a compute-bound step"
    for _ in range(6):  # it copies: every proposal accepted
        acc.record(4, 4)
    assert acc.p > 0.9 and acc.wanted(5, 0.05) == 5 and acc.wanted(2, 0.05) == 2
    assert acc.wanted(5, 0.7) == 0, "not even a near-certain proposal, at break-even with the margin"
    for _ in range(6):  # it writes anew: every proposal rejected at once
        acc.record(4, 0)
    assert acc.p < 0.15 and acc.wanted(5, 0.2) == 0


def test_a_request_that_stopped_proposing_probes_now_and_then():
    acc = Acceptance()
    for _ in range(10):
        acc.record(4, 0)
    theta = 0.5
    asked = [acc.wanted(4, theta) for _ in range(5 * PROBE_EVERY)]
    probes = [i for i, n in enumerate(asked) if n]
    assert asked[probes[0]] == 1 and len(probes) == 2, asked
    assert probes[1] - probes[0] == 2 * PROBE_EVERY + 1, "at theta 0.5, every 2 * PROBE_EVERY steps"
    # A probe that is accepted brings the proposals back.
    for _ in range(4):
        acc.record(1, 1)
    assert acc.wanted(4, 0.1) >= 1


def test_a_draft_model_s_pass_raises_the_threshold_by_its_share_of_the_step():
    cost = _fitted(50.0, 2.0, [1, 5, 3, 1, 2, 5, 4, 1, 5, 2] * 3)
    plain = cost.threshold(1)
    assert cost.threshold(1, drafting=True) == plain, "no pass measured yet: nothing added"
    cost.observe_draft(13.0)
    assert cost.threshold(1, drafting=True) == pytest.approx(plain + 13.0 / 52.0, rel=1e-6)
    cost.observe_draft(23.0)  # later passes weigh in
    assert 13.0 < cost.draft_pass_ms < 23.0


def test_a_worker_s_draft_acceptance_starts_its_requests_and_gates_their_probes():
    """A draft that is rarely right stops proposing for every request, new ones included,
    probing only once in WORKER_PROBE_EVERY steps; one that is often right starts them high."""
    useless = Acceptance(decay=WORKER_DECAY)
    for _ in range(40):
        useless.record(3, 0)
    theta = 0.05
    assert not useless.may_probe(theta)
    fresh = Acceptance()
    fresh.start_from(useless.p)
    assert [fresh.wanted(5, theta, useless.may_probe(theta)) for _ in range(5 * PROBE_EVERY)] == [
        0
    ] * 5 * PROBE_EVERY
    useless.idle = WORKER_PROBE_EVERY * 2
    assert useless.may_probe(theta) and fresh.wanted(5, theta, True) == 1, "the worker's rare probe"
    good = Acceptance(decay=WORKER_DECAY)
    for _ in range(40):
        good.record(3, 3)
    started = Acceptance()
    started.start_from(good.p)
    assert good.may_probe(theta) and started.wanted(5, theta, good.may_probe(theta)) == 5
    started.record(5, 0)
    started.start_from(good.p)  # its own trials now count, not the worker's
    assert started.p < good.p
