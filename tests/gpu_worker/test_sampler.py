"""The sampler against hand computations: greedy, temperature, top-k, top-p, min-p, the
three penalties, min_tokens and raw logprobs. Seeded streams are in test_sampler_seeds.py,
the distributions drawn in test_sampler_distributions.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from services.gpu_worker.draw import apply_top_k_top_p, candidate_topk
from services.gpu_worker.penalties import apply_penalties
from tests.gpu_worker.sampler_helpers import EOS, log, make_row, reference_kept, sample_many, sampler

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
