"""A test-side stand-in for the scheduler: hands out blocks, builds StepPlans (chunked
prefill, joins mid-decode, prefix reuse, preemption) and collects sampled tokens.

Deliberately simple and separate from services/scheduler, so engine tests do not depend
on the production policy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from shared.messages import CachedRequest, NewRequest, SamplingParams, StepPlan, StepResult

GREEDY = SamplingParams(temperature=0.0)


@dataclass
class DriverRequest:
    request_id: str
    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams
    output: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    computed: int = 0
    on_worker: bool = False
    new_blocks: list[int] = field(default_factory=list)
    done: bool = False

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output


class PlanDriver:
    def __init__(
        self,
        execute: Callable[[StepPlan], StepResult],
        block_size: int,
        num_blocks: int,
        eos_token_ids: list[int] = (),
        chunk_size: int = 1 << 30,
    ):
        self.execute = execute
        self.block_size = block_size
        self.free = list(range(1, num_blocks))  # block 0 stays unused, as a real scheduler may
        self.refs: dict[int, int] = {}  # shared prefix blocks are freed by their last user
        self.eos = set(eos_token_ids)
        self.chunk_size = chunk_size
        self.requests: dict[str, DriverRequest] = {}
        self.finished_ids: list[str] = []
        self.step_id = 0
        self.results: list[StepResult] = []

    def add(
        self,
        request_id: str,
        prompt: list[int],
        max_tokens: int,
        sampling: SamplingParams = GREEDY,
        prefix_of: str | None = None,
        prefix_blocks: int = 0,
    ) -> None:
        """`prefix_of`: reuse that request's first `prefix_blocks` full blocks as a cache hit."""
        r = DriverRequest(request_id, list(prompt), max_tokens, sampling)
        if prefix_of is not None:
            donor = self.requests[prefix_of]
            assert (
                donor.tokens[: prefix_blocks * self.block_size] == r.prompt[: prefix_blocks * self.block_size]
            )
            r.block_ids = donor.block_ids[:prefix_blocks]
            for b in r.block_ids:
                self.refs[b] += 1
            r.computed = prefix_blocks * self.block_size
        self.requests[request_id] = r

    def preempt(self, request_id: str) -> None:
        """Recompute-style preemption: drop the worker's row and the blocks; keep the output."""
        r = self.requests[request_id]
        self._release(r)
        r.computed, r.on_worker, r.new_blocks = 0, False, []
        self.finished_ids.append(request_id)

    def step(self, only: list[str] | None = None) -> StepResult:
        new, cached, scheduled = [], [], {}
        for r in self.requests.values():
            if r.done or (only is not None and r.request_id not in only):
                continue
            count = min(self.chunk_size, len(r.tokens) - r.computed)
            self._grow(r, r.computed + count)
            scheduled[r.request_id] = count
            if not r.on_worker:
                new.append(
                    NewRequest(
                        r.request_id, r.tokens, len(r.prompt), r.sampling, list(r.block_ids), r.computed
                    )
                )
                r.on_worker = True
            else:
                cached.append(CachedRequest(r.request_id, r.new_blocks, r.computed))
            r.new_blocks = []
        plan = StepPlan(self.step_id, new, cached, scheduled, self.finished_ids)
        self.step_id += 1
        self.finished_ids = []
        result = self.execute(plan)
        assert result.error is None, result.error
        self.results.append(result)
        for rid, count in scheduled.items():
            r = self.requests[rid]
            r.computed += count
            if rid in result.sampled_token_ids:
                token = result.sampled_token_ids[rid]
                r.output.append(token)
                if len(r.output) >= r.max_tokens or (token in self.eos and not r.sampling.ignore_eos):
                    r.done = True
                    self._release(r)
                    self.finished_ids.append(rid)
        return result

    def run(self, max_steps: int = 10_000) -> dict[str, list[int]]:
        for _ in range(max_steps):
            if all(r.done for r in self.requests.values()):
                break
            self.step()
        if self.finished_ids:  # tell the worker to drop the last finished rows
            self.step(only=[])
        return {rid: r.output for rid, r in self.requests.items()}

    def _grow(self, r: DriverRequest, num_tokens: int) -> None:
        while len(r.block_ids) * self.block_size < num_tokens:
            block = self.free.pop(0)
            self.refs[block] = 1
            r.block_ids.append(block)
            if r.on_worker:
                r.new_blocks.append(block)

    def _release(self, r: DriverRequest) -> None:
        for b in r.block_ids:
            self.refs[b] -= 1
            if self.refs[b] == 0:
                self.free.append(b)
        r.block_ids = []


def assert_batch_matches_hf(
    engine,
    info,
    model_dir,
    prompts: list[list[int]],
    max_tokens,
    chunk_size: int,
    what: str,
    ignore_eos: bool = False,
) -> list:
    """All `prompts` as one continuous batch on `engine` (prefill chunks of `chunk_size`),
    each greedy output checked against transformers' by hf_reference's rule; returns
    transformers' references. `max_tokens`: one for all, or one per prompt."""
    from tests.gpu_worker.hf_reference import assert_greedy_matches, hf_greedy

    limits = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    expected = hf_greedy(model_dir, prompts, limits, ignore_eos=ignore_eos)
    driver = PlanDriver(
        engine.execute, info.block_size, info.num_blocks, info.eos_token_ids, chunk_size=chunk_size
    )
    for i, (prompt, n) in enumerate(zip(prompts, limits)):
        driver.add(f"r{i}", prompt, n, SamplingParams(temperature=0.0, ignore_eos=ignore_eos, max_tokens=n))
    outputs = driver.run()
    for i, want in enumerate(expected):
        assert_greedy_matches(outputs[f"r{i}"], want, f"{what} r{i}")
    return expected
