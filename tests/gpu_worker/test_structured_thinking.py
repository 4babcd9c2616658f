"""Structured outputs for a model that thinks first (the gateway's reasoning parser): the
grammar holds only after </think>, an output that may not think opens with the grammar or
with <think>, and a resumed row knows whether its thinking ended.
"""

from __future__ import annotations

import json
import re

from shared.messages import SamplingParams, StructuredOutput
from tests.gpu_worker.plan_driver import PlanDriver
from tests.gpu_worker.test_structured_outputs import PATTERN


def _think_ids(tok) -> tuple[int, int]:
    """Two single tokens no answer of PATTERN holds, standing for <think> and </think> (Qwen3's
    are added tokens too): <|im_start|> and the token of "?"."""
    (open_id,) = tok.encode("?")
    return open_id, tok.convert_tokens_to_ids("<|im_start|>")


def _greedy(
    qwen2_engine, structured: StructuredOutput | None, bias: dict[int, float], max_tokens: int = 24
) -> list[int]:
    engine, info, tok = qwen2_engine
    driver = PlanDriver(engine.execute, info.block_size, info.num_blocks, info.eos_token_ids, chunk_size=32)
    driver.add(
        "r",
        tok.encode("Hello"),
        max_tokens,
        SamplingParams(temperature=0.0, structured=structured, max_tokens=max_tokens, logit_bias=bias),
    )
    return driver.run()["r"]


def test_the_grammar_starts_after_the_thinking(qwen2_engine):
    _, info, tok = qwen2_engine
    open_id, end_id = _think_ids(tok)
    after = StructuredOutput("regex", PATTERN, think_end=end_id)
    # Thinking that never ends is free: the very tokens of an unconstrained run.
    never = {end_id: -100.0}
    free = _greedy(qwen2_engine, None, never)
    assert _greedy(qwen2_engine, after, never) == free
    assert not re.fullmatch(PATTERN, tok.decode(free)), "the grammar would have changed it"
    # </think> first: the grammar holds from the next token on (</think> stays favoured, but
    # the grammar does not allow it).
    out = _greedy(qwen2_engine, after, {end_id: 100.0})
    assert out[0] == end_id and out[-1] in info.eos_token_ids, tok.decode(out)
    assert re.fullmatch(PATTERN, tok.decode(out[1:-1])), tok.decode(out)


def test_an_output_that_may_not_think_opens_with_the_grammar_or_the_thinking(qwen2_engine):
    _, info, tok = qwen2_engine
    open_id, end_id = _think_ids(tok)
    maybe = StructuredOutput("regex", PATTERN, think_end=end_id, think_open=open_id)
    # Not opened: constrained from the first token, as without a reasoning parser.
    assert _greedy(qwen2_engine, maybe, {open_id: -100.0}) == _greedy(
        qwen2_engine, StructuredOutput("regex", PATTERN), {open_id: -100.0}
    )
    # Opened: free (here <think> again and again, which the grammar would never allow).
    out = _greedy(qwen2_engine, maybe, {open_id: 100.0, end_id: -100.0})
    assert out == [open_id] * 24
    # Opened, then closed at once: then the grammar.
    out = _greedy(qwen2_engine, maybe, {open_id: 100.0, end_id: 200.0})  # </think> is not the grammar's first
    assert out[:2] == [open_id, end_id] and out[-1] in info.eos_token_ids, tok.decode(out)
    assert re.fullmatch(PATTERN, tok.decode(out[2:-1])), tok.decode(out)


def test_a_resumed_row_knows_whether_its_thinking_ended(qwen2_engine):
    engine, _, tok = qwen2_engine
    open_id, end_id = _think_ids(tok)
    params = SamplingParams(
        structured=StructuredOutput(
            "choice", json.dumps(["red", "blue"]), think_end=end_id, think_open=open_id
        )
    )
    thinking = engine.grammars.row_grammar(params, [open_id, *tok.encode("green ??")])
    assert thinking.thinking and not thinking.free
    answered = engine.grammars.row_grammar(params, [open_id, *tok.encode("green"), end_id, *tok.encode("re")])
    assert not answered.thinking and not answered.free
    assert not answered.try_accept(tok.encode("x")[0]) and answered.try_accept(tok.encode("d")[0])
    # Never opened: the first token was the grammar's, and </think> later means nothing.
    direct = engine.grammars.row_grammar(params, tok.encode("bl"))
    assert not direct.thinking and not direct.lead and not direct.try_accept(end_id)
