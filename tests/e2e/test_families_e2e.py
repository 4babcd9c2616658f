"""Mistral, Phi-3, Gemma 3 and Qwen3-MoE through the whole system (gateway, scheduler and a worker process on a
real Redis), random weights from transformers' own classes: requests sent at once batch,
and greedy output equals transformers' token for token with contexts far past the model's
sliding window, which the kernels apply; the served context is the model's whole one."""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest

from shared.tiny_model import make_model
from tests.gpu_worker.hf_reference import assert_greedy_matches, hf_greedy
from tests.stack import Stack

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

MAX_TOKENS, WINDOW = 12, 32
FAMILIES = {"mistral": {}, "phi3": {},
            # Gemma 3: a sliding layer, a global one, head_dim apart from hidden / heads.
            "gemma3_text": dict(head_dim=64, query_pre_attn_scalar=48,
                                layer_types=["sliding_attention", "full_attention"]),
            # Qwen3-MoE: top-2 of 4 experts, renormalised (its window is off: use_sliding_window).
            "qwen3_moe": dict(head_dim=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                              norm_topk_prob=True)}


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_greedy_through_the_system_equals_transformers(arch, redis_server, tmp_path_factory):
    model_dir = make_model(tmp_path_factory.mktemp(arch), arch=arch, preset="tiny", seed=2, num_hidden_layers=2,
                           num_attention_heads=6, num_key_value_heads=2, hidden_size=192, sliding_window=WINDOW, **FAMILIES[arch])
    rng = random.Random(11)
    prompts = [[rng.randrange(3, 4096) for _ in range(n)] for n in (5, 33, 70, 120)]
    stack = Stack(redis_server.url, model_dir, tmp_path_factory.mktemp(f"{arch}-logs"))
    try:
        stack.start_scheduler()
        stack.start_worker("w1")
        port = stack.start_gateway("gw")
        references = hf_greedy(model_dir, prompts, MAX_TOKENS, ignore_eos=True)
        stack.wait_workers({"w1"})
        stack.wait_gateway("gw", port)
        url = f"http://127.0.0.1:{port}/v1"

        async def send_all():
            async with httpx.AsyncClient(timeout=120.0) as client:
                async def one(prompt):
                    r = await client.post(f"{url}/completions", json=dict(
                        model=model_dir.name, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True,
                        return_token_ids=True))
                    assert r.status_code == 200, r.text
                    return r.json()["choices"][0]["token_ids"]
                return await asyncio.gather(*(one(p) for p in prompts))

        outputs = asyncio.run(send_all())
        for i, (got, want) in enumerate(zip(outputs, references)):
            assert_greedy_matches(got, want, f"{arch}: prompt of {len(prompts[i])} tokens")
        with httpx.Client(timeout=30.0) as client:
            served = client.get(f"{url}/models").json()["data"][0]["max_model_len"]
        assert served == 4096, "the model's whole context, not capped to its window"
    finally:
        stack.stop()
