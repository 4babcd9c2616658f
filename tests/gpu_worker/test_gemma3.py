"""Gemma 3 (text) with random weights from transformers' own Gemma3ForCausalLM: sliding and
global layers with their own rope tables, q/k norm, (1 + w) norms, scaled embeddings,
query_pre_attn_scalar and the gelu-tanh MLP. Greedy output equals transformers' in a batch
with chunked prefill, fp32; the worker names the MLP's eager path; a config we cannot serve
is refused at load."""

from __future__ import annotations

import random

import pytest
import torch

from conveyor.tiny_model import make_model
from services.gpu_worker.loader import load_model
from shared.models import ModelLoadError
from tests.gpu_worker.conftest import make_engine
from tests.gpu_worker.plan_driver import assert_batch_matches_hf

MAX_TOKENS = 10
# Shaped like Gemma 3 270M scaled down: head_dim independent of hidden/heads, one KV head,
# query_pre_attn_scalar unlike head_dim, sliding layers around a global one, a window well
# below the prompts (so the sliding layers cut and the global one does not).
GEMMA = dict(
    num_hidden_layers=3,
    hidden_size=128,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=64,
    intermediate_size=256,
    query_pre_attn_scalar=48,
    sliding_window=40,
    max_position_embeddings=4096,
    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
    },
)


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("gemma3"), arch="gemma3_text", preset="tiny", seed=4, **GEMMA)


def test_greedy_matches_hf_in_a_batch_with_chunked_prefill(gemma):
    engine, info = make_engine(gemma)
    assert info.backends["attention"] == "cpu" and info.max_model_len == 4096
    assert any("gelu" in p.lower() or "GELU" in p for p in info.slow_paths), info.slow_paths
    rng = random.Random(3)
    prompts = [[rng.randrange(3, info.vocab_size) for _ in range(n)] for n in (1, 19, 64, 150)]
    assert_batch_matches_hf(engine, info, gemma, prompts, MAX_TOKENS, 23, "gemma3")


def test_attention_soft_capping_is_refused(tmp_path):
    model_dir = make_model(
        tmp_path / "capped",
        arch="gemma3_text",
        preset="tiny",
        seed=1,
        **{**GEMMA, "attn_logit_softcapping": 50.0},
    )
    with pytest.raises(ModelLoadError, match="attn_logit_softcapping"):
        load_model(model_dir, torch.device("cpu"), torch.float32, None)
