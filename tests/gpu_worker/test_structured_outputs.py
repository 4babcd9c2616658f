"""Structured outputs through the whole engine on a tiny random model: at temperature 0 and 1
and several seeds, every output obeys its constraint (JSON validated by jsonschema, choices,
regexes, EBNF) and ends with EOS; a request cut by max_tokens is a valid prefix; a request
preempted or migrated mid-structure continues validly, greedy token for token.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import xgrammar as xgr
from transformers import AutoTokenizer

from services.gpu_worker.grammar_masks import GrammarMask
from shared.messages import NewRequest, SamplingParams, StepPlan, StructuredOutput
from shared.structured_grammar import compile_output
from tests.gpu_worker.conftest import make_engine
from tests.gpu_worker.fake_scheduler import FakeScheduler, start_worker
from tests.gpu_worker.plan_driver import PlanDriver

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["x", "y", "z"]}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {
                "zip": {"type": "integer", "minimum": 1000, "maximum": 9999},
                "city": {"enum": ["Oslo", "Rome"]},
            },
            "required": ["zip", "city"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "tags", "address"],
    "additionalProperties": False,
}
POINTS = {
    "type": "array",
    "maxItems": 4,
    "items": {
        "type": "object",
        "properties": {"x": {"type": "integer", "minimum": -5, "maximum": 5}, "ok": {"type": "boolean"}},
        "required": ["x", "ok"],
        "additionalProperties": False,
    },
}
CHOICES = ["red", "green", "blue", "light blue", 'ünïcode "quoted"']
PATTERN = r"[a-z]{2,6}-\d{2,4}(\.[A-Z])?"
EBNF = 'root ::= "(" item ("," item){0,4} ")"\nitem ::= [0-9] | "ab"'
SEEDS = [0, 1, 2, 3, 4]
SAMPLINGS = [("greedy", 0.0, None)] + [(f"seed{s}", 1.0, s) for s in SEEDS]


@pytest.fixture(scope="module")
def setup(model_dirs):
    model_dir = model_dirs["qwen2"]
    engine, info = make_engine(model_dir)
    return engine, info, AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


def run(
    setup, structured: StructuredOutput, max_tokens: int = 120, prompts=("Hello", "Write JSON:"), **params
):
    """Every (prompt, sampling) pair as one batch; returns {request_id: output tokens}."""
    engine, info, tok = setup
    driver = PlanDriver(engine.execute, info.block_size, info.num_blocks, info.eos_token_ids, chunk_size=32)
    for p, prompt in enumerate(prompts):
        for name, temperature, seed in SAMPLINGS:
            sampling = SamplingParams(
                temperature=temperature, seed=seed, structured=structured, max_tokens=max_tokens, **params
            )
            driver.add(f"{name}/{p}", tok.encode(prompt), max_tokens, sampling)
    return driver.run()


def finished_texts(setup, outputs: dict[str, list[int]], max_tokens: int = 120) -> list[str]:
    """The texts, after checking that each request ended by sampling EOS (finish "stop")."""
    _, info, tok = setup
    texts = []
    for rid, tokens in outputs.items():
        assert tokens[-1] in info.eos_token_ids and len(tokens) < max_tokens, (rid, tok.decode(tokens))
        texts.append(tok.decode(tokens[:-1]))
    return texts


@pytest.mark.parametrize("schema", [PERSON, POINTS], ids=["person", "points"])
def test_json_schema_outputs_validate(setup, schema):
    outputs = run(setup, StructuredOutput("json_schema", json.dumps(schema)))
    for text in finished_texts(setup, outputs):
        jsonschema.validate(json.loads(text), schema)


def test_json_object_is_an_object(setup):
    # Any object may nest without end on a random model: enough room, and a closing bias
    # would be cheating; the ones that finish must be objects, the rest valid prefixes.
    outputs = run(setup, StructuredOutput("json_object"), max_tokens=200)
    _, info, tok = setup
    finished = {rid: t for rid, t in outputs.items() if t[-1] in info.eos_token_ids}
    assert finished
    for tokens in finished.values():
        assert isinstance(json.loads(tok.decode(tokens[:-1])), dict)
    for rid in set(outputs) - set(finished):
        matcher = fresh_matcher(setup, StructuredOutput("json_object"))
        assert all(matcher.accept_token(t) for t in outputs[rid]) and tok.decode(outputs[rid]).startswith("{")


def test_choice_is_one_of_the_choices(setup):
    outputs = run(setup, StructuredOutput("choice", json.dumps(CHOICES, ensure_ascii=False)))
    texts = finished_texts(setup, outputs)
    assert set(texts) <= set(CHOICES)
    assert len(set(texts)) > 1  # the seeds do not all agree


def test_regex_matches_fully(setup):
    for text in finished_texts(setup, run(setup, StructuredOutput("regex", PATTERN))):
        assert re.fullmatch(PATTERN, text), text


def test_ebnf_grammar(setup):
    for text in finished_texts(setup, run(setup, StructuredOutput("grammar", EBNF), max_tokens=200), 200):
        assert re.fullmatch(r"\((\d|ab)(,(\d|ab)){0,4}\)", text), text


def test_whitespace_is_compact_unless_asked(setup):
    compact = run(setup, StructuredOutput("json_schema", json.dumps(PERSON)))
    for text in finished_texts(setup, compact):
        assert "\n" not in text and "  " not in text


def test_a_request_cut_by_max_tokens_is_a_valid_prefix(setup):
    _, info, tok = setup
    outputs = run(setup, StructuredOutput("regex", r"[a-z]{40}"), max_tokens=6)
    for tokens in outputs.values():
        text = tok.decode(tokens)
        assert len(tokens) == 6 and not set(tokens) & set(info.eos_token_ids)
        assert re.fullmatch(r"[a-z]{1,39}", text), text
    # A JSON cut short: every token is one a fresh matcher of the same schema accepts.
    schema = json.dumps(PERSON)
    for tokens in run(setup, StructuredOutput("json_schema", schema), max_tokens=8).values():
        assert len(tokens) == 8
        matcher = fresh_matcher(setup, StructuredOutput("json_schema", schema))
        assert all(matcher.accept_token(t) for t in tokens) and not matcher.is_completed()


def fresh_matcher(setup, so: StructuredOutput):
    engine, info, _ = setup
    return xgr.GrammarMatcher(
        compile_output(engine.grammars.compiler, so), override_stop_tokens=info.eos_token_ids
    )


@pytest.mark.parametrize("temperature,seed", [(0.0, None), (1.0, 11)])
def test_preempted_and_migrated_requests_continue_validly(setup, model_dirs, temperature, seed):
    engine, info, tok = setup
    structured = StructuredOutput("json_schema", json.dumps(PERSON))
    sampling = SamplingParams(temperature=temperature, seed=seed, structured=structured, max_tokens=120)
    prompt = tok.encode("Tell me about a person.")

    def driver(on):
        return PlanDriver(on.execute, info.block_size, info.num_blocks, info.eos_token_ids)

    whole = driver(engine)
    whole.add("r", prompt, 120, sampling)
    expected = whole.run()["r"]
    assert len(expected) > 12

    preempted = driver(engine)
    preempted.add("r", prompt, 120, sampling)
    for _ in range(8):
        preempted.step()
    preempted.preempt("r")  # resent as a new request carrying its 8 generated tokens
    assert preempted.run()["r"] == expected

    first = driver(engine)
    first.add("r", prompt, 120, sampling)
    for _ in range(10):
        first.step()
    generated = first.requests["r"].output
    first.preempt("r")
    first.step(only=[])  # the first worker drops the row
    other, _ = make_engine(model_dirs["qwen2"])  # a fresh worker: its own compiler and cache
    second = driver(other)
    second.add("r", prompt, 120, sampling)
    second.requests["r"].output = list(generated)
    assert second.run()["r"] == expected
    jsonschema.validate(json.loads(tok.decode(expected[:-1])), PERSON)


def test_compiled_grammars_are_reused(setup):
    engine, _, _ = setup
    so = StructuredOutput("json_schema", json.dumps(POINTS))
    run(setup, so, max_tokens=4)
    size = engine.grammars.compiler.get_cache_size_bytes()
    run(setup, so, max_tokens=4)
    assert engine.grammars.compiler.get_cache_size_bytes() == size
    run(setup, StructuredOutput("regex", r"\d+z"), max_tokens=4)
    assert engine.grammars.compiler.get_cache_size_bytes() > size


def test_a_constraint_the_worker_cannot_compile_ends_its_request_only(setup):
    _, info, tok = setup
    engine = setup[0]
    driver = PlanDriver(engine.execute, info.block_size, info.num_blocks, info.eos_token_ids)
    driver.add(
        "bad",
        tok.encode("Hi"),
        20,
        SamplingParams(temperature=0.0, structured=StructuredOutput("regex", "(")),
    )
    driver.add("good", tok.encode("Hi"), 20, SamplingParams(temperature=0.0, ignore_eos=True))
    out = driver.run()
    assert len(out["bad"]) == 1 and out["bad"][0] in info.eos_token_ids  # no text against its constraint
    assert len(out["good"]) == 20


def test_min_tokens_yields_to_a_complete_grammar(setup):
    _, info, _ = setup
    outputs = run(setup, StructuredOutput("choice", json.dumps(["a", "b"])), max_tokens=30, min_tokens=10)
    for tokens in outputs.values():
        assert tokens[-1] in info.eos_token_ids and len(tokens) < 10


def test_ignore_eos_after_the_structure_keeps_the_text_valid(setup):
    _, info, tok = setup
    outputs = run(setup, StructuredOutput("choice", json.dumps(CHOICES[:3])), max_tokens=16, ignore_eos=True)
    for tokens in outputs.values():
        assert len(tokens) == 16 and tokens[-1] in info.eos_token_ids  # stop tokens until max_tokens
        assert tok.decode(tokens, skip_special_tokens=True) in CHOICES[:3]


def test_seeded_constrained_request_is_the_same_in_any_batch(setup):
    engine, info, tok = setup
    structured = StructuredOutput("json_schema", json.dumps(POINTS))
    sampling = SamplingParams(temperature=1.0, seed=42, structured=structured, max_tokens=100)
    alone = PlanDriver(engine.execute, info.block_size, info.num_blocks, info.eos_token_ids)
    alone.add("s", tok.encode("Points:"), 100, sampling)
    expected = alone.run()["s"]
    crowd = PlanDriver(engine.execute, info.block_size, info.num_blocks, info.eos_token_ids, chunk_size=5)
    crowd.add("o1", tok.encode("Other"), 30, SamplingParams(temperature=1.0, ignore_eos=True))
    crowd.add(
        "o2",
        tok.encode("More"),
        30,
        SamplingParams(temperature=0.7, seed=42, structured=StructuredOutput("json_object")),
    )
    crowd.step()
    crowd.add("s", tok.encode("Points:"), 100, sampling)
    assert crowd.run()["s"] == expected


def test_bounded_json_strings_hold_no_raw_control_characters(setup):
    # xgrammar 0.2.9 allows them in a string with maxLength; JSON parsers refuse them.
    engine, _, tok = setup
    schema = StructuredOutput("json_schema", json.dumps({"type": "string", "maxLength": 5}))
    row = engine.grammars.row_grammar(SamplingParams(structured=schema), tok.encode('"'))
    mask = GrammarMask(engine.grammars.vocab_size, engine.device).additive([row], engine.grammars.vocab_size)

    def allowed(text):
        (token,) = tok.encode(text)
        return mask[0, token].item() == 0.0

    assert allowed("a") and allowed('"')
    assert not allowed("\x06") and not allowed("\t")


def test_a_resumed_row_whose_tokens_break_its_grammar_is_held_to_stop_tokens(setup):
    engine, info, tok = setup
    choice = StructuredOutput("choice", json.dumps(["red", "blue"]))
    row = engine.grammars.row_grammar(SamplingParams(structured=choice), tok.encode("green"))
    assert row.free
    mask = GrammarMask(engine.grammars.vocab_size, engine.device).additive([row], engine.grammars.vocab_size)
    assert (mask[0] == 0).nonzero().flatten().tolist() == sorted(info.eos_token_ids)


# ---- a model that thinks first (the gateway's reasoning parser): the grammar after </think> -----
def _think_ids(tok) -> tuple[int, int]:
    """Two single tokens no answer of PATTERN holds, standing for <think> and </think> (Qwen3's
    are added tokens too): <|im_start|> and the token of "?"."""
    (open_id,) = tok.encode("?")
    return open_id, tok.convert_tokens_to_ids("<|im_start|>")


def _greedy(
    setup, structured: StructuredOutput | None, bias: dict[int, float], max_tokens: int = 24
) -> list[int]:
    engine, info, tok = setup
    driver = PlanDriver(engine.execute, info.block_size, info.num_blocks, info.eos_token_ids, chunk_size=32)
    driver.add(
        "r",
        tok.encode("Hello"),
        max_tokens,
        SamplingParams(temperature=0.0, structured=structured, max_tokens=max_tokens, logit_bias=bias),
    )
    return driver.run()["r"]


def test_the_grammar_starts_after_the_thinking(setup):
    _, info, tok = setup
    open_id, end_id = _think_ids(tok)
    after = StructuredOutput("regex", PATTERN, think_end=end_id)
    # Thinking that never ends is free: the very tokens of an unconstrained run.
    never = {end_id: -100.0}
    free = _greedy(setup, None, never)
    assert _greedy(setup, after, never) == free
    assert not re.fullmatch(PATTERN, tok.decode(free)), "the grammar would have changed it"
    # </think> first: the grammar holds from the next token on (</think> stays favoured, but
    # the grammar does not allow it).
    out = _greedy(setup, after, {end_id: 100.0})
    assert out[0] == end_id and out[-1] in info.eos_token_ids, tok.decode(out)
    assert re.fullmatch(PATTERN, tok.decode(out[1:-1])), tok.decode(out)


def test_an_output_that_may_not_think_opens_with_the_grammar_or_the_thinking(setup):
    _, info, tok = setup
    open_id, end_id = _think_ids(tok)
    maybe = StructuredOutput("regex", PATTERN, think_end=end_id, think_open=open_id)
    # Not opened: constrained from the first token, as without a reasoning parser.
    assert _greedy(setup, maybe, {open_id: -100.0}) == _greedy(
        setup, StructuredOutput("regex", PATTERN), {open_id: -100.0}
    )
    # Opened: free (here <think> again and again, which the grammar would never allow).
    out = _greedy(setup, maybe, {open_id: 100.0, end_id: -100.0})
    assert out == [open_id] * 24
    # Opened, then closed at once: then the grammar.
    out = _greedy(setup, maybe, {open_id: 100.0, end_id: 200.0})  # </think> is not the grammar's first
    assert out[:2] == [open_id, end_id] and out[-1] in info.eos_token_ids, tok.decode(out)
    assert re.fullmatch(PATTERN, tok.decode(out[2:-1])), tok.decode(out)


def test_a_resumed_row_knows_whether_its_thinking_ended(setup):
    engine, _, tok = setup
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


def test_mask_token_ids_outside_the_vocab_are_an_invalid_plan(setup):
    engine, info, _ = setup
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


@pytest.mark.slow
def test_the_worker_process_applies_masks_and_grammars_sent_over_the_wire(setup, model_dirs):
    """msgpack carries the constraint and the masks; the worker process reads its tokenizer
    itself and gives the in-process engine's tokens."""
    engine, info, tok = setup
    samplings = {
        "schema": SamplingParams(
            temperature=0.0, structured=StructuredOutput("json_schema", json.dumps(PERSON))
        ),
        "choice": SamplingParams(
            temperature=1.0, seed=5, structured=StructuredOutput("choice", json.dumps(CHOICES))
        ),
        "masks": SamplingParams(
            temperature=1.0,
            seed=6,
            logit_bias={40: 5.0},
            allowed_token_ids=list(range(30, 60)),
            bad_words=[[41], [42, 43]],
            ignore_eos=True,
        ),
    }
    scheduler = FakeScheduler()
    proc = start_worker(
        "--model",
        str(model_dirs["qwen2"]),
        "--scheduler-address",
        scheduler.address,
        "--device",
        "cpu",
        "--kv-cache-memory",
        "64MiB",
        "--worker-id",
        "w-struct",
    )
    try:
        reg = scheduler.recv()
        remote = PlanDriver(scheduler.execute, reg.block_size, reg.num_blocks, reg.eos_token_ids)
        local = PlanDriver(engine.execute, info.block_size, info.num_blocks, info.eos_token_ids)
        for driver in (remote, local):
            for name, sampling in samplings.items():
                driver.add(name, tok.encode("A request:"), 120, sampling)
        got = remote.run()
        assert got == local.run()
        jsonschema.validate(json.loads(tok.decode(got["schema"][:-1])), PERSON)
        assert tok.decode(got["choice"][:-1]) in CHOICES
        assert set(got["masks"]) <= set(range(30, 60)) - {41}
    finally:
        proc.kill()
        proc.wait()
        scheduler.close()


@pytest.mark.parametrize(
    "kind, spec", [("json_schema", json.dumps({"type": "string", "maxLength": 5})), ("regex", "[^a]{1,4}")]
)
def test_no_utf16_surrogate_ever_gets_through(setup, kind, spec):
    """xgrammar's negated classes take U+D800..U+DFFF, whose UTF-8 form (ED A0..BF xx) is
    not valid UTF-8 (a decoder shows three U+FFFD, and maxLength breaks): never inside a
    token, and never after a token that ends in byte ED."""
    engine, _, _ = setup
    grammars = engine.grammars
    row = grammars.row_grammar(SamplingParams(structured=StructuredOutput(kind, spec)), [])
    token_bytes = grammars.token_bytes
    if kind == "json_schema":
        row.accept(token_bytes.index(b'"'))
    mask = GrammarMask(grammars.vocab_size, engine.device)
    allowed = lambda: {
        i for i, v in enumerate(mask.additive([row], grammars.vocab_size)[0].tolist()) if v == 0
    }
    first = allowed()
    assert not any(re.search(rb"\xed[\xa0-\xbf]", token_bytes[i]) for i in first)
    row.accept(token_bytes.index(b"\xed"))
    after_ed = allowed()
    assert after_ed, "a valid continuation (80..9F) stays allowed"
    assert all(token_bytes[i][:1] and token_bytes[i][0] < 0xA0 for i in after_ed if token_bytes[i])
