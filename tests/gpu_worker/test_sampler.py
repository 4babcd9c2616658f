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

from services.gpu_worker.sampler import Sampler, SamplingRow, apply_penalties, apply_top_k_top_p, make_generator
from shared.messages import SamplingParams

CPU = torch.device("cpu")
EOS = 5


def make_row(prompt=(), output=(), seed=None, **params) -> SamplingRow:
    generator = make_generator(seed, CPU) if seed is not None else None
    return SamplingRow(SamplingParams(seed=seed, **params), [*prompt, *output], len(prompt), generator)


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
    """The top-k then top-p survivors, one token at a time in float64."""
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
    return kept


# Vocab 3000 with flat rows puts some nuclei past the first 1024 candidates.
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


# ---- penalties -------------------------------------------------------------------------


def penalized(logits: list[float], **row_kwargs) -> list[float]:
    tensor = torch.tensor([logits])
    apply_penalties(tensor, [make_row(**row_kwargs)])
    return tensor[0].tolist()


def test_presence_and_frequency_penalties_subtract_per_generated_token():
    logits = [2.0, -1.0, 0.5, 3.0, 1.0]
    # Token 0 generated twice, 1 and 3 once; 4 only in the prompt, so untouched.
    got = penalized(logits, prompt=[4], output=[0, 1, 0, 3],
                    presence_penalty=0.5, frequency_penalty=0.25)
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
        make_row(seed=1234, temperature=0.8),  # same seed, its own generator
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


def test_same_seed_reproduces_and_different_seeds_differ():
    logits = torch.zeros(1, 64)

    def stream(seed: int) -> list[int]:
        row = make_row(seed=seed)
        return [sampler(64)(logits, [row]).token_ids[0] for _ in range(20)]

    assert stream(1) == stream(1)
    assert stream(1) != stream(2)


# ---- distribution ----------------------------------------------------------------------

DIST_LOGITS = [0.0, 0.5, 1.0, -0.5, 0.2, 0.8]


def chi_square(tokens: list[int], expected_probs: list[float]) -> float:
    n = len(tokens)
    counts = [tokens.count(i) for i in range(len(expected_probs))]
    assert all(c == 0 for c, p in zip(counts, expected_probs) if p == 0)
    return sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, expected_probs) if p > 0)


def softmax_over(logits: list[float], temperature: float, keep: set[int]) -> list[float]:
    weights = [math.exp(l / temperature) if i in keep else 0.0 for i, l in enumerate(logits)]
    return [w / sum(weights) for w in weights]


# chi-square critical values at p = 0.001 for 5, 3 and 2 degrees of freedom.
@pytest.mark.parametrize(
    "params, keep, critical",
    [
        (dict(temperature=0.7), {0, 1, 2, 3, 4, 5}, 20.5),
        (dict(temperature=1.5, top_k=4), {1, 2, 4, 5}, 16.3),
        (dict(temperature=1.0, min_p=0.5), {1, 2, 5}, 13.8),
    ],
)
def test_unseeded_sampling_matches_the_softmax_distribution(params, keep, critical):
    n = 20000
    torch.manual_seed(0)
    rows = [make_row(**params)] * n
    tokens = sampler(6)(torch.tensor(DIST_LOGITS).expand(n, -1), rows).token_ids
    expected = softmax_over(DIST_LOGITS, params["temperature"], keep)
    assert chi_square(tokens, expected) < critical


def test_one_seeded_stream_matches_the_softmax_distribution():
    row = make_row(seed=3, temperature=0.7)
    logits = torch.tensor([DIST_LOGITS])
    tokens = [sampler(6)(logits, [row]).token_ids[0] for _ in range(3000)]
    assert chi_square(tokens, softmax_over(DIST_LOGITS, 0.7, set(range(6)))) < 20.5


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
    logits = torch.randn(len(rows), vocab, generator=torch.Generator().manual_seed(draw(
        st.integers(0, 2**31)))) * 3
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
