"""Seeded sampling through the whole engine: a request's tokens depend on its seed and
its own logits only — not on the batch around it, nor on a preemption in between."""

from __future__ import annotations

from shared.messages import SamplingParams
from tests.gpu_worker.conftest import make_engine
from tests.gpu_worker.plan_driver import PlanDriver
from tests.gpu_worker.test_engine_vs_hf import random_prompts

SEEDED = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True, logprobs=2)


def _driver(model_dir, chunk_size=64):
    engine, info = make_engine(model_dir)
    return PlanDriver(engine.execute, info.block_size, info.num_blocks, info.eos_token_ids, chunk_size), info


def test_seeded_request_same_alone_and_in_a_batch(model_dirs):
    model_dir = model_dirs["qwen2"]
    alone, info = _driver(model_dir)
    prompt = random_prompts(seed=5, vocab=info.vocab_size, lengths=[37])[0]
    alone.add("s", prompt, 24, SEEDED)
    expected = alone.run()["s"]

    crowd, _ = _driver(model_dir, chunk_size=9)
    others = random_prompts(seed=6, vocab=info.vocab_size, lengths=[5, 60, 13, 100])
    crowd.add("o0", others[0], 30, SamplingParams(temperature=1.0, ignore_eos=True))  # unseeded
    crowd.add("o1", others[1], 30, SamplingParams(temperature=0.7, seed=1234, ignore_eos=True))  # same seed
    crowd.step()
    crowd.add("s", prompt, 24, SEEDED)  # joins mid-batch, prefill in chunks of 9
    crowd.add("o2", others[2], 30, SamplingParams(temperature=0.0, ignore_eos=True))
    crowd.add("o3", others[3], 30, SamplingParams(temperature=1.3, top_k=5, seed=7, ignore_eos=True))
    got = crowd.run()
    assert got["s"] == expected
    assert got["o1"] != expected  # the same seed on another prompt is another stream

    preempted, _ = _driver(model_dir)
    preempted.add("s", prompt, 24, SEEDED)
    for _ in range(10):
        preempted.step()
    preempted.preempt("s")
    assert preempted.run()["s"] == expected


def test_logprobs_are_returned_for_the_sampled_token(model_dirs):
    driver, _ = _driver(model_dirs["qwen2"])
    driver.add("s", [10, 11, 12], 3, SEEDED)
    driver.run()
    results = [r for r in driver.results if "s" in r.sampled_token_ids]
    assert len(results) == 3
    for r in results:
        lp = r.logprobs["s"]
        assert lp.token_id == r.sampled_token_ids["s"]
        assert lp.logprob <= 0 and len(lp.top) == 2
        assert lp.top[0][1] >= lp.top[1][1] and lp.top[0][1] >= lp.logprob
