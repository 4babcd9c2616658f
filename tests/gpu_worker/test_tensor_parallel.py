"""Tensor parallelism over 2 ranks (gloo, CPU; rank 1 a real process): greedy output equals
transformers for each architecture and for an MQA model whose one KV head is replicated,
in a continuous batch with chunked prefill, a prefix-cache hit and a preemption; seeded
sampling equals the single-rank engine's; a model that cannot be split fails at start-up.
(Rank failures: test_tensor_parallel_failures.py.)"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from conveyor.tiny_model import make_model
from kernels import get_attention_backend
from services.gpu_worker.__main__ import in_force
from services.gpu_worker.factory import create_engine
from services.gpu_worker.loader import load_config, load_model, model_shape, shard_model
from services.gpu_worker.parallel_layers import plan_sharding
from services.gpu_worker.tensor_parallel import RankLayout, rank_layouts, share_out
from services.gpu_worker.tp_group import check_devices
from shared.config import WorkerSettings
from shared.cpu_layout import resolve
from shared.messages import SamplingParams
from shared.models import ModelLoadError
from tests.gpu_worker.conftest import VARIANTS, make_engine
from tests.gpu_worker.hf_reference import assert_greedy_matches, hf_greedy
from tests.gpu_worker.plan_driver import PlanDriver
from tests.gpu_worker.test_engine_vs_hf import random_prompts

MAX_TOKENS = 8
LENGTHS = [1, 16, 17, 40, 129]
# One KV head for 4 query heads: 2 ranks cannot split it, each holds a copy.
TP_VARIANTS = {**VARIANTS, "mqa": dict(arch="qwen3", num_key_value_heads=1)}


def tp_settings(model_dir, world: int = 2, **kw) -> WorkerSettings:
    return WorkerSettings(
        model=str(model_dir),
        device="cpu",
        kv_cache_memory="64MiB",
        worker_id="tp-worker",
        tensor_parallel_size=world,
        **kw,
    )


@pytest.fixture(scope="module")
def tp_model_dirs(model_dirs, tmp_path_factory):
    mqa = make_model(
        tmp_path_factory.mktemp("mqa"), preset="tiny", num_hidden_layers=2, seed=1, **TP_VARIANTS["mqa"]
    )
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
    prompts = random_prompts(seed=7, vocab=info.vocab_size, lengths=LENGTHS)
    shared = (
        prompts[4][:64] + random_prompts(seed=8, vocab=info.vocab_size, lengths=[23])[0]
    )  # 4 cached blocks + a tail
    preempted = random_prompts(seed=9, vocab=info.vocab_size, lengths=[57])[0]
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
    prompts = random_prompts(seed=5, vocab=info.vocab_size, lengths=[9, 37])
    single, single_info = make_engine(model_dir)
    outputs, logprobs = [], []
    for e, i in ((engine, info), (single, single_info)):
        driver = PlanDriver(e.execute, i.block_size, i.num_blocks, i.eos_token_ids, chunk_size=16)
        for n, p in enumerate(prompts):
            driver.add(f"s{n}", p, 16, params)
        outputs.append(driver.run())
        logprobs.append(
            [(rid, lp.token_id, lp.logprob) for r in driver.results for rid, lp in r.logprobs.items()]
            + [
                (rid, e.token_id, e.logprob)
                for r in driver.results
                for rid, chunk in r.prompt_logprobs.items()
                for e in chunk.entries
            ]
        )
    assert outputs[0] == outputs[1], arch
    assert len(logprobs[0]) == len(logprobs[1]) == 2 * 16 + 8 + 36
    for (rid, token, lp), (rid1, token1, lp1) in zip(*logprobs):
        assert (rid, token) == (rid1, token1) and abs(lp - lp1) < 1e-4, (arch, rid, lp, lp1)


@pytest.mark.parametrize("heads, kv_heads", [(6, 3), (3, 3)])
def test_a_model_that_cannot_be_split_fails_at_start_up(tmp_path, heads, kv_heads):
    model_dir = make_model(
        tmp_path,
        preset="tiny",
        num_hidden_layers=1,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        hidden_size=192,
    )
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


@pytest.mark.parametrize("n, compute", [(8, list(range(1, 8))), (16, list(range(2, 16)))])
def test_a_worker_process_shares_out_the_cores_it_bound_itself_to(n, compute):
    """__main__ binds the worker to "auto"'s compute cores; its ranks share exactly those,
    not "auto" resolved again against them (which would reserve cores a second time)."""
    settings = WorkerSettings(tensor_parallel_size=2)
    threads, cores = resolve(settings.num_threads, settings.cpu_affinity, list(range(n)), None)
    assert cores == compute and threads == len(compute)
    layouts = share_out(in_force(settings, threads, cores), cores, default_threads=1)
    assert [c for layout in layouts for c in layout.cores] == compute
    assert sum(layout.threads for layout in layouts) == 2 * (len(compute) // 2)
    unbound = share_out(in_force(settings, 4, None), cores, default_threads=1)
    assert unbound == [RankLayout(2, None)] * 2, "an unbound worker (OMP_NUM_THREADS) keeps its ranks unbound"


def test_a_vocabulary_that_leaves_a_rank_no_rows_fails_at_start_up():
    with pytest.raises(ModelLoadError, match="vocab_size 9 into shares of 3 rows.*rank 3 would hold none"):
        plan_sharding(4, 4, 64, 9, 0, 4)
    assert plan_sharding(4, 4, 64, 10, 3, 4).vocab_end - plan_sharding(4, 4, 64, 10, 3, 4).vocab_start == 1


def test_more_ranks_than_the_host_has_gpus_fails_before_starting():
    check_devices(torch.device("cuda", 0), 2, device_count=2)
    check_devices(torch.device("cpu"), 4, device_count=0)
    with pytest.raises(
        ModelLoadError, match="tensor_parallel_size 2 on cuda:1 needs cuda:1..cuda:2.* 2 CUDA"
    ):
        check_devices(torch.device("cuda", 1), 2, device_count=2)
    with pytest.raises(ModelLoadError, match="on cuda:0 needs cuda:0..cuda:3"):
        check_devices(torch.device("cuda"), 4, device_count=2)


def test_ranks_load_the_replicated_kv_head_their_query_heads_read(model_dirs):
    """2 KV heads over 4 ranks: ranks 0-1 load a copy of KV head 0, ranks 2-3 of KV head 1.
    The loader's slices against the checkpoint, in process: a greedy run at TP 4 (four
    processes) takes about a minute on this 2-core machine."""
    path, cpu = model_dirs["llama"], torch.device("cpu")
    config = load_config(path)
    with safe_open(next(path.glob("*.safetensors")), framework="pt") as st:
        k, v = (st.get_tensor(f"model.layers.1.self_attn.{n}_proj.weight") for n in "kv")
    hd = model_shape(config).head_dim
    assert k.shape[0] == 2 * hd, "the tiny preset has 2 KV heads"
    for rank in range(4):
        sharding = shard_model(config, model_shape(config), rank, 4)
        model = load_model(
            path, cpu, torch.float32, get_attention_backend(cpu), "torch", sharding, all_reduce=lambda t: None
        )  # loading runs no collective
        qkv = model.layers[1].qkv.weight  # this rank's one query head, then its K and V rows
        kv = slice((rank // 2) * hd, (rank // 2 + 1) * hd)
        assert torch.equal(qkv[hd : 2 * hd], k[kv]) and torch.equal(qkv[2 * hd :], v[kv]), rank
