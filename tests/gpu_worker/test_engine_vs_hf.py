"""Greedy output of the engine equals transformers' `generate`, token for token: exactly
for a request alone, and in a batch (joins mid-decode, odd prefill chunks, prefix-cache
hits, preemption with recompute) except where the batch flips an fp32 near-tie (the rule
is in hf_reference.py)."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.gpu_worker.conftest import VARIANTS, make_engine
from tests.gpu_worker.hf_reference import NEAR_TIE, assert_greedy_matches, hf_greedy
from tests.gpu_worker.plan_driver import PlanDriver

MAX_TOKENS = 10
PROMPT_LENGTHS = [1, 2, 15, 16, 17, 40, 129, 300]


def random_prompts(seed: int, vocab: int, lengths=PROMPT_LENGTHS) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


@pytest.mark.parametrize("arch", list(VARIANTS))
def test_mixed_batch_matches_hf(model_dirs, arch):
    model_dir = model_dirs[arch]
    engine, info = make_engine(model_dir)
    prompts = random_prompts(seed=7, vocab=info.vocab_size)
    # A prefix-sharing prompt: the 129-token prompt's first 64 tokens (4 full blocks) + a new tail.
    shared = prompts[6][:64] + random_prompts(seed=8, vocab=info.vocab_size, lengths=[23])[0]
    # A prompt that will be preempted mid-generation and resumed by recompute.
    preempted = random_prompts(seed=9, vocab=info.vocab_size, lengths=[57])[0]
    expected = hf_greedy(model_dir, prompts + [shared, preempted], MAX_TOKENS)

    driver = PlanDriver(engine.execute, info.block_size, info.num_blocks, info.eos_token_ids, chunk_size=13)
    for i in range(4):  # half the requests start together...
        driver.add(f"r{i}", prompts[i], MAX_TOKENS)
    driver.add("preempted", preempted, MAX_TOKENS)
    for _ in range(3):
        driver.step()
    for i in range(4, 8):  # ...the others join while the first ones decode
        driver.add(f"r{i}", prompts[i], MAX_TOKENS)
    for _ in range(8):  # long enough for r6's 129-token prompt to be cached in 13-token chunks
        driver.step()
    assert driver.requests["r6"].computed >= 64
    driver.add("shared", shared, MAX_TOKENS, prefix_of="r6", prefix_blocks=4)
    assert len(driver.requests["preempted"].output) >= 2, "preempt only after it has generated"
    driver.preempt("preempted")
    outputs = driver.run()

    for i, want in enumerate(expected[:8]):
        assert_greedy_matches(outputs[f"r{i}"], want, f"prompt of {PROMPT_LENGTHS[i]} tokens")
    assert_greedy_matches(outputs["shared"], expected[8], "prefix-cache hit")
    assert_greedy_matches(outputs["preempted"], expected[9], "preempted")
    assert not engine.rows, "every finished row was dropped"


@pytest.mark.parametrize("arch", list(VARIANTS))
def test_a_request_alone_matches_hf_exactly(model_dirs, arch):
    """Alone (whole-prompt prefill, then one row per step, as HF runs it) no batch can
    flip anything: every token must match, near-ties included."""
    engine, info = make_engine(model_dirs[arch])
    prompts = random_prompts(seed=7, vocab=info.vocab_size)
    for prompt, want in zip(prompts, hf_greedy(model_dirs[arch], prompts, MAX_TOKENS)):
        driver = PlanDriver(engine.execute, info.block_size, info.num_blocks, info.eos_token_ids)
        driver.add("alone", prompt, MAX_TOKENS)
        assert driver.run()["alone"] == want.tokens, f"prompt of {len(prompt)} tokens"


def test_batch_noise_is_far_inside_the_near_tie_bound(model_dirs):
    """The noise NEAR_TIE allows for, measured: a decode row's logits alone vs sharing
    every matmul with 15 others, on each test model."""
    rng = random.Random(2)
    for arch, model_dir in model_dirs.items():
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, local_files_only=True
        ).eval()
        ids = torch.tensor([[rng.randrange(3, model.config.vocab_size)] for _ in range(16)])
        with torch.inference_mode():
            together = model(ids).logits[:, -1]
            alone = torch.cat([model(ids[i : i + 1]).logits[:, -1] for i in range(len(ids))])
        noise = (together - alone).abs().max().item()
        assert noise < NEAR_TIE / 10, f"{arch}: batch noise {noise:.3g}"


@pytest.mark.parametrize("chunk_size", [1, 5, 1000])
def test_chunk_size_does_not_change_output(model_dirs, chunk_size):
    engine, info = make_engine(model_dirs["qwen3"], block_size=32)
    prompts = random_prompts(seed=3, vocab=info.vocab_size, lengths=[31, 32, 33, 70])
    driver = PlanDriver(
        engine.execute, info.block_size, info.num_blocks, info.eos_token_ids, chunk_size=chunk_size
    )
    for i, p in enumerate(prompts):
        driver.add(str(i), p, 6)
    outputs = driver.run()
    for i, want in enumerate(hf_greedy(model_dirs["qwen3"], prompts, 6)):
        assert_greedy_matches(outputs[str(i)], want, f"prompt of {len(prompts[i])} tokens")
