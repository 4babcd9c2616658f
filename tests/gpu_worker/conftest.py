"""Fixtures: tiny random models of each supported architecture, built once per session,
and in-process engines on them."""

from __future__ import annotations

import os

import pytest
from transformers import AutoTokenizer

from conveyor.tiny_model import make_model
from services.gpu_worker.factory import create_engine
from shared.config import WorkerSettings

# Each variant exercises a different loading path: untied + llama3 rope scaling, qkv bias
# + tied embeddings, q/k norm + explicit head_dim + a non-default rope_theta, a sliding
# window, fused weights, Gemma 3's layers, a mixture of experts.
VARIANTS = {
    "llama": dict(
        arch="llama",
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        },
    ),
    "qwen2": dict(arch="qwen2", tie_word_embeddings=True),
    "qwen3": dict(arch="qwen3", rope_theta=500000.0),
    # Llama's layout with a sliding window, and Phi-3's fused qkv and gate_up weights with
    # one: windows shorter than the tests' longer prompts (one off the block size), so the
    # kernels' windows decide their outputs.
    "mistral": dict(arch="mistral", sliding_window=48),
    "phi3": dict(arch="phi3", sliding_window=37),
    # Experts: top-2 of 8, renormalised, the second layer dense (mlp_only_layers).
    # Sliding and global layers with their own rope, (1 + w) norms, four a layer, gelu-tanh.
    "gemma3": dict(
        arch="gemma3_text",
        head_dim=64,
        query_pre_attn_scalar=48,
        sliding_window=40,
        layer_types=["sliding_attention", "full_attention"],
    ),
    "qwen3_moe": dict(
        arch="qwen3_moe",
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=128,
        norm_topk_prob=True,
        mlp_only_layers=[1],
    ),
}


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    return {
        name: make_model(tmp_path_factory.mktemp(name), preset="tiny", num_hidden_layers=2, seed=1, **kw)
        for name, kw in VARIANTS.items()
    }


# The GPU check (tools/gpu_check) runs these engines on CUDA, still in fp32 (CUDA's default is bf16).
TEST_DEVICE = os.environ.get("CONVEYOR_TEST_DEVICE", "cpu")


def make_engine(model_dir, block_size: int = 16, kv_cache_memory: str = "64MiB", speculative_config=None):
    settings = WorkerSettings(
        model=str(model_dir),
        device=TEST_DEVICE,
        dtype="float32",
        block_size=block_size,
        kv_cache_memory=kv_cache_memory,
        worker_id="test-worker",
        speculative_config=speculative_config,
    )
    return create_engine(settings)


@pytest.fixture(scope="session")
def qwen2_engine(model_dirs):
    """An engine on the qwen2 tiny model, its info and tokenizer, shared by the structured
    output tests (three files): building one, and its grammar compiler, takes seconds."""
    engine, info = make_engine(model_dirs["qwen2"])
    return engine, info, AutoTokenizer.from_pretrained(model_dirs["qwen2"], local_files_only=True)
