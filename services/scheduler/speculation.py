"""When speculation pays: how many proposed tokens a decoding request carries in a step.

Checking a proposed token costs the worker one more token of compute in the step; it
gains a token when it is accepted. A step's time is nearly `a + b * tokens`: `a` the
weights' read and the fixed costs (the whole step while decode is memory-bound), `b` the
compute of one token. A plain step of B decoding rows yields B tokens in `a + b * B`, so a
token is worth (a + b * B) / B of worker time, and a proposal pays while its chance of
being accepted is above

    theta = b * B / (a + b * B) = B / (a / b + B)

which is small for a few rows (on this repo's CPU, SmolLM2 fp32 at one row: a / b is
about 22, theta about 0.04) and nears 1 as the batch grows compute-bound. Each worker's
`StepCost` fits a and b to its recent decode steps; each request's `Acceptance` estimates
p, the chance that a proposed token is accepted when the ones before it were, from its
recent proposals. A request carries the j-th proposal while p ** j >= MARGIN * theta (the
margin covers what the fit does not see: the scheduler's and gateway's work per proposal and
token, on the same cores as the workers here): many while its text is being copied, none
while it writes anew, none where a step is near compute-bound; then one proposal now and then, to
notice when copying starts again: every PROBE_EVERY steps at a small theta, rarer as a
probe's cost (theta of a token) grows.

With a draft model each proposal also costs one of its passes, d ms, shared by the rows
drafting in the step; for B rows that adds d / (a + b * B) to theta (a pass, in tokens of
the step's worth, spread over its B rows' tokens). How often a draft model is right is
mostly the draft's own doing, so each worker also keeps its acceptance over all its
requests (forgetting slower): a request starts from it, and probes only while it says
proposals would pay, or once in WORKER_PROBE_EVERY steps without any (a probe there costs
the draft's catching up on the request's text, not a lookup).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.speculative import NgramIndex, SpeculativeConfig

# Before a worker's steps have shown their cost: a / b as for a model whose decode is
# memory-bound up to 16 tokens a step.
PRIOR_FIXED_PER_TOKEN = 16.0
# Steps of differing sizes needed to fit a and b, and how fast old steps are forgotten.
MIN_STEPS = 8
STEP_DECAY = 0.98
# A request's prior p (1 hit in 2 trials), and how fast its old proposals are forgotten
# (per proposed token judged): its text turns from copying to writing within a sentence.
PRIOR_HITS, PRIOR_TRIALS = 1.0, 2.0
ACCEPT_DECAY = 0.7
PROBE_EVERY = 8
WORKER_DECAY = 0.98
WORKER_PROBE_EVERY = 16 * PROBE_EVERY
# How fast a draft model's measured pass time forgets old passes.
DRAFT_DECAY = 0.9
# How much more a proposal must be likely to gain than it costs the worker. At 1.5, a step of
# many rows of a tiny model (theta near 0.9: `mixed` on `tiny`) carries none, where proposals
# accepted 93% of the time gained nothing measurable; one row of SmolLM2 (theta near 0.05)
# carries as many as with no margin.
MARGIN = 1.5


@dataclass
class StepCost:
    """One worker's step time as a + b * tokens, fitted by least squares to its decode
    steps, each weighing STEP_DECAY times less than the one after it."""

    sums: list[float] = field(default_factory=lambda: [0.0] * 5)  # weight, x, x^2, y, x*y
    draft_pass_ms: float = 0.0  # a draft model's pass, averaged over recent ones (0: none seen)

    def observe(self, tokens: int, ms: float) -> None:
        w, x, xx, y, xy = (STEP_DECAY * v for v in self.sums)
        self.sums = [w + 1.0, x + tokens, xx + tokens * tokens, y + ms, xy + tokens * ms]

    def observe_draft(self, ms_per_pass: float) -> None:
        seen = self.draft_pass_ms > 0.0
        self.draft_pass_ms = (
            DRAFT_DECAY * self.draft_pass_ms + (1 - DRAFT_DECAY) * ms_per_pass if seen else ms_per_pass
        )

    def _fit(self) -> tuple[float, float] | None:
        """(a, b) in ms, or None while too few steps, or all of one size (no slope to see)."""
        w, x, xx, y, xy = self.sums
        det = w * xx - x * x
        if w < MIN_STEPS or det < 0.25 * w * w:
            return None
        b = (w * xy - x * y) / det
        return (y - b * x) / w, b

    def fixed_per_token(self) -> float:
        """a / b: how many tokens' compute the fixed part of a step is worth."""
        fit = self._fit()
        if fit is None:
            return PRIOR_FIXED_PER_TOKEN
        a, b = fit
        if b <= 0.0:  # noise: more tokens looked free
            return 1e6
        return max(a, 0.0) / b

    def step_ms(self, tokens: int) -> float:
        """The time of a step of `tokens` decodes (the mean step's before a fit; 0: none seen)."""
        fit = self._fit()
        if fit is None or fit[1] <= 0.0:
            w, y = self.sums[0], self.sums[3]
            return y / w if w else 0.0
        return max(fit[0] + fit[1] * tokens, 0.0)

    def threshold(self, decoding_rows: int, drafting: bool = False) -> float:
        """theta for a step of `decoding_rows` decodes: the least chance of acceptance at
        which one more proposed token pays (`drafting`: each costs a draft model's pass too)."""
        n = max(decoding_rows, 1)
        theta = n / (self.fixed_per_token() + n)
        step = self.step_ms(n)
        if drafting and self.draft_pass_ms > 0.0 and step > 0.0:
            theta += self.draft_pass_ms / step
        return theta


@dataclass
class Acceptance:
    """A request's recent proposals as trials: each accepted token a success, the rejected
    one that ends a verification a failure (those after it were never judged); each trial
    weighs ACCEPT_DECAY times less than the one after it."""

    hits: float = PRIOR_HITS
    trials: float = PRIOR_TRIALS
    idle: int = 0  # decode steps since the policy last wanted proposals of it (a lookup may find none)
    ngrams: NgramIndex | None = None
    decay: float = ACCEPT_DECAY
    judged: bool = False  # any proposal of it verified yet

    @property
    def p(self) -> float:
        return self.hits / self.trials

    def start_from(self, p: float) -> None:
        """A prior of p in place of 1/2, until its own proposals are judged."""
        if not self.judged:
            self.hits = p * self.trials

    def record(self, proposed: int, accepted: int) -> None:
        self.judged = True
        for success in [True] * accepted + [False] * (accepted < proposed):
            self.hits = self.decay * self.hits + success
            self.trials = self.decay * self.trials + 1.0

    def may_probe(self, theta: float) -> bool:
        """For a worker's draft-model acceptance: whether its requests may probe."""
        return self.p >= MARGIN * theta or self.idle * max(1.0 - theta, 0.05) >= WORKER_PROBE_EVERY

    def wanted(self, room: int, theta: float, may_probe: bool = True) -> int:
        """How many proposals (at most `room`) pay this step; counts idle steps."""
        n, reach = 0, 1.0
        while n < room and reach * self.p >= MARGIN * theta:
            reach *= self.p
            n += 1
        if n == 0 and room > 0 and may_probe and self.idle * max(1.0 - theta, 0.05) >= PROBE_EVERY:
            n = 1
        self.idle = 0 if n else self.idle + 1
        return n

    def propose(self, token_ids: list[int], k: int, spec: SpeculativeConfig) -> list[int]:
        if self.ngrams is None:
            assert spec.prompt_lookup_min is not None and spec.prompt_lookup_max is not None
            self.ngrams = NgramIndex(spec.prompt_lookup_min, spec.prompt_lookup_max)
        return self.ngrams.propose(token_ids, k)
