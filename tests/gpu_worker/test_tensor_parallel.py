"""Tensor parallelism over 2 ranks (gloo, CPU; rank 1 a real process): greedy output equals
transformers for each architecture and for an MQA model whose one KV head is replicated,
in a continuous batch with chunked prefill, a prefix-cache hit and a preemption; seeded
sampling equals the single-rank engine's; a model that cannot be split fails at start-up.
(Rank failures: test_tensor_parallel_failures.py.)"""

from __future__ import annotations

import pytest

from services.gpu_worker.factory import create_engine
from services.gpu_worker.parallel_layers import plan_sharding
from services.gpu_worker.tensor_parallel import RankLayout, rank_layouts
from shared.config import WorkerSettings
from shared.messages import SamplingParams
from shared.models import ModelLoadError
from shared.tiny_model import make_model
from tests.gpu_worker.conftest import VARIANTS, make_engine
from tests.gpu_worker.hf_reference import assert_greedy_matches, hf_greedy
from tests.gpu_worker.plan_driver import PlanDriver
from tests.gpu_worker.test_engine_vs_hf import _prompts

MAX_TOKENS = 8
LENGTHS = [1, 16, 17, 40, 129]
# One KV head for 4 query heads: 2 ranks cannot split it, each holds a copy.
TP_VARIANTS = {**VARIANTS, "mqa": dict(arch="qwen3", num_key_value_heads=1)}


def tp_settings(model_dir, world: int = 2, **kw) -> WorkerSettings:
    return WorkerSettings(model=str(model_dir), device="cpu", kv_cache_memory="64MiB", worker_id="tp-worker",
                          tensor_parallel_size=world, **kw)


@pytest.fixture(scope="module")
def tp_model_dirs(model_dirs, tmp_path_factory):
    mqa = make_model(tmp_path_factory.mktemp("mqa"), preset="tiny", num_hidden_layers=2, seed=1, **TP_VARIANTS["mqa"])
    return {**model_dirs, "mqa": mqa}


@pytest.fixture(scope="module", params=list(TP_VARIANTS))
def tp_engine(request, tp_model_dirs):
    """(arch, model dir, engine, info): one 2-rank engine at a time (a process joins one group)."""
    engine, info = create_engine(tp_settings(tp_model_dirs[request.param]))
    followers = engine.model.followers
    yield request.param, tp_model_dirs[request.param], engine, info
    engine.close()
    assert [p.returncode for p in followers.procs] == [0], "the follower stopped cleanly, not killed"


def test_greedy_batch_matches_hf(tp_engine):
    arch, model_dir, engine, info = tp_engine
    assert engine.model.shape.num_heads == 2 and engine.model.shape.num_kv_heads == 1  # this rank's share
    prompts = _prompts(seed=7, vocab=info.vocab_size, lengths=LENGTHS)
    shared = prompts[4][:64] + _prompts(seed=8, vocab=info.vocab_size, lengths=[23])[0]  # 4 cached blocks + a tail
    preempted = _prompts(seed=9, vocab=info.vocab_size, lengths=[57])[0]
    expected = hf_greedy(model_dir, prompts + [shared, preempted], MAX_TOKENS)

    driver = PlanDriver(engine.execute, info.block_size, info.num_blocks, info.eos_token_ids, chunk_size=13)
    for i in range(3):
        driver.add(f"r{i}", prompts[i], MAX_TOKENS)
    driver.add("preempted", preempted, MAX_TOKENS)
    for _ in range(3):
        driver.step()
    for i in range(3, 5):  # join while the first ones decode
        driver.add(f"r{i}", prompts[i], MAX_TOKENS)
    for _ in range(6):  # r4's 129-token prompt is cached past 64 tokens by now, in 13-token chunks
        driver.step()
    assert driver.requests["r4"].computed >= 64
    driver.add("shared", shared, MAX_TOKENS, prefix_of="r4", prefix_blocks=4)
    driver.preempt("preempted")
    outputs = driver.run()

    for i, want in enumerate(expected[:5]):
        assert_greedy_matches(outputs[f"r{i}"], want, f"{arch}: prompt of {LENGTHS[i]} tokens")
    assert_greedy_matches(outputs["shared"], expected[5], f"{arch}: prefix-cache hit")
    assert_greedy_matches(outputs["preempted"], expected[6], f"{arch}: preempted")
    assert not engine.rows


def test_seeded_sampling_equals_the_single_rank_engine(tp_engine):
    """Tokens equal; logprobs and prompt logprobs (rank 0 alone computes logits) equal
    within the all-reduce's rounding."""
    arch, model_dir, engine, info = tp_engine
    params = SamplingParams(temperature=1.0, seed=77, ignore_eos=True, logprobs=1, prompt_logprobs=1)
    prompts = _prompts(seed=5, vocab=info.vocab_size, lengths=[9, 37])
    single, single_info = make_engine(model_dir)
    outputs, logprobs = [], []
    for e, i in ((engine, info), (single, single_info)):
        driver = PlanDriver(e.execute, i.block_size, i.num_blocks, i.eos_token_ids, chunk_size=16)
        for n, p in enumerate(prompts):
            driver.add(f"s{n}", p, 16, params)
        outputs.append(driver.run())
        logprobs.append([(rid, lp.token_id, lp.logprob) for r in driver.results for rid, lp in r.logprobs.items()]
                        + [(rid, e.token_id, e.logprob) for r in driver.results
                           for rid, chunk in r.prompt_logprobs.items() for e in chunk.entries])
    assert outputs[0] == outputs[1], arch
    assert len(logprobs[0]) == len(logprobs[1]) == 2 * 16 + 8 + 36
    for (rid, token, lp), (rid1, token1, lp1) in zip(*logprobs):
        assert (rid, token) == (rid1, token1) and abs(lp - lp1) < 1e-4, (arch, rid, lp, lp1)


@pytest.mark.parametrize("heads, kv_heads", [(6, 3), (3, 3)])
def test_a_model_that_cannot_be_split_fails_at_start_up(tmp_path, heads, kv_heads):
    model_dir = make_model(tmp_path, preset="tiny", num_hidden_layers=1, num_attention_heads=heads,
                           num_key_value_heads=kv_heads, hidden_size=192)
    with pytest.raises(ModelLoadError) as e:
        create_engine(tp_settings(model_dir))
    message = str(e.value)
    assert "tensor_parallel_size 2" in message and f"num_key_value_heads {kv_heads}" in message
    assert (f"num_attention_heads {heads}" in message) == (heads % 2 == 1)


@pytest.mark.parametrize("heads, kv_heads, world", [(8, 2, 4), (8, 1, 8), (8, 4, 2), (4, 1, 2)])
def test_each_rank_holds_the_kv_heads_its_query_heads_read(heads, kv_heads, world):
    """q head i reads KV head i // (heads // kv_heads), on one device; so must it on its rank."""
    group = heads // kv_heads
    for rank in range(world):
        s = plan_sharding(heads, kv_heads, 64, 1000, rank, world)
        assert s.num_kv_heads == max(1, kv_heads // world)
        for local_q, q in enumerate(range(*s.heads)):
            local_kv = local_q // (s.num_heads // s.num_kv_heads)  # what the attention kernels do per rank
            assert s.kv_head_start + local_kv == q // group, (rank, q)
    rows = [plan_sharding(heads, kv_heads, 64, 1000, r, world) for r in range(world)]
    assert [(r.vocab_start, r.vocab_end) for r in rows][-1][1] == 1000
    assert all(a.vocab_end == b.vocab_start for a, b in zip(rows, rows[1:])), "the vocabulary is covered once"


def test_ranks_share_the_workers_threads_and_cores():
    assert rank_layouts(4, [0, 1, 2, 3], 2) == [RankLayout(2, [0, 1]), RankLayout(2, [2, 3])]
    assert rank_layouts(5, [0, 1, 2, 3, 4], 2) == [RankLayout(2, [0, 1, 2]), RankLayout(2, [3, 4])]
    assert rank_layouts(1, [3], 2) == [RankLayout(1, None)] * 2, "fewer cores than ranks: they share"
    assert rank_layouts(3, None, 2) == [RankLayout(1, None)] * 2, "an unbound worker: unbound ranks"
