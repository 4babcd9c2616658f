"""Rejection sampling of proposed tokens leaves a sampled request's output distribution
unchanged: on a tiny model held to four tokens a position (top_k=4), the first two tokens a
verified step emits are distributed as transformers' probabilities say, whether the
proposals are likely, unlikely or impossible (a chi-square test over the 16 pairs)."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import AutoModelForCausalLM

from shared.messages import CachedRequest, NewRequest, SamplingParams, StepPlan
from tests.gpu_worker.conftest import make_engine

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = [11, 305, 77, 1024, 9, 2048, 31, 500, 7, 64]
TOP_K = 4
SAMPLES = 1600  # requests, all with the same prompt, in batches
BATCH = 400
# The chi-square distribution with 15 degrees of freedom exceeds this with probability 1e-4:
# a correct sampler fails about once in 10,000 runs.
CHI2_15_AT_1E4 = 42.6
STEPS = itertools.count(1)


def _reference(model_dir) -> tuple[float, dict[int, torch.Tensor], dict[int, dict[int, torch.Tensor]]]:
    """A temperature that makes the four kept tokens' chances differ (by about e^2 from the
    first to the fourth), and transformers' probabilities of the first token and of the
    second after each first one: {token: p}."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def next_logits(tokens: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return model(torch.tensor([tokens])).logits[0, -1]

    first = next_logits(PROMPT)
    top = first.topk(TOP_K)
    temperature = float(top.values[0] - top.values[-1]) / 2

    def probs(logits: torch.Tensor) -> dict[int, float]:
        kept = logits.topk(TOP_K)
        return dict(zip(kept.indices.tolist(), (kept.values / temperature).softmax(-1).tolist()))

    p1 = probs(first)
    return temperature, p1, {y: probs(next_logits(PROMPT + [y])) for y in p1}


def _draw(engine, sampling: SamplingParams, drafts: list[int], n: int) -> list[tuple[int, int]]:
    """The first two tokens of `n` requests with PROMPT: its last token and `drafts` are
    verified in one step (a third step decodes the second token where the first draft was
    rejected)."""
    pairs: list[tuple[int, int]] = []
    for start in range(0, n, BATCH):
        ids = [f"r{i}" for i in range(start, min(n, start + BATCH))]
        blocks = {rid: [1 + k] for k, rid in enumerate(ids)}  # one 16-token block each
        news = [NewRequest(rid, list(PROMPT), len(PROMPT), sampling, blocks[rid]) for rid in ids]
        # The prompt but its last token: a chunk that samples nothing.
        engine.execute(
            StepPlan(
                next(STEPS), new_requests=news, num_scheduled_tokens={rid: len(PROMPT) - 1 for rid in ids}
            )
        )
        verified = engine.execute(
            StepPlan(
                next(STEPS),
                num_scheduled_tokens={rid: 1 + len(drafts) for rid in ids},
                draft_token_ids={rid: list(drafts) for rid in ids},
            )
        )
        emitted = {rid: [*verified.accepted_token_ids[rid], verified.sampled_token_ids[rid]] for rid in ids}
        short = [rid for rid in ids if len(emitted[rid]) < 2]
        if short:
            last = engine.execute(
                StepPlan(
                    next(STEPS),
                    cached_requests=[CachedRequest(rid, [], len(PROMPT)) for rid in short],
                    num_scheduled_tokens={rid: 1 for rid in short},
                )
            )
            for rid in short:
                emitted[rid].append(last.sampled_token_ids[rid])
        pairs += [(emitted[rid][0], emitted[rid][1]) for rid in ids]
        engine.execute(StepPlan(next(STEPS), finished_ids=ids))
    return pairs


def _chi_square(pairs: list[tuple[int, int]], p1: dict[int, float], p2: dict[int, dict[int, float]]) -> float:
    assert all(a in p1 and b in p2[a] for a, b in pairs), "a token outside the top 4 was emitted"
    n = len(pairs)
    counts = {(a, b): 0 for a in p1 for b in p2[a]}
    for pair in pairs:
        counts[pair] += 1
    return sum((counts[(a, b)] - n * p1[a] * p2[a][b]) ** 2 / (n * p1[a] * p2[a][b]) for a, b in counts)


def test_speculated_sampling_keeps_the_output_distribution(model_dirs):
    # Untied embeddings: a tied random model repeats its last token almost surely, which
    # would leave the second position nothing to test.
    model_dir = model_dirs["llama"]
    temperature, p1, p2 = _reference(model_dir)
    engine, _ = make_engine(model_dir)
    torch.manual_seed(0)  # unseeded requests draw from torch's generator: the same draws every run
    sampling = SamplingParams(temperature=temperature, top_k=TOP_K, max_tokens=8)
    likely = max(p1, key=p1.get)
    unlikely = min(p1, key=p1.get)
    outside = next(t for t in range(3, 4000) if t not in p1)
    cases = {
        "no drafts": [],
        "likely drafts": [likely, max(p2[likely], key=p2[likely].get)],
        "unlikely drafts": [unlikely, min(p2[unlikely], key=p2[unlikely].get)],
        "impossible draft": [outside],
    }
    for name, drafts in cases.items():
        # No drafts: the plain path, as the control (one token a step).
        pairs = _draw(engine, sampling, drafts, SAMPLES) if drafts else _plain_pairs(engine, sampling)
        stat = _chi_square(pairs, p1, p2)
        assert stat < CHI2_15_AT_1E4, f"{name}: chi-square {stat:.1f} over 16 pairs"
        if name == "likely drafts":
            # The test has power: proposals are often accepted, and always keeping them
            # would put every sample on one pair.
            accepted = sum(a == drafts[0] for a, _ in pairs) / len(pairs)
            assert accepted > 0.3, accepted
            keep_all = [(drafts[0], drafts[1])] * len(pairs)
            assert _chi_square(keep_all, p1, p2) > 10 * CHI2_15_AT_1E4


def _plain_pairs(engine, sampling: SamplingParams) -> list[tuple[int, int]]:
    """The same requests without proposals: prefill, then one decode."""
    pairs = []
    ids = [f"p{i}" for i in range(BATCH)]
    for _ in range(SAMPLES // BATCH):
        news = [NewRequest(rid, list(PROMPT), len(PROMPT), sampling, [1 + k]) for k, rid in enumerate(ids)]
        first = engine.execute(
            StepPlan(next(STEPS), new_requests=news, num_scheduled_tokens={rid: len(PROMPT) for rid in ids})
        )
        second = engine.execute(
            StepPlan(
                next(STEPS),
                cached_requests=[CachedRequest(rid, [], len(PROMPT)) for rid in ids],
                num_scheduled_tokens={rid: 1 for rid in ids},
            )
        )
        pairs += [(first.sampled_token_ids[rid], second.sampled_token_ids[rid]) for rid in ids]
        engine.execute(StepPlan(next(STEPS), finished_ids=ids))
    return pairs
