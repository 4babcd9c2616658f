"""Prompt logprobs through the real scheduler and worker processes: every prompt token's
logprob equals transformers' log_softmax on the same weights (fp32, within 1e-3), also for
a prompt whose prefix is cached (the hit is not taken); they arrive whole on the first
output exactly once when a worker is killed mid-run; a restarted scheduler replays them,
whole, at index 0 (where a gateway drops what it already has)."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conveyor.tiny_model import make_model
from shared import messages as m
from tests.stack import Stack

pytestmark = pytest.mark.slow

TOP = 2
TOLERANCE = 1e-3
MAX_TOKENS = 500  # still running, every one, when the kill comes 20 tokens in (24 could all end first)


SCHEDULER_ARGS = ("--max-prefill-chunk", "32")


@dataclass
class Workload:
    model_dir: Path
    shared: list[int]  # a prefix cached before the others arrive
    asks: dict[str, list[int]]  # request id -> prompt, asking for prompt logprobs
    reference: dict[str, torch.Tensor]  # transformers' [P, vocab] log_softmax of each


@pytest.fixture(scope="module")
def workload(tmp_path_factory) -> Workload:
    model_dir = make_model(tmp_path_factory.mktemp("model"), preset="tiny", num_hidden_layers=2, seed=8)
    rng = random.Random(3)
    shared = [rng.randrange(3, 4096) for _ in range(64)]  # 4 blocks
    asks = {f"asks{i}": [rng.randrange(3, 4096) for _ in range(n)] for i, n in enumerate([1, 2, 17, 45, 100])}
    asks["asks-cached-prefix"] = shared + [rng.randrange(3, 4096) for _ in range(9)]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()
    with torch.inference_mode():
        reference = {
            rid: model(torch.tensor([p])).logits[0].float().log_softmax(dim=-1) for rid, p in asks.items()
        }
    return Workload(model_dir, shared, asks, reference)


@contextmanager
def _running(redis_url: str, workload: Workload, log_dir: Path, workers: list[str]) -> Iterator[Stack]:
    """A scheduler and `workers`, the workload submitted (after "warm" cached the shared
    prefix), tokens flowing."""
    stack = Stack(redis_url, workload.model_dir, log_dir)
    try:
        stack.start_scheduler(*SCHEDULER_ARGS)
        for name in workers:
            stack.start_worker(name)
        stack.wait_workers(set(workers))
        stack.submit("warm", workload.shared + [5], max_tokens=1)
        stack.wait_finished(["warm"])
        for rid, prompt in workload.asks.items():
            stack.submit(rid, prompt, max_tokens=MAX_TOKENS, ignore_eos=True, prompt_logprobs=TOP)
            stack.submit(f"plain-{rid}", prompt, max_tokens=MAX_TOKENS, ignore_eos=True)
        _wait_tokens(stack, 20)
        yield stack
    finally:
        stack.stop()


def _assert_first_output_carries_them(
    outs: list[m.RequestOutput], prompt: list[int], reference: torch.Tensor
):
    first = next(o for o in outs if o.token_ids)
    assert first.index == 0
    assert all(not o.prompt_logprobs for o in outs if o is not first and o.index > 0), "sent twice"
    entries = first.prompt_logprobs
    assert [e.token_id for e in entries] == prompt[1:]
    for q, e in enumerate(entries, start=1):
        assert abs(e.logprob - reference[q - 1, prompt[q]].item()) < TOLERANCE, (q, e.logprob)
        want = reference[q - 1].topk(TOP).values.tolist()
        assert all(abs(lp - w) < TOLERANCE for (_, lp), w in zip(e.top, want)) and len(e.top) == TOP


def _wait_tokens(stack: Stack, n: int, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while sum(len(t) for t in stack.tokens.values()) < n:
        assert time.monotonic() < deadline, stack.log_tail()
        stack.collect(0.05)


def test_a_worker_killed_mid_run_still_delivers_them_once(redis_server, workload, tmp_path):
    with _running(redis_server.url, workload, tmp_path, ["w1", "w2"]) as stack:
        assert len(stack.final) < 1 + 2 * len(workload.asks), "killed while requests were still running"
        stack.kill("w1")
        stack.wait_finished([*workload.asks, *(f"plain-{rid}" for rid in workload.asks)])
        for rid, prompt in workload.asks.items():
            _assert_first_output_carries_them(stack.outputs[rid], prompt, workload.reference[rid])
            assert len(stack.tokens[rid]) == MAX_TOKENS
            assert stack.final[rid].usage.cached_tokens == 0, "computed over the whole prompt"
            assert sum(1 for o in stack.outputs[rid] if o.prompt_logprobs) == (len(prompt) > 1), (
                "exactly once"
            )
            assert all(not o.prompt_logprobs for o in stack.outputs[f"plain-{rid}"])


def test_a_restarted_scheduler_replays_them_whole(redis_server, workload, tmp_path):
    with _running(redis_server.url, workload, tmp_path, ["w1"]) as stack:
        stack.kill("scheduler")
        stack.procs["scheduler"].wait(timeout=30)
        stack.start_scheduler(*SCHEDULER_ARGS, name="scheduler-2")
        stack.wait_finished([*workload.asks, *(f"plain-{rid}" for rid in workload.asks)])
        replayed = 0
        for rid, prompt in workload.asks.items():
            firsts = [o for o in stack.outputs[rid] if o.index == 0]
            replayed += len(firsts) > 1
            for first in firsts:  # the original and any replay: each whole
                _assert_first_output_carries_them([first], prompt, workload.reference[rid])
        assert replayed, "some request had its first token before the restart"
