"""Structured outputs through the whole engine on a tiny random model: at temperature 0 and 1
and several seeds, every output obeys its constraint (JSON validated by jsonschema, choices,
regexes, EBNF) and ends with EOS; a request cut by max_tokens is a valid prefix; a request
preempted or migrated mid-structure continues validly, greedy token for token; the worker
process applies what comes over the wire. The masks themselves are checked in
test_grammar_masks.py, a model that thinks first in test_structured_thinking.py.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import xgrammar as xgr

from shared.messages import SamplingParams, StructuredOutput
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


def run(
    qwen2_engine,
    structured: StructuredOutput,
    max_tokens: int = 120,
    prompts=("Hello", "Write JSON:"),
    **params,
):
    """Every (prompt, sampling) pair as one batch; returns {request_id: output tokens}."""
    engine, info, tok = qwen2_engine
    driver = PlanDriver(engine.execute, info.block_size, info.num_blocks, info.eos_token_ids, chunk_size=32)
    for p, prompt in enumerate(prompts):
        for name, temperature, seed in SAMPLINGS:
            sampling = SamplingParams(
                temperature=temperature, seed=seed, structured=structured, max_tokens=max_tokens, **params
            )
            driver.add(f"{name}/{p}", tok.encode(prompt), max_tokens, sampling)
    return driver.run()


def finished_texts(qwen2_engine, outputs: dict[str, list[int]], max_tokens: int = 120) -> list[str]:
    """The texts, after checking that each request ended by sampling EOS (finish "stop")."""
    _, info, tok = qwen2_engine
    texts = []
    for rid, tokens in outputs.items():
        assert tokens[-1] in info.eos_token_ids and len(tokens) < max_tokens, (rid, tok.decode(tokens))
        texts.append(tok.decode(tokens[:-1]))
    return texts


@pytest.mark.parametrize("schema", [PERSON, POINTS], ids=["person", "points"])
def test_json_schema_outputs_validate(qwen2_engine, schema):
    outputs = run(qwen2_engine, StructuredOutput("json_schema", json.dumps(schema)))
    for text in finished_texts(qwen2_engine, outputs):
        jsonschema.validate(json.loads(text), schema)


def test_json_object_is_an_object(qwen2_engine):
    # Any object may nest without end on a random model: enough room, and a closing bias
    # would be cheating; the ones that finish must be objects, the rest valid prefixes.
    outputs = run(qwen2_engine, StructuredOutput("json_object"), max_tokens=200)
    _, info, tok = qwen2_engine
    finished = {rid: t for rid, t in outputs.items() if t[-1] in info.eos_token_ids}
    assert finished
    for tokens in finished.values():
        assert isinstance(json.loads(tok.decode(tokens[:-1])), dict)
    for rid in set(outputs) - set(finished):
        matcher = fresh_matcher(qwen2_engine, StructuredOutput("json_object"))
        assert all(matcher.accept_token(t) for t in outputs[rid]) and tok.decode(outputs[rid]).startswith("{")


def test_choice_is_one_of_the_choices(qwen2_engine):
    outputs = run(qwen2_engine, StructuredOutput("choice", json.dumps(CHOICES, ensure_ascii=False)))
    texts = finished_texts(qwen2_engine, outputs)
    assert set(texts) <= set(CHOICES)
    assert len(set(texts)) > 1  # the seeds do not all agree


def test_regex_matches_fully(qwen2_engine):
    for text in finished_texts(qwen2_engine, run(qwen2_engine, StructuredOutput("regex", PATTERN))):
        assert re.fullmatch(PATTERN, text), text


def test_ebnf_grammar(qwen2_engine):
    for text in finished_texts(
        qwen2_engine, run(qwen2_engine, StructuredOutput("grammar", EBNF), max_tokens=200), 200
    ):
        assert re.fullmatch(r"\((\d|ab)(,(\d|ab)){0,4}\)", text), text


def test_whitespace_is_compact_unless_asked(qwen2_engine):
    compact = run(qwen2_engine, StructuredOutput("json_schema", json.dumps(PERSON)))
    for text in finished_texts(qwen2_engine, compact):
        assert "\n" not in text and "  " not in text


def test_a_request_cut_by_max_tokens_is_a_valid_prefix(qwen2_engine):
    _, info, tok = qwen2_engine
    outputs = run(qwen2_engine, StructuredOutput("regex", r"[a-z]{40}"), max_tokens=6)
    for tokens in outputs.values():
        text = tok.decode(tokens)
        assert len(tokens) == 6 and not set(tokens) & set(info.eos_token_ids)
        assert re.fullmatch(r"[a-z]{1,39}", text), text
    # A JSON cut short: every token is one a fresh matcher of the same schema accepts.
    schema = json.dumps(PERSON)
    for tokens in run(qwen2_engine, StructuredOutput("json_schema", schema), max_tokens=8).values():
        assert len(tokens) == 8
        matcher = fresh_matcher(qwen2_engine, StructuredOutput("json_schema", schema))
        assert all(matcher.accept_token(t) for t in tokens) and not matcher.is_completed()


def fresh_matcher(qwen2_engine, so: StructuredOutput):
    engine, info, _ = qwen2_engine
    return xgr.GrammarMatcher(
        compile_output(engine.grammars.compiler, so), override_stop_tokens=info.eos_token_ids
    )


@pytest.mark.parametrize("temperature,seed", [(0.0, None), (1.0, 11)])
def test_preempted_and_migrated_requests_continue_validly(qwen2_engine, model_dirs, temperature, seed):
    engine, info, tok = qwen2_engine
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


def test_compiled_grammars_are_reused(qwen2_engine):
    engine, _, _ = qwen2_engine
    so = StructuredOutput("json_schema", json.dumps(POINTS))
    run(qwen2_engine, so, max_tokens=4)
    size = engine.grammars.compiler.get_cache_size_bytes()
    run(qwen2_engine, so, max_tokens=4)
    assert engine.grammars.compiler.get_cache_size_bytes() == size
    run(qwen2_engine, StructuredOutput("regex", r"\d+z"), max_tokens=4)
    assert engine.grammars.compiler.get_cache_size_bytes() > size


def test_a_constraint_the_worker_cannot_compile_ends_its_request_only(qwen2_engine):
    _, info, tok = qwen2_engine
    engine = qwen2_engine[0]
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


def test_min_tokens_yields_to_a_complete_grammar(qwen2_engine):
    _, info, _ = qwen2_engine
    outputs = run(
        qwen2_engine, StructuredOutput("choice", json.dumps(["a", "b"])), max_tokens=30, min_tokens=10
    )
    for tokens in outputs.values():
        assert tokens[-1] in info.eos_token_ids and len(tokens) < 10


def test_ignore_eos_after_the_structure_keeps_the_text_valid(qwen2_engine):
    _, info, tok = qwen2_engine
    outputs = run(
        qwen2_engine, StructuredOutput("choice", json.dumps(CHOICES[:3])), max_tokens=16, ignore_eos=True
    )
    for tokens in outputs.values():
        assert len(tokens) == 16 and tokens[-1] in info.eos_token_ids  # stop tokens until max_tokens
        assert tok.decode(tokens, skip_special_tokens=True) in CHOICES[:3]


def test_seeded_constrained_request_is_the_same_in_any_batch(qwen2_engine):
    engine, info, tok = qwen2_engine
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


@pytest.mark.slow
def test_the_worker_process_applies_masks_and_grammars_sent_over_the_wire(qwen2_engine, model_dirs):
    """msgpack carries the constraint and the masks; the worker process reads its tokenizer
    itself and gives the in-process engine's tokens."""
    engine, info, tok = qwen2_engine
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
