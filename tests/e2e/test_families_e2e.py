"""Mistral, Phi-3, Gemma 3 and Qwen3-MoE through the whole system (gateway, scheduler and a
worker process on a real Redis), random weights from transformers' own classes: greedy output
equals transformers' token for token in a continuous batch with chunked prefill (a step budget
of 20 tokens), a prefix-cache hit and a preemption (a cache of 6 blocks, which two requests of
4 blocks outgrow), with contexts past the model's sliding window, which the kernels apply."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import httpx
import pytest
import torch

from conveyor.tiny_model import make_model
from tests.gateway.conftest import metric_value
from tests.gpu_worker.hf_reference import assert_greedy_matches, hf_greedy
from tests.stack import Stack

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

MAX_TOKENS, WINDOW, BLOCKS = 20, 32, 6
FAMILIES = {
    "mistral": {},
    "phi3": {},
    # Gemma 3: a sliding layer, a global one, head_dim apart from hidden / heads.
    "gemma3_text": dict(
        head_dim=64, query_pre_attn_scalar=48, layer_types=["sliding_attention", "full_attention"]
    ),
    # Qwen3-MoE: top-2 of 4 experts, renormalised (its window is off: use_sliding_window).
    "qwen3_moe": dict(
        head_dim=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True
    ),
}


def _family_model(arch: str, tmp_path_factory) -> Path:
    """A random model of `arch`, small, with a sliding window shorter than the requests."""
    return make_model(
        tmp_path_factory.mktemp(arch),
        arch=arch,
        preset="tiny",
        seed=2,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        hidden_size=192,
        sliding_window=WINDOW,
        **FAMILIES[arch],
    )


def _prompts() -> tuple[list[int], list[list[int]]]:
    """A first prompt, then two to send at once: one starting with the first's 32 tokens
    (two cached blocks), one fresh. Each holds 3 blocks with its prompt, and needs a 4th at
    its 49th token: one is preempted."""
    rng = random.Random(11)
    first = [rng.randrange(3, 4096) for _ in range(40)]
    batch = [
        first[:32] + [rng.randrange(3, 4096) for _ in range(8)],
        [rng.randrange(3, 4096) for _ in range(40)],
    ]
    return first, batch


def _complete_at_once(url: str, model: str, prompts: list[list[int]]) -> list[list[int]]:
    """The greedy completions' token ids, all requests sent together."""

    async def send():
        async with httpx.AsyncClient(timeout=120.0) as client:

            async def one(prompt):
                r = await client.post(
                    f"{url}/completions",
                    json=dict(
                        model=model,
                        prompt=prompt,
                        max_tokens=MAX_TOKENS,
                        temperature=0,
                        ignore_eos=True,
                        return_token_ids=True,
                    ),
                )
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]["token_ids"]

            return await asyncio.gather(*(one(p) for p in prompts))

    return asyncio.run(send())


def _wait_cache_hit_and_preemption(stack: Stack, port: int) -> None:
    figures = {}

    def counted() -> bool:  # the scheduler publishes its counters every few hundred ms
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30.0).text
        for name in ("prefix_cache_hits", "num_preemptions"):
            figures[name] = metric_value(text, f"conveyor:{name}_total")
        return figures["prefix_cache_hits"] >= 32 and figures["num_preemptions"] >= 1

    stack.wait_until(counted, "a prefix-cache hit of the shared 32 tokens and a preemption", timeout_s=20.0)


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_greedy_through_the_system_equals_transformers(arch, redis_server, tmp_path_factory):
    from services.gpu_worker.kv_cache import bytes_per_block
    from services.gpu_worker.loader import load_config, model_shape

    model_dir = _family_model(arch, tmp_path_factory)
    cache_bytes = BLOCKS * bytes_per_block(model_shape(load_config(model_dir)), 16, torch.float32)
    first, batch = _prompts()
    stack = Stack(redis_server.url, model_dir, tmp_path_factory.mktemp(f"{arch}-logs"))
    try:
        stack.start_scheduler("--max-num-batched-tokens", "20")
        stack.start_worker("w1", "--kv-cache-memory", str(cache_bytes), "--max-model-len", str(BLOCKS * 16))
        port = stack.start_gateway("gw")
        references = hf_greedy(model_dir, [first, *batch], MAX_TOKENS, ignore_eos=True)
        stack.wait_workers({"w1"})
        stack.wait_gateway("gw", port)
        url = f"http://127.0.0.1:{port}/v1"
        outputs = _complete_at_once(url, model_dir.name, [first]) + _complete_at_once(
            url, model_dir.name, batch
        )
        for i, (got, want) in enumerate(zip(outputs, references)):
            assert_greedy_matches(got, want, f"{arch}: request {i}")
        _wait_cache_hit_and_preemption(stack, port)
    finally:
        stack.stop()
