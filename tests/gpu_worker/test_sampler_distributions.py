"""The sampler's draws against the distribution they should follow (chi-square tests of
the filtered softmax, unseeded and seeded, at small and large vocabularies), and a property
test: any parameters sample an allowed token.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from services.gpu_worker.sampling_row import SamplingRow
from tests.gpu_worker.sampler_helpers import EOS, make_row, peaked_logits, reference_kept, sampler

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
