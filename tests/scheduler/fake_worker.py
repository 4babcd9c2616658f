"""A model-free worker for scheduler tests: keeps rows exactly as the real engine does,
checks every plan against them (a scheduler bug shows up as an assertion here), and
"samples" a deterministic token wherever the real engine would sample."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from shared.messages import RegisterWorker, StepPlan, StepResult


def token_for(request_id: str, position: int, vocab: int = 1000) -> int:
    """Deterministic across runs (seeded, not hash(): PYTHONHASHSEED changes that), and never
    below 10 so it never hits the test EOS ids."""
    return random.Random(f"token/{request_id}/{position}").randrange(10, vocab)


@dataclass
class FakeWorker:
    worker_id: str
    num_blocks: int = 64
    block_size: int = 16
    max_model_len: int = 4096
    eos_token_ids: tuple[int, ...] = (0,)
    rows: dict[str, dict] = field(default_factory=dict)
    plans: list[StepPlan] = field(default_factory=list)
    eos_at: dict[str, int] = field(default_factory=dict)  # request_id -> output index that samples EOS

    def register(self) -> RegisterWorker:
        return RegisterWorker(
            self.worker_id,
            "fake",
            self.max_model_len,
            self.block_size,
            self.num_blocks,
            1000,
            list(self.eos_token_ids),
            "cpu",
            0,
        )

    def execute(self, plan: StepPlan) -> StepResult:
        self.plans.append(plan)
        for rid in plan.finished_ids:
            self.rows.pop(rid, None)
        for new in plan.new_requests:
            assert new.request_id not in self.rows, f"{new.request_id} sent twice as new"
            self.rows[new.request_id] = dict(
                tokens=len(new.token_ids),
                prompt=new.num_prompt_tokens,
                computed=new.num_computed_tokens,
                blocks=list(new.block_ids),
            )
        for cached in plan.cached_requests:
            row = self.rows[cached.request_id]
            assert row["computed"] == cached.num_computed_tokens, "scheduler and worker disagree"
            row["blocks"].extend(cached.new_block_ids)
        sampled = {}
        for rid, n in plan.num_scheduled_tokens.items():
            row = self.rows[rid]
            assert n >= 1 and row["computed"] + n <= row["tokens"]
            assert row["computed"] + n <= len(row["blocks"]) * self.block_size, "tokens beyond blocks"
            assert all(0 <= b < self.num_blocks for b in row["blocks"])
            row["computed"] += n
            if row["computed"] == row["tokens"]:
                index = row["tokens"] - row["prompt"]
                token = (
                    self.eos_token_ids[0] if self.eos_at.get(rid) == index else token_for(rid, row["tokens"])
                )
                sampled[rid] = token
                row["tokens"] += 1
        return StepResult(plan.step_id, self.worker_id, sampled_token_ids=sampled)
