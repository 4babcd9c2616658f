"""Speculative decoding with n-gram prompt lookup: the scheduler's core proposes, a real
engine verifies, in process. Greedy output is the same token for token with and without
speculation (and equal to transformers'), proposals are accepted where the model repeats
its context, and stop rules, max_tokens and logprobs hold for tokens that come several
to a step."""

from __future__ import annotations

import random

import pytest
import torch

from conveyor.status import render
from services.gpu_worker.factory import create_engine
from services.gpu_worker.kv_cache import bytes_per_block
from services.gpu_worker.loader import load_config, model_shape
from services.scheduler.core import SchedulerCore
from services.scheduler.policy import Limits
from services.scheduler.speculation import StepCost
from shared.config import WorkerSettings
from shared.figure_records import SchedulerFigures, SystemStatus
from shared.messages import SamplingParams, StructuredOutput, SubmitRequest
from shared.speculative import NgramIndex, SpeculativeConfig, ngram_propose, parse_config
from tests.gpu_worker.conftest import make_engine
from tests.gpu_worker.hf_reference import assert_greedy_matches, hf_greedy
from tests.scheduler.helpers import Outputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NGRAM = SpeculativeConfig(method="ngram", num_speculative_tokens=4, prompt_lookup_max=3, prompt_lookup_min=1)


def test_ngram_proposes_what_followed_the_latest_match_of_the_longest_tail():
    tokens = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    assert ngram_propose(tokens, 3, 1, 3) == [7, 8, 5], "the latest earlier [1, 2, 3]"
    assert ngram_propose(tokens, 10, 1, 3) == [7, 8, 5, 1, 2, 3], "as far as the text goes"
    assert ngram_propose([4, 5, 6, 5], 2, 1, 3) == [6, 5], "a one-token tail"
    assert ngram_propose([4, 5, 6, 7], 2, 1, 3) == [], "nothing recurs"
    assert ngram_propose([4, 5, 6, 5], 2, 2, 3) == [], "shorter than prompt_lookup_min"
    assert ngram_propose([7], 2, 1, 3) == []


def test_the_config_is_vllm_s_json_and_a_bad_one_says_what_is_wrong():
    assert parse_config(None) is None and parse_config("") is None
    config = parse_config('{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4}')
    assert (config.num_speculative_tokens, config.prompt_lookup_max, config.prompt_lookup_min) == (5, 4, 4)
    for text, words in [
        ("{", "not JSON"),
        ('{"method": "eagle", "num_speculative_tokens": 2}', "method"),
        ('{"method": "ngram"}', "num_speculative_tokens"),
        (
            '{"method": "ngram", "num_speculative_tokens": 2, '
            '"prompt_lookup_min": 5, "prompt_lookup_max": 3}',
            "exceeds",
        ),
        ('{"method": "ngram", "num_speculative_tokens": 2, "typo": 1}', "typo"),
    ]:
        with pytest.raises(ValueError, match=words):
            parse_config(text)


def test_the_lookup_lengths_default_as_vllm_s():
    config = parse_config('{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4}')
    assert (config.prompt_lookup_min, config.prompt_lookup_max) == (4, 4), "min defaults to max"
    config = parse_config('{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_min": 2}')
    assert (config.prompt_lookup_min, config.prompt_lookup_max) == (2, 2), "max defaults to min"
    config = parse_config('{"method": "ngram", "num_speculative_tokens": 5}')
    assert (config.prompt_lookup_min, config.prompt_lookup_max) == (5, 5)


def test_the_scheduler_s_ngram_index_proposes_what_a_scan_does():
    rng = random.Random(3)
    for _ in range(200):
        vocab, low = rng.choice([3, 5, 20]), rng.randint(1, 3)
        high = rng.randint(low, 5)
        tokens = [rng.randrange(vocab) for _ in range(rng.randint(1, 10))]
        index = NgramIndex(low, high)
        for _ in range(40):  # a sequence that grows by one to four tokens a step
            k = rng.randint(1, 5)
            assert index.propose(tokens, k) == ngram_propose(tokens, k, low, high), (tokens, k, low, high)
            tokens += [rng.randrange(vocab) for _ in range(rng.randint(1, 4))]


class AlwaysPays(StepCost):
    def threshold(self, decoding_rows: int, drafting: bool = False) -> float:
        return 0.0


def serve_requests(model_dir, prompts, speculative, blocks: int | None = None, tamper=None, **sampling):
    """Every prompt through a SchedulerCore and a real engine (with `blocks` KV blocks of 16
    tokens, else 64 MiB of them); {index: output tokens}, the Outputs (finishes, logprobs)
    and the core's counters. Checks that every block is free again at the end: speculative
    slots included. `tamper`: changes each StepResult before the core reads it."""
    config = None if speculative is None else speculative.model_dump_json(exclude_none=True)
    if blocks is None:
        engine, info = make_engine(model_dir, speculative_config=config)
    else:
        shapes = [
            model_shape(load_config(d))
            for d in [model_dir, *([speculative.model] if config and speculative.model else [])]
        ]
        engine, info = create_engine(
            WorkerSettings(
                model=str(model_dir),
                device="cpu",
                dtype="float32",
                worker_id="test-worker",
                max_model_len=blocks * 16,
                kv_cache_memory=str(blocks * sum(bytes_per_block(s, 16, torch.float32) for s in shapes)),
                speculative_config=config,
            )
        )
        assert info.num_blocks == blocks
    core = SchedulerCore(Limits(max_num_batched_tokens=64, max_prefill_chunk=32, speculative=speculative))
    core.add_worker(info, 0.0)
    # Every proposal made, whatever the steps' timings say: the same plans on every run.
    core.workers[info.worker_id].step_cost = AlwaysPays()
    for i, prompt in enumerate(prompts):
        params = SamplingParams(**{"temperature": 0.0, "max_tokens": 40, "ignore_eos": True, **sampling})
        assert core.add_request(SubmitRequest(str(i), prompt, params, "tcp://gateway", float(i), 0, None))
    outputs = Outputs()
    for _ in range(2000):
        plan = core.next_plan(info.worker_id, 0.0, 0.0)
        if plan is None:
            break
        result = engine.execute(plan)
        core.on_step_result(tamper(result) if tamper else result)
        outputs.collect(core)
    assert len(outputs.finish) == len(prompts), "every request finished"
    assert core.workers[info.worker_id].pool.num_free == info.num_blocks, "no block leaked"
    return {int(k): v for k, v in outputs.tokens.items()}, outputs, core.counters


def copy_prompts(vocab: int) -> list[list[int]]:
    """Prompts that repeat themselves, as copy-heavy requests do, and one that does not."""
    rng = random.Random(5)
    phrase = [rng.randrange(3, vocab) for _ in range(12)]
    return [
        phrase * 3,
        [rng.randrange(3, vocab) for _ in range(5)] + phrase * 2,
        [rng.randrange(3, vocab) for _ in range(30)],
    ]


def test_greedy_output_is_the_same_with_speculation_and_equals_transformers(model_dirs):
    model_dir = model_dirs["qwen2"]
    prompts = copy_prompts(4096)
    plain, _, off = serve_requests(model_dir, prompts, None)
    spec, outs, on = serve_requests(model_dir, prompts, NGRAM)
    assert spec == plain  # these prompts have no near-tie (checked against transformers below)
    assert off.spec_drafts == 0 and on.spec_drafts > 0 and on.spec_accepted_tokens > 0, on
    assert on.spec_accepted_tokens <= on.spec_draft_tokens
    assert all(len(t) == 40 and outs.finish[str(i)].finish_reason.value == "length" for i, t in spec.items())
    for i, want in enumerate(hf_greedy(model_dir, prompts, 40, ignore_eos=True)):
        assert_greedy_matches(spec[i], want, f"prompt {i}")
    # What `conveyor status` shows of it, for the scheduler and per worker.
    figures = SchedulerFigures(
        updated_at=0.0,
        spec_drafts=on.spec_drafts,
        spec_draft_tokens=on.spec_draft_tokens,
        spec_accepted_tokens=on.spec_accepted_tokens,
    )
    screen = render(
        SystemStatus(scheduler=figures, workers={}, errors=[], queue_length=0, pending=0), 0.0, "test"
    )
    mean = 1 + on.spec_accepted_tokens / on.spec_drafts
    assert f"{on.spec_accepted_tokens}/{on.spec_draft_tokens} proposed tokens accepted" in screen
    assert f"in {on.spec_drafts} decodes, mean accepted length {mean:.2f}" in screen


def test_speculation_under_preemption_gives_the_same_tokens_and_frees_every_block(model_dirs):
    """10 blocks for three requests of up to 5: they are preempted and recomputed, with
    proposals' slots given only while blocks last."""
    model_dir = model_dirs["qwen2"]
    prompts = copy_prompts(4096)
    plain, _, off = serve_requests(model_dir, prompts, None, blocks=10)
    spec, _, on = serve_requests(model_dir, prompts, NGRAM, blocks=10)
    assert off.preemptions > 0 and on.preemptions > 0, (off, on)
    assert on.spec_accepted_tokens > 0
    # Token for token, by the tests' rule (batch composition may flip an fp32 near-tie).
    for i, want in enumerate(hf_greedy(model_dir, prompts, 40, ignore_eos=True)):
        assert_greedy_matches(spec[i], want, f"speculated, prompt {i}")
        assert_greedy_matches(plain[i], want, f"plain, prompt {i}")


def test_a_verification_that_contradicts_the_drafts_recomputes_the_request(model_dirs):
    """A worker whose accepted tokens are not the drafts' prefix (a bug there) does not
    corrupt the output: the request is recomputed from its tokens, as after a failed step."""
    import msgspec

    model_dir = model_dirs["qwen2"]
    prompts = copy_prompts(4096)
    plain, _, _ = serve_requests(model_dir, prompts, None)
    tampered = []

    def tamper(result):
        if result.accepted_token_ids and not tampered:
            rid, accepted = next(iter(result.accepted_token_ids.items()))
            tampered.append(rid)
            return msgspec.structs.replace(
                result,
                accepted_token_ids={**result.accepted_token_ids, rid: [t + 1 for t in accepted] or [1]},
            )
        return result

    spec, _, counters = serve_requests(model_dir, prompts, NGRAM, tamper=tamper)
    assert tampered and counters.step_errors == 1
    assert spec == plain


def test_stops_and_logprobs_hold_when_tokens_come_several_to_a_step(model_dirs):
    model_dir = model_dirs["qwen2"]
    prompts = copy_prompts(4096)
    plain, _, _ = serve_requests(model_dir, prompts, None, max_tokens=40)
    # A stop token that falls inside a run of accepted tokens ends the output right there.
    stop = plain[0][17]
    cut = plain[0].index(stop) + 1
    for tokens, outs, _ in (
        serve_requests(model_dir, prompts[:1], None, stop_token_ids=[stop]),
        serve_requests(model_dir, prompts[:1], NGRAM, stop_token_ids=[stop]),
    ):
        assert tokens[0] == plain[0][:cut] and outs.finish["0"].finish_reason.value == "stop"
    # max_tokens is exact, however many tokens a step accepts.
    for n in (1, 2, 7):
        assert serve_requests(model_dir, prompts, NGRAM, max_tokens=n)[0] == {
            i: t[:n] for i, t in plain.items()
        }
    # Logprobs of every emitted token, accepted drafts included, equal the plain run's.
    with_lp, spec_lp = (serve_requests(model_dir, prompts, spec, logprobs=2) for spec in (None, NGRAM))
    assert spec_lp[2].spec_accepted_tokens > 0
    with_lp, spec_lp = with_lp[1].logprobs, spec_lp[1].logprobs
    assert len(with_lp) == len(prompts)
    for i in with_lp:
        assert [lp.token_id for lp in spec_lp[i]] == [lp.token_id for lp in with_lp[i]] == plain[int(i)]
        for a, b in zip(spec_lp[i], with_lp[i]):
            assert abs(a.logprob - b.logprob) < 1e-4
            assert [t for t, _ in a.top] == [t for t, _ in b.top]


@pytest.mark.parametrize(
    "sampling",
    [
        pytest.param(dict(temperature=0.6, top_k=3, seed=11), id="seeded-sampled"),
        pytest.param(
            dict(repetition_penalty=1.3, frequency_penalty=0.2, bad_words=[[7, 8]], min_tokens=12),
            id="greedy-penalties-bad-words-min-tokens",
        ),
        pytest.param(
            dict(structured=StructuredOutput("json_object"), ignore_eos=False, max_tokens=60), id="grammar"
        ),
        pytest.param(
            dict(
                temperature=0.8,
                seed=3,
                logprobs=1,
                structured=StructuredOutput("regex", r"(ab|cd|[0-9]{1,3}-)+"),
                ignore_eos=False,
                max_tokens=60,
            ),
            id="sampled-grammar",
        ),
    ],
)
def test_every_kind_of_request_gets_the_same_tokens_with_speculation(model_dirs, sampling):
    """Each position of a speculated row is sampled as it will be with the drafts before it:
    seeded draws, penalties, bad words, min_tokens and grammars give the plain run's tokens."""
    model_dir = model_dirs["qwen2"]
    prompts = copy_prompts(4096)
    plain, plain_outs, _ = serve_requests(model_dir, prompts, None, **sampling)
    spec, spec_outs, on = serve_requests(model_dir, prompts, NGRAM, **sampling)
    assert on.spec_drafts > 0 and on.spec_accepted_tokens > 0, on
    assert spec == plain
    assert {k: f.finish_reason for k, f in spec_outs.finish.items()} == {
        k: f.finish_reason for k, f in plain_outs.finish.items()
    }
    if sampling.get("logprobs") is not None:
        for i in plain_outs.logprobs:
            for a, b in zip(spec_outs.logprobs[i], plain_outs.logprobs[i], strict=True):
                assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-4


def test_every_position_row_has_a_grammar_of_its_own():
    """The batch mask fill runs matchers on threads at once: no two rows may share one, also
    after a draft the grammar refuses (the rows after it keep the place before it)."""
    from services.gpu_worker.sampling_row import SamplingRow

    class Grammar:
        def __init__(self, taken=()):
            self.taken = list(taken)

        def fork(self):
            return Grammar(self.taken)

        def try_accept(self, token_id):
            if token_id == 99:  # refused
                return False
            self.taken.append(token_id)
            return True

    row = SamplingRow(SamplingParams(temperature=0.0), [1, 2, 3], 2, grammar=Grammar())
    rows = row.ahead([5, 99, 6])
    assert rows[0] is row and len({id(r.grammar) for r in rows}) == 4
    # After the refused 99 the row keeps [5]; what follows is never used (99 is rejected).
    assert [r.grammar.taken for r in rows] == [[], [5], [5], [5, 6]]
    assert [r.num_output_tokens for r in rows] == [1, 2, 3, 4] and row.grammar.taken == []
