"""Speculative decoding with a draft model (vLLM's method "draft_model"): the scheduler asks
how many tokens, the worker's draft model drafts them on its own paged KV cache and the
target verifies them in the same step. Output is the plain run's token for token, whatever
the draft; a draft that is the target itself has every greedy proposal accepted, which only
holds if its cache has no holes (prompt, accepted, rejected, preempted)."""

from __future__ import annotations

import random

import pytest
import torch

from bench.draft_model import truncated_draft
from conveyor.tiny_model import make_model
from services.gpu_worker.batch import ScheduledRow, build_batch
from services.gpu_worker.drafter import Drafter
from services.gpu_worker.kv_cache import allocate_kv_cache
from services.gpu_worker.loader import load_model
from services.scheduler.core import SchedulerCore
from services.scheduler.policy import Limits
from shared.messages import SamplingParams, StepPlan, SubmitRequest
from shared.models import ModelLoadError
from shared.speculative import SpeculativeConfig, parse_config
from tests.gpu_worker.conftest import make_engine
from tests.gpu_worker.hf_reference import assert_greedy_matches, hf_greedy
from tests.gpu_worker.test_speculative import AlwaysPays, copy_prompts, serve_requests
from tests.scheduler.helpers import Outputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _draft(model: str, k: int = 4) -> SpeculativeConfig:
    return SpeculativeConfig(method="draft_model", model=model, num_speculative_tokens=k)


@pytest.fixture(scope="module")
def target(model_dirs):
    return model_dirs["qwen2"]


@pytest.fixture(scope="module")
def one_layer_draft(target, tmp_path_factory):
    return truncated_draft(target, 1, tmp_path_factory.mktemp("draft") / "one-layer")


def test_the_draft_model_config_is_vllm_s_and_a_bad_one_says_what_is_wrong():
    config = parse_config('{"method": "draft_model", "model": "/m", "num_speculative_tokens": 3}')
    assert (config.method, config.model, config.num_speculative_tokens) == ("draft_model", "/m", 3)
    assert config.prompt_lookup_min is None
    for text, words in [
        ('{"method": "draft_model", "num_speculative_tokens": 3}', 'needs "model"'),
        (
            '{"method": "draft_model", "model": "/m", "num_speculative_tokens": 3, "prompt_lookup_max": 2}',
            'prompt_lookup_max: only for method "ngram"',
        ),
        ('{"method": "ngram", "model": "/m", "num_speculative_tokens": 3}', "model: only for"),
        (
            '{"method": "draft_model", "model": "/m", "num_speculative_tokens": 3, '
            '"draft_tensor_parallel_size": 1}',
            "draft_tensor_parallel_size",
        ),
    ]:
        with pytest.raises(ValueError, match=words):
            parse_config(text)


def test_greedy_output_is_the_same_with_a_draft_model_and_equals_transformers(target, one_layer_draft):
    prompts = copy_prompts(4096)
    plain, _, _ = serve_requests(target, prompts, None)
    itself, _, same = serve_requests(target, prompts, _draft(str(target)))
    truncated, _, other = serve_requests(target, prompts, _draft(str(one_layer_draft)))
    assert itself == truncated == plain
    for i, want in enumerate(hf_greedy(target, prompts, 40, ignore_eos=True)):
        assert_greedy_matches(itself[i], want, f"prompt {i}")
    # The target as its own draft: every proposal is what the target then chooses.
    assert same.spec_draft_tokens > 50 and same.spec_accepted_tokens == same.spec_draft_tokens, same
    # A one-layer cut of a random model guesses worse, and costs nothing in output.
    assert other.spec_draft_tokens > 50 and other.spec_accepted_tokens < other.spec_draft_tokens, other


def test_a_draft_model_under_preemption_gives_the_same_tokens_and_frees_every_block(target):
    prompts = copy_prompts(4096)
    plain, _, _ = serve_requests(target, prompts, None, blocks=10)
    spec, _, on = serve_requests(target, prompts, _draft(str(target)), blocks=10)
    assert on.preemptions > 0 and on.spec_accepted_tokens == on.spec_draft_tokens > 0, on
    assert spec == plain


@pytest.mark.parametrize(
    "sampling",
    [
        pytest.param(dict(temperature=0.6, top_k=3, seed=11, logprobs=1), id="seeded-sampled"),
        pytest.param(dict(repetition_penalty=1.3, bad_words=[[7, 8]], min_tokens=12), id="greedy-penalties"),
    ],
)
def test_sampled_and_penalised_requests_get_the_same_tokens_with_a_draft_model(target, sampling):
    prompts = copy_prompts(4096)
    plain, plain_outs, _ = serve_requests(target, prompts, None, **sampling)
    spec, spec_outs, on = serve_requests(target, prompts, _draft(str(target)), **sampling)
    assert on.spec_draft_tokens > 0 and spec == plain
    for i in plain_outs.logprobs:
        for a, b in zip(spec_outs.logprobs[i], plain_outs.logprobs[i], strict=True):
            assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-4


def test_the_drafter_proposes_what_its_model_gives_over_the_whole_text(target, one_layer_draft):
    """Whatever was accepted before, the draft's proposals equal a from-scratch greedy run of
    the draft model over the row's whole text: its cache has no holes and no stale tokens."""
    device, bs = torch.device("cpu"), 16
    model = load_model(one_layer_draft, device, torch.float32, _backend())
    drafter = Drafter(model, allocate_kv_cache(model.shape, 32, bs, torch.float32, device), bs, "draft")

    class Row:
        def __init__(self, tokens):
            self.token_ids, self.block_ids, self.draft_computed = tokens, list(range(12)), 0

    rng = random.Random(2)
    row = Row([rng.randrange(3, 4096) for _ in range(21)])
    for _ in range(12):
        k = rng.randint(1, 5)
        proposed = drafter.propose([row], [k]).tokens[0]
        assert proposed == _greedy(model, row.token_ids, k, bs), f"after {len(row.token_ids)} tokens"
        accepted = rng.randint(0, k)
        drafter.verified(row, k, accepted)
        row.token_ids = row.token_ids + proposed[:accepted] + [rng.randrange(3, 4096)]


def _greedy(model, tokens: list[int], k: int, bs: int) -> list[int]:
    """k greedy tokens of `model` after `tokens`, each from a fresh cache over the whole text."""
    out = []
    for _ in range(k):
        text = tokens + out
        cache = allocate_kv_cache(model.shape, 12, bs, torch.float32, torch.device("cpu"))
        batch = build_batch([ScheduledRow(text, list(range(12)), 0, len(text))], bs, torch.device("cpu"))
        with torch.inference_mode():
            hidden = model.forward(batch.input_ids, batch.positions, batch.meta, cache)
            out.append(int(model.compute_logits(hidden[-1:]).argmax(-1)))
    return out


def _backend():
    from kernels import get_attention_backend

    return get_attention_backend(torch.device("cpu"))


def test_a_worker_without_a_draft_model_refuses_a_plan_asking_drafts_and_gets_none(target):
    engine, info = make_engine(target)
    assert info.draft_model == ""
    result = engine.execute(StepPlan(step_id=1, num_scheduled_tokens={"x": 3}, num_draft_tokens={"x": 2}))
    assert result.error and "without a draft model" in result.error
    # The scheduler asks drafts only of workers that have a draft model: this one gets none.
    core = SchedulerCore(Limits(speculative=_draft("/d")))
    core.add_worker(info, 0.0)
    core.workers[info.worker_id].step_cost = AlwaysPays()
    prompts = copy_prompts(4096)
    for i, prompt in enumerate(prompts):
        assert core.add_request(
            SubmitRequest(
                str(i),
                prompt,
                SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True),
                "gw",
                0.0,
                0,
                None,
            )
        )
    outputs = Outputs()
    while (plan := core.next_plan(info.worker_id, 0.0, 0.0)) is not None:
        assert not plan.num_draft_tokens
        core.on_step_result(engine.execute(plan))
        outputs.collect(core)
    assert core.counters.spec_drafts == 0 and core.counters.step_errors == 0
    assert {int(k): v for k, v in outputs.tokens.items()} == serve_requests(target, prompts, None)[0]


def test_a_draft_model_that_cannot_serve_stops_the_worker_at_start_up_saying_why(target, tmp_path):
    other_vocab = make_model(
        tmp_path / "vocab", arch="qwen2", preset="tiny", num_hidden_layers=1, vocab_size=1024
    )
    short = make_model(
        tmp_path / "short", arch="qwen2", preset="tiny", num_hidden_layers=1, max_position_embeddings=64
    )
    for draft, words in [
        (other_vocab, "vocabulary"),
        (short, "64 positions"),
        (tmp_path / "missing", "draft model: model directory"),
    ]:
        with pytest.raises(ModelLoadError, match=words):
            make_engine(target, speculative_config=_draft(str(draft)).model_dump_json(exclude_none=True))
