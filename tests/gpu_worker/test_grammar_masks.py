"""The token masks a row's grammar makes, checked token by token on the qwen2 tiny model's
vocabulary: no raw control character inside a bounded JSON string, no UTF-16 surrogate
ever, a resumed row whose tokens broke its grammar held to its stop tokens; and mask token
ids past the vocabulary make the plan invalid.
"""

from __future__ import annotations

import json
import re

import pytest

from services.gpu_worker.grammar_masks import GrammarMask
from shared.messages import NewRequest, SamplingParams, StepPlan, StructuredOutput


def test_bounded_json_strings_hold_no_raw_control_characters(qwen2_engine):
    # xgrammar 0.2.9 allows them in a string with maxLength; JSON parsers refuse them.
    engine, _, tok = qwen2_engine
    schema = StructuredOutput("json_schema", json.dumps({"type": "string", "maxLength": 5}))
    row = engine.grammars.row_grammar(SamplingParams(structured=schema), tok.encode('"'))
    mask = GrammarMask(engine.grammars.vocab_size, engine.device).additive([row], engine.grammars.vocab_size)

    def allowed(text):
        (token,) = tok.encode(text)
        return mask[0, token].item() == 0.0

    assert allowed("a") and allowed('"')
    assert not allowed("\x06") and not allowed("\t")


def test_a_resumed_row_whose_tokens_break_its_grammar_is_held_to_stop_tokens(qwen2_engine):
    engine, info, tok = qwen2_engine
    choice = StructuredOutput("choice", json.dumps(["red", "blue"]))
    row = engine.grammars.row_grammar(SamplingParams(structured=choice), tok.encode("green"))
    assert row.free
    mask = GrammarMask(engine.grammars.vocab_size, engine.device).additive([row], engine.grammars.vocab_size)
    assert (mask[0] == 0).nonzero().flatten().tolist() == sorted(info.eos_token_ids)


def test_mask_token_ids_outside_the_vocab_are_an_invalid_plan(qwen2_engine):
    engine, info, _ = qwen2_engine
    for bad in (
        SamplingParams(logit_bias={info.vocab_size: 1.0}),
        SamplingParams(allowed_token_ids=[-1]),
        SamplingParams(bad_words=[[3, info.vocab_size + 5]]),
        SamplingParams(bad_words=[[]]),
    ):
        plan = StepPlan(0, [NewRequest("x", [5, 6], 2, bad, [1])], num_scheduled_tokens={"x": 2})
        result = engine.execute(plan)
        assert result.error is not None and "invalid step plan" in result.error
        assert "x" not in engine.rows


@pytest.mark.parametrize(
    "kind, spec", [("json_schema", json.dumps({"type": "string", "maxLength": 5})), ("regex", "[^a]{1,4}")]
)
def test_no_utf16_surrogate_ever_gets_through(qwen2_engine, kind, spec):
    """xgrammar's negated classes take U+D800..U+DFFF, whose UTF-8 form (ED A0..BF xx) is
    not valid UTF-8 (a decoder shows three U+FFFD, and maxLength breaks): never inside a
    token, and never after a token that ends in byte ED."""
    engine, _, _ = qwen2_engine
    grammars = engine.grammars
    row = grammars.row_grammar(SamplingParams(structured=StructuredOutput(kind, spec)), [])
    token_bytes = grammars.token_bytes
    if kind == "json_schema":
        row.accept(token_bytes.index(b'"'))
    mask = GrammarMask(grammars.vocab_size, engine.device)

    def allowed() -> set[int]:
        return {i for i, v in enumerate(mask.additive([row], grammars.vocab_size)[0].tolist()) if v == 0}

    first = allowed()
    assert not any(re.search(rb"\xed[\xa0-\xbf]", token_bytes[i]) for i in first)
    row.accept(token_bytes.index(b"\xed"))
    after_ed = allowed()
    assert after_ed, "a valid continuation (80..9F) stays allowed"
    assert all(token_bytes[i][:1] and token_bytes[i][0] < 0xA0 for i in after_ed if token_bytes[i])
