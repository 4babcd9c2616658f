"""Driving a SchedulerCore by hand in tests: submit, step fake workers, collect outputs."""

from __future__ import annotations

import random
from collections import defaultdict

from services.scheduler.core import SchedulerCore
from shared.messages import SamplingParams, StepPlan, SubmitRequest
from tests.scheduler.fake_worker import FakeWorker, token_for


def submit(
    core: SchedulerCore,
    rid: str,
    prompt_len: int,
    max_tokens: int = 4,
    *,
    priority: int = 0,
    arrival: float = 0.0,
    prompt: list[int] | None = None,
    salt: str | None = None,
    **sampling,
) -> bool:
    """Returns whether the core accepted it. The prompt is seeded by `rid`, so a failing
    example replays whatever PYTHONHASHSEED is."""
    if prompt is None:
        rng = random.Random(f"prompt/{rid}")
        prompt = [rng.randrange(1000, 6000) for _ in range(prompt_len)]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, **sampling)
    return core.add_request(SubmitRequest(rid, prompt, params, "tcp://gateway", arrival, priority, salt))


def step(core: SchedulerCore, worker: FakeWorker, now: float = 0.0) -> StepPlan | None:
    plan = core.next_plan(worker.worker_id, now, now)
    if plan is not None:
        core.on_step_result(worker.execute(plan))
    return plan


def run(core: SchedulerCore, workers: list[FakeWorker], now: float = 0.0, max_steps: int = 10_000) -> None:
    for _ in range(max_steps):
        if not any([step(core, w, now) for w in workers if w.worker_id in core.workers]):
            return
    raise AssertionError("did not settle")


class Outputs:
    """Everything the core sent to gateways, per request, checked for exactly-once finish."""

    def __init__(self):
        self.tokens: dict[str, list[int]] = defaultdict(list)
        self.logprobs: dict[str, list] = defaultdict(list)  # of requests that ask for them
        self.finish: dict[str, object] = {}

    def collect(self, core: SchedulerCore) -> Outputs:
        for _, out in core.outputs:
            assert out.request_id not in self.finish, f"{out.request_id}: output after its finish"
            assert out.index == len(self.tokens[out.request_id]), f"{out.request_id}: index off"
            self.tokens[out.request_id].extend(out.token_ids)
            if out.logprobs:
                assert len(out.logprobs) == len(out.token_ids), (
                    f"{out.request_id}: one logprob entry per token"
                )
                self.logprobs[out.request_id].extend(out.logprobs)
            if out.finish_reason is not None:
                self.finish[out.request_id] = out
        core.outputs.clear()
        return self


def expected_tokens(rid: str, prompt_len: int, n: int) -> list[int]:
    return [token_for(rid, prompt_len + i) for i in range(n)]
