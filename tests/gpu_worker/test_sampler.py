"""The sampler against hand computations and distributions: greedy, temperature, top-k,
top-p, min-p, the three penalties, min_tokens, raw logprobs, and seeded streams that do
not depend on the batch around them.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from services.gpu_worker.draw import apply_top_k_top_p, candidate_topk
from services.gpu_worker.penalties import apply_penalties
from services.gpu_worker.sampler import Sampler
from services.gpu_worker.sampling_row import SamplingRow
from shared.messages import SamplingParams

CPU = torch.device("cpu")
EOS = 5


def make_row(prompt=(), output=(), seed=None, **params) -> SamplingRow:
    return SamplingRow(SamplingParams(seed=seed, **params), [*prompt, *output], len(prompt))


def sampler(vocab: int = 8) -> Sampler:
    return Sampler(vocab, [EOS], CPU)


def sample_many(logits: list[float], n: int, **params) -> list[int]:
    """n independent draws: n seeded rows (seeds 0..n-1) over the same logits."""
    rows = [make_row(seed=s, **params) for s in range(n)]
    batch = torch.tensor(logits).expand(n, -1).contiguous()
    return sampler(len(logits))(batch, rows).token_ids


def log(probs: list[float]) -> list[float]:
    return [math.log(p) for p in probs]


# ---- greedy and temperature ------------------------------------------------------------


def test_greedy_is_argmax_on_fast_and_slow_paths():
    logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(0))
    expected = logits.argmax(dim=-1).tolist()
    fast = sampler(50)(logits, [make_row(temperature=0.0) for _ in range(16)])
    # logprobs forces the general path; top-k/top-p must not change a greedy pick.
    slow_rows = [make_row(temperature=0.0, logprobs=1, top_k=3, top_p=0.5) for _ in range(16)]
    slow = sampler(50)(logits, slow_rows)
    assert fast.token_ids == expected and fast.logprobs == [None] * 16
    assert slow.token_ids == expected


def test_padded_vocab_is_sampled_over_all_columns():
    logits = torch.zeros(1, 12)
    logits[0, 11] = 5.0  # a padding column past the tokenizer's 8 ids
    assert sampler(8)(logits, [make_row(temperature=0.0)]).token_ids == [11]


@pytest.mark.parametrize("temperature", [1e-2, 1e-7, 1e-40])
def test_temperature_near_zero_is_greedy(temperature):
    # Gaps of at least 0.5 between logits: at T=0.01 the runner-up has odds ~e^-50.
    # At 1e-40 dividing would turn every positive logit into inf, so it must be greedy.
    logits = torch.tensor([0.0, 2.0, 1.0, 3.5, -1.0, 2.5])
    torch.manual_seed(0)
    out = sampler(6)(logits.expand(300, -1), [make_row(temperature=temperature)] * 300)
    assert set(out.token_ids) == {3}


def test_top_k_one_is_always_argmax():
    logits = torch.randn(64, 40, generator=torch.Generator().manual_seed(1))
    rows = [make_row(seed=s, temperature=2.0, top_k=1) for s in range(64)]
    assert sampler(40)(logits, rows).token_ids == logits.argmax(dim=-1).tolist()


# ---- filters restrict the support ------------------------------------------------------


def test_top_k_restricts_support_to_the_k_most_likely():
    logits = [0.3, 0.9, 0.1, 0.8, 0.0, 0.7, 0.2, 0.4]
    assert set(sample_many(logits, 400, top_k=3)) == {1, 3, 5}


@pytest.mark.parametrize(
    "top_p, nucleus",
    [(0.7, {1, 3}), (0.9, {1, 3, 2}), (0.01, {1}), (0.0, {1}), (1.0, {0, 1, 2, 3})],
)
def test_top_p_restricts_support_to_the_nucleus(top_p, nucleus):
    # Unsorted on purpose: the filter sorts and must scatter back to the right ids.
    probs = [0.05, 0.5, 0.15, 0.3]
    assert set(sample_many(log(probs), 600, top_p=top_p)) == nucleus


@pytest.mark.parametrize("min_p, kept", [(0.2, {0, 1, 2}), (0.5, {0, 1}), (0.0, {0, 1, 2, 3})])
def test_min_p_drops_tokens_below_a_fraction_of_the_top(min_p, kept):
    probs = [0.5, 0.3, 0.15, 0.05]
    assert set(sample_many(log(probs), 600, min_p=min_p)) == kept


def test_filters_apply_per_row_in_a_mixed_batch():
    probs = [0.05, 0.5, 0.15, 0.3]
    configs = [dict(top_k=2), dict(top_p=0.01), dict(), dict(min_p=0.5), dict(temperature=0.0)]
    supports = [set() for _ in configs]
    batch = torch.tensor(log(probs)).expand(len(configs), -1)
    for step in range(300):
        rows = [make_row(seed=step * 10 + i, **c) for i, c in enumerate(configs)]
        for i, token in enumerate(sampler(4)(batch, rows).token_ids):
            supports[i].add(token)
    assert supports == [{1, 3}, {1}, {0, 1, 2, 3}, {1, 3}, {1}]


def reference_kept(row: list[float], top_k: int, top_p: float) -> set[int]:
    """The top-k then top-p survivors, one token at a time in float64, and any token tied
    with the last one kept."""
    order = sorted(range(len(row)), key=lambda i: -row[i])
    if 0 < top_k < len(row):
        order = order[:top_k]
    weights = [math.exp(row[i] - row[order[0]]) for i in order]
    kept, mass_before = set(), 0.0
    for i, w in zip(order, weights):
        if mass_before >= top_p * sum(weights):
            break
        kept.add(i)
        mass_before += w
    last = min(row[i] for i in kept)
    return kept | {i for i, x in enumerate(row) if x == last}


# Flat rows at vocab 3000 give nuclei of thousands of tokens.
@pytest.mark.parametrize("vocab", [50, 3000])
def test_top_k_top_p_keep_exactly_the_reference_set(vocab):
    scales = torch.tensor([[0.1], [0.5], [1.0], [2.0], [4.0], [0.1], [1.0], [3.0]])
    logits = torch.randn(8, vocab, generator=torch.Generator().manual_seed(vocab)) * scales
    ks = [0, 5, 0, 40, 0, 2000, 0, 1]
    ps = [0.9, 1.0, 0.5, 0.8, 0.95, 0.99, 1.0, 0.3]
    top_k = torch.tensor([[k if 0 < k < vocab else vocab] for k in ks])
    filtered = logits.clone()
    apply_top_k_top_p(filtered, top_k, torch.tensor([[p] for p in ps]))
    for i in range(8):
        kept = set((filtered[i] > -math.inf).nonzero().flatten().tolist())
        assert kept == reference_kept(logits[i].tolist(), ks[i], ps[i]), i


def test_the_candidates_topk_finds_the_same_values_as_torchs():
    """The sampler's narrow topk looks only at the blocks with the largest maxima; with
    many ties (bf16-like logits) too."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(16, 32768, generator=g) * 3
    logits[8:] = (logits[8:] * 2).round() / 2  # steps of 0.5: thousands of ties
    logits[12, :] = 1.0
    for k in (1, 32, 64):
        values, ids = candidate_topk(logits, k)
        assert torch.equal(values, logits.topk(k).values)
        assert torch.equal(logits.gather(1, ids), values)
        assert all(len(set(row)) == k for row in ids.tolist())


def test_tokens_tied_with_the_last_kept_one_stay_even_past_the_first_candidates():
    logits = torch.zeros(1, 100)
    logits[0, 20:60] = 1.0  # 40 tied tokens; top_k 31 cuts among them
    rows = [make_row(seed=s, top_k=31) for s in range(2000)]
    assert set(sampler(100)(logits.expand(2000, -1), rows).token_ids) == set(range(20, 60))


# ---- penalties -------------------------------------------------------------------------


def penalized(logits: list[float], **row_kwargs) -> list[float]:
    tensor = torch.tensor([logits])
    apply_penalties(tensor, [make_row(**row_kwargs)])
    return tensor[0].tolist()


def test_presence_and_frequency_penalties_subtract_per_generated_token():
    logits = [2.0, -1.0, 0.5, 3.0, 1.0]
    # Token 0 generated twice, 1 and 3 once; 4 only in the prompt, so untouched.
    got = penalized(logits, prompt=[4], output=[0, 1, 0, 3], presence_penalty=0.5, frequency_penalty=0.25)
    assert got == pytest.approx([2.0 - 0.5 - 0.5, -1.0 - 0.25 - 0.5, 0.5, 3.0 - 0.75, 1.0])


def test_repetition_penalty_divides_positive_multiplies_negative_over_prompt_and_output():
    logits = [2.0, -1.0, 0.5, 3.0, 1.0]
    got = penalized(logits, prompt=[4, 4], output=[0, 1], repetition_penalty=2.0)
    assert got == pytest.approx([1.0, -2.0, 0.5, 3.0, 0.5])


def test_repetition_penalty_applies_before_frequency():
    got = penalized([3.0, 0.0], output=[0, 0], repetition_penalty=2.0, frequency_penalty=0.5)
    assert got == pytest.approx([3.0 / 2.0 - 2 * 0.5, 0.0])


@pytest.mark.parametrize(
    "logits, row_kwargs, expected",
    [
        ([1.0, 0.9], dict(output=[0], presence_penalty=0.2), 1),
        ([1.0, 0.9], dict(prompt=[0], presence_penalty=5.0), 0),  # prompt doesn't count
        ([1.0, 0.9], dict(output=[0], frequency_penalty=0.06), 0),  # 0.94 > 0.9
        ([1.0, 0.9], dict(output=[0, 0], frequency_penalty=0.06), 1),  # 0.88 < 0.9
        ([1.0, 0.6], dict(prompt=[0], repetition_penalty=2.0), 1),  # 0.5 < 0.6
        ([-1.0, -1.5], dict(output=[0], repetition_penalty=2.0), 1),  # -2.0 < -1.5
        ([1.0, 0.9], dict(output=[1], repetition_penalty=0.5), 1),  # < 1 rewards: 1.8
    ],
)
def test_penalties_flip_the_greedy_pick(logits, row_kwargs, expected):
    out = sampler(2)(torch.tensor([logits]), [make_row(temperature=0.0, **row_kwargs)])
    assert out.token_ids == [expected]


def test_penalties_touch_only_the_rows_that_ask():
    logits = torch.tensor([[1.0, 0.9]] * 3)
    rows = [
        make_row(temperature=0.0, output=[0]),
        make_row(temperature=0.0, output=[0], presence_penalty=1.0),
        make_row(temperature=0.0, output=[0]),
    ]
    assert sampler(2)(logits, rows).token_ids == [0, 1, 0]


# ---- min_tokens ------------------------------------------------------------------------

# EOS (5) is the most likely token, then stop id 4, then 3.
STOPPY = torch.tensor([[0.0, 0.1, 0.2, 3.0, 4.0, 5.0, 0.3, 0.4]])


@pytest.mark.parametrize("generated, expected", [(0, 3), (2, 3), (3, EOS), (7, EOS)])
def test_min_tokens_masks_eos_and_stop_ids_until_reached(generated, expected):
    row = make_row(temperature=0.0, output=[1] * generated, min_tokens=3, stop_token_ids=[4])
    assert sampler()(STOPPY, [row]).token_ids == [expected]


def test_min_tokens_with_ignore_eos_masks_only_stop_ids():
    row = make_row(temperature=0.0, min_tokens=3, stop_token_ids=[EOS - 1], ignore_eos=True)
    assert sampler()(STOPPY, [row]).token_ids == [EOS]
    logits = STOPPY.clone()
    logits[0, 4] = 9.0
    assert sampler()(logits, [row]).token_ids == [EOS]


def test_min_tokens_masks_random_sampling_and_ignores_out_of_vocab_stop_ids():
    tokens = sample_many([0.0] * 8, 400, min_tokens=1, stop_token_ids=[4, 1000])
    assert set(tokens) == {0, 1, 2, 3, 6, 7}


# ---- logprobs --------------------------------------------------------------------------


def test_logprobs_are_raw_log_softmax_with_a_sorted_top_list():
    logits = torch.randn(4, 20, generator=torch.Generator().manual_seed(2)) * 3
    rows = [
        make_row(seed=1, temperature=0.7, top_k=5, presence_penalty=1.0, output=[3], logprobs=3),
        make_row(temperature=0.0, repetition_penalty=1.5, prompt=[1, 2], logprobs=0),
        make_row(temperature=1.0, logprobs=None),
        make_row(temperature=0.0, logprobs=50),  # more than the vocab: all of it
    ]
    out = sampler(20)(logits, rows)
    expected = logits.log_softmax(dim=-1)
    assert out.logprobs[2] is None
    for i, n in [(0, 3), (1, 0), (3, 20)]:
        entry = out.logprobs[i]
        assert entry.token_id == out.token_ids[i]
        assert entry.logprob == pytest.approx(expected[i, entry.token_id].item(), abs=1e-5)
        assert len(entry.top) == n
        ids = [t for t, _ in entry.top]
        values = [v for _, v in entry.top]
        assert ids == expected[i].topk(n).indices.tolist()
        assert values == pytest.approx(expected[i].topk(n).values.tolist(), abs=1e-5)
        assert values == sorted(values, reverse=True)


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


def peaked_logits(
    vocab: int, head: int, seed: int, top: float = 6.0, low: float = 2.0, step: float = 0.0
) -> torch.Tensor:
    """A trained model's shape: `head` likely tokens (logits from top down to low, at
    random ids) over a long tail of unlikely ones; rounded to multiples of `step` if set
    (many ties, as in bf16 logits)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(vocab, generator=g) - 4.0
    ids = torch.randperm(vocab, generator=g)[:head]
    logits[ids] = torch.linspace(top, low, head) + 0.1 * torch.randn(head, generator=g)
    return (logits / step).round() * step if step else logits


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


# ---- distribution ----------------------------------------------------------------------

DIST_LOGITS = [0.0, 0.5, 1.0, -0.5, 0.2, 0.8]


def assert_distribution(tokens: list[int], expected_probs: list[float]) -> None:
    """Chi-square goodness of fit at p = 0.001: ids expected fewer than 5 times pooled;
    the critical value by Wilson and Hilferty's approximation. And no token outside the support."""
    n = len(tokens)
    counts = [0] * len(expected_probs)
    for t in tokens:
        counts[t] += 1
    assert all(c == 0 for c, p in zip(counts, expected_probs) if p == 0), "a token outside the support"
    cells = [(c, n * p) for c, p in zip(counts, expected_probs) if n * p >= 5]
    rare = [(c, n * p) for c, p in zip(counts, expected_probs) if 0 < n * p < 5]
    if rare:
        cells.append((sum(c for c, _ in rare), sum(e for _, e in rare)))
    stat = sum((c - e) ** 2 / e for c, e in cells)
    df = len(cells) - 1
    critical = df * (1 - 2 / (9 * df) + 3.0902 * math.sqrt(2 / (9 * df))) ** 3 if df else 0.0
    assert stat <= critical, (stat, critical, df)


def reference_probs(
    logits: list[float], temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0
) -> list[float]:
    """softmax(logits / T) after top-k, top-p and min-p, one token at a time in float64."""
    scaled = [x / temperature for x in logits]
    kept = reference_kept(scaled, top_k, top_p)
    top = max(scaled)
    kept = {i for i in kept if min_p == 0.0 or scaled[i] >= top + math.log(min_p)}
    weights = [math.exp(x - top) if i in kept else 0.0 for i, x in enumerate(scaled)]
    return [w / sum(weights) for w in weights]


@pytest.mark.parametrize(
    "params",
    [
        dict(temperature=0.7),
        dict(temperature=1.5, top_k=4),
        dict(temperature=1.0, min_p=0.5),
        dict(temperature=0.8, top_p=0.7, top_k=5),
    ],
)
def test_unseeded_sampling_matches_the_softmax_distribution(params):
    n = 20000
    torch.manual_seed(0)
    rows = [make_row(**params)] * n
    tokens = sampler(6)(torch.tensor(DIST_LOGITS).expand(n, -1), rows).token_ids
    assert_distribution(tokens, reference_probs(DIST_LOGITS, **params))


def test_one_seeded_stream_matches_the_softmax_distribution():
    row = make_row(seed=3, temperature=0.7)
    logits = torch.tensor([DIST_LOGITS])
    for _ in range(3000):
        row.append(sampler(6)(logits, [row]).token_ids[0])
    assert_distribution(row.output_token_ids, reference_probs(DIST_LOGITS, temperature=0.7))


# Each way a draw can go (how many tokens top-k/top-p keep says which), at vocab 1500, and
# at 16384 where the first candidates come from the blocks with the largest maxima.
@pytest.mark.parametrize(
    "params, shape, kept",
    [
        (dict(temperature=0.7, top_p=0.9), dict(head=20), (2, 32)),  # among the first candidates
        (dict(temperature=0.7, top_p=0.9), dict(head=20, vocab=16384), (2, 32)),
        (dict(temperature=0.7, top_p=0.9), dict(head=20, vocab=16384, step=0.5), (2, 32)),  # ties
        (dict(temperature=1.0, top_k=20, top_p=0.95, min_p=0.05), dict(head=40), (2, 21)),
        (dict(temperature=0.9, top_p=0.9), dict(head=150, top=3.0, low=2.5), (32, 256)),  # wider
        (dict(temperature=0.9, top_p=0.9), dict(head=600, top=3.0, low=2.5), (256, 1024)),  # wider still
        (dict(temperature=1.0), dict(head=20), (1500, 1501)),  # no filter: the whole vocab
        (dict(temperature=1.5, top_p=0.99), dict(head=0), (1024, 1500)),  # a nucleus past the candidates
    ],
)
def test_seeded_draws_at_a_large_vocab_match_the_filtered_softmax(params, shape, kept):
    shape = dict(shape)
    vocab, rows_per_step, steps = shape.pop("vocab", 1500), 300, 20
    logits = peaked_logits(vocab, seed=21, **shape)
    expected = reference_probs(logits.tolist(), **params)
    assert kept[0] <= sum(p > 0 for p in expected) < kept[1]
    rows = [make_row(seed=s, **params) for s in range(rows_per_step)]
    batch = logits.expand(rows_per_step, -1).contiguous()
    for _ in range(steps):
        for row, token in zip(rows, sampler(vocab)(batch, rows).token_ids):
            row.append(token)
    assert_distribution([t for row in rows for t in row.output_token_ids], expected)


# ---- property --------------------------------------------------------------------------


def reference_logits(logits: list[float], row: SamplingRow, eos: int) -> list[float]:
    """Penalties and min_tokens masking, one token at a time, as the docs describe them."""
    p = row.params
    out = list(logits)
    for t in set(row.prompt_token_ids) | set(row.output_token_ids):
        out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
    for t in set(row.output_token_ids):
        out[t] -= p.frequency_penalty * row.output_token_ids.count(t) + p.presence_penalty
    if len(row.output_token_ids) < p.min_tokens:
        for t in list(p.stop_token_ids) + ([] if p.ignore_eos else [eos]):
            if t < len(out):
                out[t] = -math.inf
    return out


@st.composite
def rows_and_logits(draw):
    vocab = draw(st.integers(EOS + 1, 24))
    tokens = st.lists(st.integers(0, vocab - 1), max_size=8)
    rows = []
    for _ in range(draw(st.integers(1, 4))):
        params = dict(
            temperature=draw(st.sampled_from([0.0, 1e-6, 0.3, 1.0, 2.0])),
            top_k=draw(st.integers(-1, vocab + 2)),
            top_p=draw(st.floats(0.01, 1.0)),
            min_p=draw(st.sampled_from([0.0, 0.1, 0.9])),
            presence_penalty=draw(st.floats(-2.0, 2.0)),
            frequency_penalty=draw(st.floats(-2.0, 2.0)),
            repetition_penalty=draw(st.floats(0.5, 2.0)),
            min_tokens=draw(st.integers(0, 3)),
            stop_token_ids=draw(st.lists(st.integers(0, vocab + 3), max_size=3)),
            ignore_eos=draw(st.booleans()),
            logprobs=draw(st.sampled_from([None, 0, 2])),
        )
        seed = draw(st.one_of(st.none(), st.integers(0, 2**31)))
        rows.append(make_row(draw(tokens), draw(tokens), seed=seed, **params))
    logits = (
        torch.randn(len(rows), vocab, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**31))))
        * 3
    )
    return logits, rows


@settings(max_examples=80, deadline=None)
@given(rows_and_logits())
def test_any_params_sample_an_allowed_token(case):
    logits, rows = case
    out = sampler(logits.shape[1])(logits, rows)
    for i, (row, token) in enumerate(zip(rows, out.token_ids)):
        ref = reference_logits(logits[i].tolist(), row, EOS)
        assert 0 <= token < logits.shape[1]
        assert ref[token] > -math.inf  # never a min_tokens-masked token
        if row.params.temperature < 1e-5:
            assert ref[token] >= max(ref) - 1e-4
        elif 0 < row.params.top_k < len(ref):
            kth = sorted(ref, reverse=True)[row.params.top_k - 1]
            assert ref[token] >= kth - 1e-4
        assert (out.logprobs[i] is None) == (row.params.logprobs is None)
