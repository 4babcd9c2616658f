"""Seeded sampling: a seeded request draws the same tokens alone and in any batch, at any
vocabulary size, and after a preemption; its token depends only on its seed and position;
unseeded rows draw from torch's RNG; sampling leaves the caller's logits as they were.
"""

from __future__ import annotations

import pytest
import torch

from tests.gpu_worker.sampler_helpers import make_row, peaked_logits, sampler

# ---- seeded sampling -------------------------------------------------------------------


def run_seeded_stream(steps: int, vocab: int, with_batch: bool) -> list[int]:
    """The target request's tokens over `steps` steps, alone or among changing batch-mates
    (random, seeded, greedy), at a different position each step. Every row sees the same
    logits at a given step in both settings."""
    logits_rng = torch.Generator().manual_seed(42)
    target = make_row(seed=1234, temperature=0.8, top_k=20, top_p=0.9, presence_penalty=0.3)
    mates = [
        make_row(temperature=1.0),
        make_row(temperature=0.0, logprobs=2),
        make_row(seed=7, temperature=1.3, min_p=0.05),
        make_row(temperature=0.6, top_p=0.5, frequency_penalty=0.2),
        make_row(seed=1234, temperature=0.8),  # same seed, other logits and position
    ]
    torch.manual_seed(0)
    for step in range(steps):
        target_logits = torch.randn(1, vocab, generator=logits_rng) * 2
        rows = [target]
        if with_batch:
            present = mates[: 1 + step % len(mates)]
            position = step % (len(present) + 1)
            rows = present[:position] + [target] + present[position:]
        logits = torch.randn(len(rows), vocab) * 2
        logits[rows.index(target)] = target_logits[0]
        tokens = sampler(vocab)(logits, rows).token_ids
        for row, token in zip(rows, tokens):
            row.append(token)
    return target.output_token_ids


def test_seeded_request_gives_the_same_tokens_alone_and_in_a_batch():
    alone = run_seeded_stream(steps=25, vocab=64, with_batch=False)
    batched = run_seeded_stream(steps=25, vocab=64, with_batch=True)
    assert alone == batched
    assert len(set(alone)) > 5  # a real random stream, not a constant


# One row of each way a draw can go at vocab 16384: a nucleus among the first candidates
# (with and without ties), one past them, top-k alone, no top-k or top-p at all, and a
# nucleus too wide for any candidates.
LARGE_VOCAB_ROWS = [
    (dict(temperature=0.7, top_p=0.9), dict(head=12)),
    (dict(temperature=0.7, top_p=0.9), dict(head=12, step=0.5)),
    (dict(temperature=0.9, top_p=0.9), dict(head=150, top=3.0, low=2.5)),
    (dict(temperature=1.0, top_k=5), dict(head=12)),
    (dict(temperature=1.0, min_p=0.01), dict(head=12)),
    (dict(temperature=1.5, top_p=0.995, top_k=2500), dict(head=0)),
]


def test_seeded_tokens_do_not_depend_on_the_batch_at_a_large_vocab():
    """The same tokens alone and together over 12 positions, each target drawn alongside
    others of its width (first candidates, wider, whole vocab) and beside rows of another
    width (a top_k of 500), greedy and unseeded ones."""
    vocab, steps = 16384, 12
    targets = [make_row(seed=100 + i, **params) for i, (params, _) in enumerate(LARGE_VOCAB_ROWS)]
    logits = [
        [peaked_logits(vocab, seed=1000 * step + i, **shape) for i, (_, shape) in enumerate(LARGE_VOCAB_ROWS)]
        for step in range(steps)
    ]
    alone = [make_row(seed=100 + i, **params) for i, (params, _) in enumerate(LARGE_VOCAB_ROWS)]
    for step in range(steps):
        for i, row in enumerate(alone):
            row.append(sampler(vocab)(logits[step][i].unsqueeze(0), [row]).token_ids[0])
    mates = [
        make_row(seed=5, temperature=1.0, top_k=500),
        make_row(temperature=0.0),
        make_row(temperature=0.8, top_p=0.8),
    ]
    torch.manual_seed(0)
    for step in range(steps):
        mate_logits = [peaked_logits(vocab, head=30, seed=7 + 10 * step + j) for j in range(3)]
        rows = [mates[0], *targets[:3], *mates[1:], *targets[3:]]
        batch = torch.stack([mate_logits[0], *logits[step][:3], *mate_logits[1:], *logits[step][3:]])
        for row, token in zip(rows, sampler(vocab)(batch, rows).token_ids):
            row.append(token)
    assert [t.output_token_ids for t in targets] == [a.output_token_ids for a in alone]


def test_a_seeded_token_depends_only_on_its_seed_and_position():
    """After a preemption (or on another worker) the row is rebuilt from its tokens; the
    token at position n is the one the undisturbed stream drew there."""
    g = torch.Generator().manual_seed(8)
    steps = [torch.randn(1, 200, generator=g) * 2 for _ in range(12)]
    row = make_row(prompt=[1, 2], seed=9, temperature=1.0, top_p=0.95)
    for logits in steps:
        row.append(sampler(200)(logits, [row]).token_ids[0])
    undisturbed = row.output_token_ids
    for n in (0, 5, 11):
        resumed = make_row(prompt=[1, 2], output=undisturbed[:n], seed=9, temperature=1.0, top_p=0.95)
        batch = torch.cat([torch.randn(2, 200), steps[n]])
        rows = [make_row(seed=9, temperature=1.0), make_row(temperature=0.5), resumed]
        assert sampler(200)(batch, rows).token_ids[2] == undisturbed[n]


def test_seeds_and_positions_give_different_draws():
    flat = torch.zeros(1, 1000)

    def stream(seed: int, n: int = 100) -> list[int]:
        row = make_row(seed=seed)
        for _ in range(n):
            row.append(sampler(1000)(flat, [row]).token_ids[0])
        return row.output_token_ids

    one = stream(1)
    assert one == stream(1)
    assert len(set(one)) > 80  # 100 uniform draws from 1000 ids: about 95 distinct
    others = [stream(seed, 1)[0] for seed in range(100)]  # position 0 of 100 seeds
    assert len(set(others)) > 80
    # Any int seed works (the gateway's are int64, plus the choice index), and streams
    # from seeds a multiple of SplitMix64's gamma apart are not shifted copies of another.
    assert stream(-5, 3) == stream(2**64 - 5, 3)  # taken modulo 2^64
    shifted = stream(1 + 0x9E3779B97F4A7C15)
    assert sum(a == b for a, b in zip(one[1:], shifted)) < 5


def test_unseeded_rows_draw_from_torchs_rng():
    logits = torch.zeros(50, 100)

    def draw(seed: int) -> list[int]:
        torch.manual_seed(seed)
        return sampler(100)(logits, [make_row(temperature=1.0, top_p=0.99)] * 50).token_ids

    assert draw(3) == draw(3)
    assert draw(3) != draw(4)
    assert len(set(draw(3))) > 30


def test_sampling_leaves_the_logits_as_they_were():
    """Rows without masks or penalties are drawn from the caller's logits, not a copy."""
    logits = torch.stack(
        [peaked_logits(16384, seed=i, **shape) for i, (_, shape) in enumerate(LARGE_VOCAB_ROWS)]
    )
    before = logits.clone()
    rows = [make_row(seed=i, **params) for i, (params, _) in enumerate(LARGE_VOCAB_ROWS)]
    sampler(16384)(logits, rows)
    sampler(16384)(logits, rows[:1] + [make_row(temperature=0.0)] + rows[1:-1])
    assert torch.equal(logits, before)


def test_one_thread_and_two_draw_the_same_tokens():
    """On one CPU thread (each serving process's, and the tests': tests/conftest.py) the
    sampler takes a few rows at a time (16 at this vocab); on more, all at once. The draws
    are the same."""
    cases = LARGE_VOCAB_ROWS * 8  # 48 rows: three chunks
    logits = torch.stack([peaked_logits(16384, seed=i, **shape) for i, (_, shape) in enumerate(cases)])
    rows = [make_row(seed=i, logprobs=3, **params) for i, (params, _) in enumerate(cases)]
    threads = torch.get_num_threads()
    draws = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            draws.append(sampler(16384)(logits, rows))
    finally:
        torch.set_num_threads(threads)
    one, two = draws
    assert one.token_ids == two.token_ids
    for a, b in zip(one.logprobs, two.logprobs):
        assert [t for t, _ in a.top] == [t for t, _ in b.top]
        assert [v for _, v in a.top] == pytest.approx([v for _, v in b.top], abs=1e-5)
