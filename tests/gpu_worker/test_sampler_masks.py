"""The sampler's token masks against hand-built logits: logit_bias, allowed_token_ids,
bad_words (vLLM's rule), and a real xgrammar grammar over a small vocabulary, including
where the grammar must win over min_tokens and over the user's own masks.
"""

from __future__ import annotations

import math

import torch
import xgrammar as xgr

from services.gpu_worker.grammar_masks import RowGrammar
from services.gpu_worker.sampler import Sampler
from shared.structured_grammar import choice_grammar
from tests.gpu_worker.sampler_helpers import CPU, EOS, make_row

# Ids 0..7; EOS (5) is the stop token. "yes" and "no" are single tokens.
VOCAB = ["y", "e", "s", "yes", "no", "</s>", "n", "o"]
YES, NO, Y = 3, 4, 0


def sampler() -> Sampler:
    return Sampler(len(VOCAB), [EOS], CPU)


def choice_row(choices=("yes", "no"), **params):
    info = xgr.TokenizerInfo(VOCAB, xgr.VocabType.RAW, stop_token_ids=[EOS])
    compiled = xgr.GrammarCompiler(info, max_threads=1).compile_grammar(choice_grammar(list(choices)))
    row = make_row(**params)
    row.grammar = RowGrammar(xgr.GrammarMatcher(compiled, override_stop_tokens=[EOS]), [EOS], len(VOCAB))
    return row


def flat(n: int = 1) -> torch.Tensor:
    return torch.zeros(n, len(VOCAB))


# ---- logit_bias --------------------------------------------------------------------------


def test_a_large_logit_bias_forces_its_token_and_logprobs_stay_raw():
    logits = torch.randn(32, 8, generator=torch.Generator().manual_seed(0)) * 3
    rows = [make_row(seed=s, temperature=1.0, logit_bias={6: 100.0}, logprobs=1) for s in range(32)]
    out = sampler()(logits, rows)
    assert out.token_ids == [6] * 32
    raw = logits.log_softmax(dim=-1)
    for k, lp in enumerate(out.logprobs):  # vLLM reports logprobs before the bias
        assert math.isclose(lp.logprob, raw[k, 6].item(), abs_tol=1e-5)


def test_logit_bias_shifts_one_row_only():
    logits = torch.tensor([[0.0, 2.0, 1.0, 0.0, 0.0, -9.0, 0.0, 0.0]] * 3)
    rows = [
        make_row(temperature=0.0),
        make_row(temperature=0.0, logit_bias={1: -100.0, 2: 0.5}),
        make_row(temperature=0.0, logit_bias={7: 1.5}),
    ]
    assert sampler()(logits, rows).token_ids == [1, 2, 1]


# ---- allowed_token_ids -------------------------------------------------------------------


def test_allowed_token_ids_restrict_every_draw():
    logits = torch.zeros(200, 8)
    logits[:, 0] = 5.0  # the favourite is not allowed
    rows = [make_row(seed=s, temperature=1.0, allowed_token_ids=[2, 6]) for s in range(200)]
    tokens = sampler()(logits, rows).token_ids
    assert set(tokens) == {2, 6}


def test_allowed_token_ids_next_to_rows_without_them():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0]] * 2)
    rows = [make_row(temperature=0.0, allowed_token_ids=[2, 3]), make_row(temperature=0.0)]
    assert sampler()(logits, rows).token_ids == [3, 1]


# ---- bad_words ---------------------------------------------------------------------------


def test_a_one_token_bad_word_is_always_banned():
    logits = torch.tensor([[0.0, 9.0, 8.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    assert sampler()(logits, [make_row(temperature=0.0, bad_words=[[1]])]).token_ids == [2]


def test_a_longer_bad_word_bans_its_last_token_after_the_rest_of_it():
    logits = torch.tensor([[0.0, 9.0, 8.0, 0.0, 0.0, 0.0, 0.0, 0.0]] * 4)
    word = [[6, 7, 1]]
    rows = [
        make_row(output=[6, 7], temperature=0.0, bad_words=word),  # ends with 6 7: 1 banned
        make_row(output=[7, 6], temperature=0.0, bad_words=word),  # other order: allowed
        make_row(output=[7], temperature=0.0, bad_words=word),  # too short: allowed
        # vLLM matches the generated tokens only, not the prompt before them.
        make_row(prompt=[6], output=[7], temperature=0.0, bad_words=word),
    ]
    assert sampler()(logits, rows).token_ids == [2, 1, 1, 1]


# ---- the grammar -------------------------------------------------------------------------


def test_a_grammar_allows_only_its_tokens_and_then_only_the_stop_token():
    logits = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    rows = [choice_row(seed=s, temperature=1.0) for s in range(64)]
    first = sampler()(logits, rows).token_ids
    assert set(first) <= {YES, NO, Y, 6}  # "yes", "no" or their first letters
    for row, token in zip(rows, first):
        row.append(token)
    # Rows that wrote a whole word may only stop now.
    done = [i for i, t in enumerate(first) if t in (YES, NO)]
    assert done
    second = sampler()(logits[done], [rows[i] for i in done]).token_ids
    assert second == [EOS] * len(done)


def test_the_grammar_wins_over_min_tokens_once_it_is_complete():
    row = choice_row(temperature=0.0, min_tokens=5)
    row.append(YES)
    # min_tokens bans the stop token, the grammar allows nothing else: the grammar wins.
    assert sampler()(flat(), [row]).token_ids == [EOS]


def test_the_grammar_wins_over_allowed_token_ids_that_exclude_it():
    logits = torch.tensor([[0.0, 0.0, 0.0, 1.0, 2.0, 0.0, 0.0, 0.0]])
    row = choice_row(temperature=0.0, allowed_token_ids=[1, 2])
    assert sampler()(logits, [row]).token_ids == [NO]


def test_bad_words_still_apply_inside_the_grammar():
    logits = torch.tensor([[0.0, 0.0, 0.0, 1.0, 2.0, 0.0, 0.0, 0.0]])
    row = choice_row(temperature=0.0, bad_words=[[NO]])
    assert sampler()(logits, [row]).token_ids == [YES]


def test_logprobs_of_a_constrained_row_are_over_what_the_grammar_allows():
    # As vLLM reports them: the grammar masks the logits before the logprobs are taken.
    row = choice_row(choices=("yes",), temperature=0.0, logprobs=2)
    out = sampler()(flat(), [row])
    lp = out.logprobs[0]
    assert out.token_ids == [YES] or out.token_ids == [Y]
    allowed = {YES, Y}
    assert {t for t, _ in lp.top} == allowed
    assert math.isclose(lp.logprob, math.log(0.5), abs_tol=1e-5)


def test_a_finished_grammar_under_ignore_eos_keeps_to_stop_tokens():
    row = choice_row(temperature=1.0, seed=3, ignore_eos=True)
    for token in (YES, EOS):
        row.append(token)
    assert row.grammar.free
    out = sampler()(torch.randn(1, 8), [row])
    assert out.token_ids == [EOS]
    row.append(EOS)  # the scheduler keeps it going; the text stays "yes"


def test_unconstrained_rows_are_unchanged_by_a_constrained_neighbour():
    logits = torch.randn(6, 8, generator=torch.Generator().manual_seed(4))
    plain = [make_row(seed=s, temperature=0.8) for s in range(5)]
    alone = sampler()(logits[:5], plain).token_ids
    plain = [make_row(seed=s, temperature=0.8) for s in range(5)]
    mixed = sampler()(logits, plain + [choice_row(temperature=0.8, seed=9)]).token_ids
    assert mixed[:5] == alone
