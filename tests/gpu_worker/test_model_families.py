"""Model families beyond Llama and Qwen, random weights from transformers' own classes:
Mistral (Llama's layout, a sliding window) and Phi-3 (q, k and v fused in one weight, gate
and up in another). Greedy output equals transformers' token for token in a batch with
chunked prefill; tensor-parallel slices of the fused weights are the unfused model's.

The sliding window is applied by the kernels: contexts run well past it, prefill chunks
cross its edge, and the whole context the model was trained for is served."""

from __future__ import annotations

import random

import pytest
import torch

from conveyor.tiny_model import make_model
from services.gpu_worker.factory import create_engine
from services.gpu_worker.loader import (
    Checkpoint,
    layer_windows,
    load_config,
    load_layer,
    load_model,
    model_shape,
    shard_model,
)
from shared.config import WorkerSettings
from shared.models import ModelLoadError, max_model_len, read_config
from tests.gpu_worker.conftest import make_engine
from tests.gpu_worker.hf_reference import hf_greedy
from tests.gpu_worker.plan_driver import assert_batch_matches_hf

MAX_TOKENS = 30
# Small, with a GQA group of 3 and the window far below the context, as the real ones have
# (Mistral-7B-v0.1: 4,096 of 32,768; Phi-3-mini-4k: 2,047 of 4,096): 37 tokens, off the
# block size, so that prompts and outputs of up to ~130 tokens run far past it.
SHAPE = dict(
    num_hidden_layers=2,
    hidden_size=192,
    num_attention_heads=6,
    num_key_value_heads=2,
    intermediate_size=384,
    max_position_embeddings=4096,
    sliding_window=37,
)


@pytest.fixture(scope="module", params=["mistral", "phi3"])
def family(request, tmp_path_factory):
    arch = request.param
    return arch, make_model(tmp_path_factory.mktemp(arch), arch=arch, preset="tiny", seed=5, **SHAPE)


def test_the_checkpoint_has_the_family_s_own_layout(family):
    arch, model_dir = family
    from safetensors import safe_open

    with safe_open(model_dir / "model.safetensors", "pt") as f:
        names = set(f.keys())
    fused = {"model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.mlp.gate_up_proj.weight"}
    assert fused <= names if arch == "phi3" else not fused & names
    assert read_config(model_dir)["architectures"] == [
        {"mistral": "MistralForCausalLM", "phi3": "Phi3ForCausalLM"}[arch]
    ]


def test_greedy_matches_hf_in_a_batch_with_chunked_prefill(family):
    arch, model_dir = family
    engine, info = make_engine(model_dir)
    assert info.max_model_len == SHAPE["max_position_embeddings"], (
        "the whole context, not capped to the window"
    )
    assert info.backends["attention"] == "cpu" and info.slow_paths == []
    rng = random.Random(7)
    prompts = [[rng.randrange(3, info.vocab_size) for _ in range(n)] for n in (1, 23, 60, 100)]
    expected = assert_batch_matches_hf(
        engine, info, model_dir, prompts, MAX_TOKENS, 17, arch, ignore_eos=True
    )
    # The window matters here: without it transformers itself generates otherwise.
    unwindowed = make_model(
        model_dir.parent / "unwindowed", arch=arch, preset="tiny", seed=5, **{**SHAPE, "sliding_window": None}
    )
    assert [r.tokens for r in hf_greedy(unwindowed, prompts, MAX_TOKENS, ignore_eos=True)] != [
        r.tokens for r in expected
    ]


def test_fused_weights_shard_like_the_separate_ones(tmp_path):
    """Tensor parallelism 2: each rank's q/k/v and gate/up rows, cut from Phi-3's fused
    tensors, are the rows of the separate q, k, v, gate and up matrices they hold."""
    from transformers import AutoModelForCausalLM

    model_dir = make_model(tmp_path / "phi3", arch="phi3", preset="tiny", seed=5, **SHAPE)
    config = load_config(model_dir)
    shape = model_shape(config)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    attn, mlp = hf.model.layers[1].self_attn, hf.model.layers[1].mlp
    q_w, k_w, v_w = attn.qkv_proj.weight.split(
        [
            shape.num_heads * shape.head_dim,
            shape.num_kv_heads * shape.head_dim,
            shape.num_kv_heads * shape.head_dim,
        ]
    )
    gate_w, up_w = mlp.gate_up_proj.weight.chunk(2)
    hd = shape.head_dim
    for rank in range(2):
        s = shard_model(config, shape, rank, 2)
        with Checkpoint(model_dir, torch.device("cpu"), torch.float32) as ckpt:
            layer = load_layer(ckpt, "model.layers.1.", shape, s, False, None)
        want_qkv = torch.cat(
            [
                q_w[s.heads[0] * hd : s.heads[1] * hd],
                k_w[s.kv_heads[0] * hd : s.kv_heads[1] * hd],
                v_w[s.kv_heads[0] * hd : s.kv_heads[1] * hd],
            ]
        )
        want_gate_up = torch.cat([gate_w[s.columns[0] : s.columns[1]], up_w[s.columns[0] : s.columns[1]]])
        assert torch.equal(layer.qkv.weight, want_qkv), f"rank {rank}: qkv rows"
        assert torch.equal(layer.gate_up.weight, want_gate_up), f"rank {rank}: gate/up rows"


def test_a_windowed_model_serves_its_whole_context(tmp_path):
    config = {"max_position_embeddings": 4096, "sliding_window": 512}
    assert max_model_len(config, tmp_path, None) == 4096 and max_model_len(config, tmp_path, 1024) == 1024
    with pytest.raises(
        ModelLoadError, match="max_model_len 8192 exceeds the model's max_position_embeddings 4096"
    ):
        max_model_len(config, tmp_path, 8192)


def test_each_layer_gets_the_window_transformers_gives_it():
    from transformers import MistralConfig, Phi3Config, Qwen2Config, Qwen3MoeConfig

    layers = dict(num_hidden_layers=4, max_position_embeddings=4096)
    assert layer_windows(MistralConfig(sliding_window=512, **layers)) == [512] * 4
    assert layer_windows(Phi3Config(sliding_window=2047, **layers)) == [2047] * 4
    assert layer_windows(MistralConfig(sliding_window=None, **layers)) == [None] * 4  # Mistral v0.2+
    assert layer_windows(MistralConfig(sliding_window=4096, **layers)) == [None] * 4, "as long as the context"
    # Qwen2 and Qwen3 carry a window that applies only with use_sliding_window, and then only
    # from layer max_window_layers on; Qwen3-MoE's applies to every layer.
    assert layer_windows(Qwen2Config(sliding_window=512, **layers)) == [None] * 4
    assert layer_windows(
        Qwen2Config(use_sliding_window=True, sliding_window=512, max_window_layers=1, **layers)
    ) == [None, 512, 512, 512]
    assert layer_windows(Qwen3MoeConfig(use_sliding_window=True, sliding_window=512, **layers)) == [512] * 4


@pytest.mark.parametrize(
    "served, lengths",
    [(24, (5, 11, 16)), (None, (25, 31, 40))],
    ids=["within-the-original-context", "served-longer"],
)
def test_longrope_matches_hf(tmp_path, served, lengths):
    """Phi-3's LongRoPE, as vLLM picks it: the short frequencies where the served context fits
    the original one (24 here), the long ones where it is longer, with the attention factor on
    both. transformers agrees on sequences within the original context, and on prompts past it
    (which it rotates whole with the long set): greedy equal token for token, in a batch with
    chunked prefill."""
    half = SHAPE["hidden_size"] // SHAPE["num_attention_heads"] // 2
    rng = random.Random(3)
    scaling = {
        "rope_type": "longrope",
        "short_factor": [round(rng.uniform(1.0, 1.5), 3) for _ in range(half)],
        "long_factor": [round(rng.uniform(2.0, 6.0), 3) for _ in range(half)],
    }
    model_dir = make_model(
        tmp_path / "phi3-long",
        arch="phi3",
        preset="tiny",
        seed=5,
        **{**SHAPE, "sliding_window": None, "max_position_embeddings": 256},
        original_max_position_embeddings=24,
        rope_scaling=scaling,
    )
    assert read_config(model_dir)["rope_parameters"]["rope_type"] == "longrope"
    settings = WorkerSettings(
        model=str(model_dir),
        device="cpu",
        dtype="float32",
        kv_cache_memory="64MiB",
        worker_id="test-worker",
        max_model_len=served,
    )
    engine, info = create_engine(settings)
    prompts = [[rng.randrange(3, info.vocab_size) for _ in range(n)] for n in lengths]
    new_tokens = [24 - n for n in lengths] if served else [MAX_TOKENS] * len(lengths)
    assert_batch_matches_hf(engine, info, model_dir, prompts, new_tokens, 7, "longrope", ignore_eos=True)
    # The table is transformers' own for a whole sequence of the served context's length:
    # short within the original context, long past it (the random model's greedy output is
    # too little moved by the rotation to show which set it ran on).
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    n = served or 40
    cos, sin = hf.model.rotary_emb(torch.zeros(1, n, 1), torch.arange(n)[None])
    assert torch.equal(engine.model.rotary.cos[:n], cos[0]) and torch.equal(
        engine.model.rotary.sin[:n], sin[0]
    )


def test_dynamic_rope_is_refused_at_load_saying_why(tmp_path):
    model_dir = make_model(
        tmp_path / "dyn",
        arch="llama",
        preset="tiny",
        seed=1,
        num_hidden_layers=1,
        rope_scaling={"rope_type": "dynamic", "factor": 2.0},
    )
    with pytest.raises(ModelLoadError, match="rope type 'dynamic' is not supported"):
        load_model(model_dir, torch.device("cpu"), torch.float32, None)
