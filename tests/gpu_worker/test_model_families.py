"""Model families beyond Llama and Qwen, random weights from transformers' own classes:
Mistral (Llama's layout, a sliding window) and Phi-3 (q, k and v fused in one weight, gate
and up in another). Greedy output equals transformers' token for token in a batch with
chunked prefill; tensor-parallel slices of the fused weights are the unfused model's.

The attention kernels have no sliding window yet: a windowed model is served up to its
window, where the window never applies (vLLM's --disable-sliding-window), and a longer
max_model_len is refused, saying so."""

from __future__ import annotations

import json
import random

import pytest
import torch

from services.gpu_worker.loader import _Checkpoint, _layer, load_config, load_model, model_shape, shard_model
from shared.models import ModelLoadError, max_model_len, read_config, sliding_window
from shared.tiny_model import make_model
from tests.gpu_worker.conftest import make_engine
from tests.gpu_worker.hf_reference import assert_greedy_matches, hf_greedy
from tests.gpu_worker.plan_driver import PlanDriver

MAX_TOKENS = 10
# Small, with a GQA group of 3 and the window far below the context, as the real ones have
# (Mistral-7B-v0.1: 4,096 of 32,768; Phi-3-mini-4k: 2,047 of 4,096).
SHAPE = dict(num_hidden_layers=2, hidden_size=192, num_attention_heads=6, num_key_value_heads=2,
             intermediate_size=384, max_position_embeddings=4096, sliding_window=512)


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
    assert read_config(model_dir)["architectures"] == [{"mistral": "MistralForCausalLM", "phi3": "Phi3ForCausalLM"}[arch]]


def test_greedy_matches_hf_in_a_batch_with_chunked_prefill(family):
    arch, model_dir = family
    engine, info = make_engine(model_dir)
    assert info.max_model_len == SHAPE["sliding_window"], "capped to the window, where it never applies"
    assert info.backends["attention"] == "cpu" and info.slow_paths == []
    rng = random.Random(7)
    prompts = [[rng.randrange(3, info.vocab_size) for _ in range(n)] for n in (1, 23, 60, 140)]
    expected = hf_greedy(model_dir, prompts, MAX_TOKENS)
    driver = PlanDriver(engine.execute, info.block_size, info.num_blocks, info.eos_token_ids, chunk_size=17)
    for i, prompt in enumerate(prompts):
        driver.add(f"r{i}", prompt, MAX_TOKENS)
    outputs = driver.run()
    for i, want in enumerate(expected):
        assert_greedy_matches(outputs[f"r{i}"], want, f"{arch} r{i}")


def test_fused_weights_shard_like_the_separate_ones(tmp_path):
    """Tensor parallelism 2: each rank's q/k/v and gate/up rows, cut from Phi-3's fused
    tensors, are the rows of the separate q, k, v, gate and up matrices they hold."""
    from transformers import AutoModelForCausalLM

    model_dir = make_model(tmp_path / "phi3", arch="phi3", preset="tiny", seed=5, **SHAPE)
    config = load_config(model_dir)
    shape = model_shape(config)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    attn, mlp = hf.model.layers[1].self_attn, hf.model.layers[1].mlp
    q_w, k_w, v_w = attn.qkv_proj.weight.split([shape.num_heads * shape.head_dim,
                                                 shape.num_kv_heads * shape.head_dim,
                                                 shape.num_kv_heads * shape.head_dim])
    gate_w, up_w = mlp.gate_up_proj.weight.chunk(2)
    hd = shape.head_dim
    for rank in range(2):
        s = shard_model(config, shape, rank, 2)
        with _Checkpoint(model_dir, torch.device("cpu"), torch.float32) as ckpt:
            layer = _layer(ckpt, "model.layers.1.", shape, s, False, None)
        want_qkv = torch.cat([q_w[s.heads[0] * hd:s.heads[1] * hd], k_w[s.kv_heads[0] * hd:s.kv_heads[1] * hd],
                              v_w[s.kv_heads[0] * hd:s.kv_heads[1] * hd]])
        want_gate_up = torch.cat([gate_w[s.columns[0]:s.columns[1]], up_w[s.columns[0]:s.columns[1]]])
        assert torch.equal(layer.qkv.weight, want_qkv), f"rank {rank}: qkv rows"
        assert torch.equal(layer.gate_up.weight, want_gate_up), f"rank {rank}: gate/up rows"


def test_a_context_past_the_window_is_refused_and_other_configs_keep_theirs(tmp_path):
    config = {"max_position_embeddings": 4096, "sliding_window": 512}
    assert max_model_len(config, tmp_path, None) == 512 and max_model_len(config, tmp_path, 300) == 300
    with pytest.raises(ModelLoadError, match="max_model_len 1024 exceeds the model's sliding window 512"):
        max_model_len(config, tmp_path, 1024)
    # Qwen2 and Qwen3 carry a window that applies only with use_sliding_window; Mistral v0.2+ has none.
    for off in ({"sliding_window": 4096, "use_sliding_window": False}, {"sliding_window": None}, {}):
        assert sliding_window(off) is None
        assert max_model_len({"max_position_embeddings": 8192, **off}, tmp_path, None) == 8192
    assert sliding_window({"sliding_window": 4096, "use_sliding_window": True}) == 4096


def test_longrope_is_refused_at_load_saying_why(tmp_path):
    model_dir = make_model(tmp_path / "phi3-long", arch="phi3", preset="tiny", seed=1, num_hidden_layers=1,
                           hidden_size=128, num_attention_heads=4, num_key_value_heads=4,
                           max_position_embeddings=4096, original_max_position_embeddings=1024,
                           rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 16,
                                         "long_factor": [2.0] * 16})
    with pytest.raises(ModelLoadError, match="rope type 'longrope' is not supported"):
        load_model(model_dir, torch.device("cpu"), torch.float32, None)
    assert json.loads((model_dir / "config.json").read_text())["architectures"] == ["Phi3ForCausalLM"]
