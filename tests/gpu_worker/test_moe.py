"""The mixture-of-experts MLP (services/gpu_worker/moe.py) against transformers' own
Qwen3-MoE block: the same routing (softmax, top-k, renormalised or not) and the same
output, for batches where some experts get many tokens, some one and some none. The
whole model's greedy output is checked by the engine tests (conftest.VARIANTS: qwen3_moe,
tensor parallelism 2 included)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from services.gpu_worker.moe import SparseMoE, is_sparse_layer


def _block(norm: bool, experts: int = 16, top_k: int = 4) -> Qwen3MoeSparseMoeBlock:
    config = AutoConfig.for_model(
        "qwen3_moe",
        hidden_size=64,
        moe_intermediate_size=48,
        num_experts=experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=norm,
    )
    torch.manual_seed(0)
    block = Qwen3MoeSparseMoeBlock(config)
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0.0, 0.1)
    return block


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("tokens", [1, 3, 64])
def test_equals_transformers_block(norm, tokens):
    block = _block(norm)
    x = torch.randn(tokens, 64)
    moe = SparseMoE(
        block.gate.weight.data,
        block.experts.gate_up_proj.data,
        block.experts.down_proj.data,
        block.gate.top_k,
        norm,
        block.experts.act_fn,
    )
    with torch.no_grad():
        want = block(x[None])[0]
        got = moe(x)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    _, ids = moe.route(x)
    if tokens == 64:
        counts = torch.bincount(ids.flatten(), minlength=16)
        assert counts.max() > 8, "some experts take many tokens in one matmul"


def test_tensor_parallel_slices_sum_to_the_whole():
    block = _block(True)
    x = torch.randn(20, 64)
    gate_up, down = block.experts.gate_up_proj.data, block.experts.down_proj.data
    inter = down.shape[2]
    parts = []
    for rank in range(2):
        cols = slice(rank * inter // 2, (rank + 1) * inter // 2)
        rank_gate_up = torch.cat([gate_up[:, :inter][:, cols], gate_up[:, inter:][:, cols]], dim=1)
        parts.append(
            SparseMoE(block.gate.weight.data, rank_gate_up, down[:, :, cols], 4, True, block.experts.act_fn)(
                x
            )
        )
    whole = SparseMoE(block.gate.weight.data, gate_up, down, 4, True, block.experts.act_fn)(x)
    torch.testing.assert_close(parts[0] + parts[1], whole, atol=1e-6, rtol=1e-5)


def test_which_layers_are_sparse():
    config = AutoConfig.for_model(
        "qwen3_moe", num_hidden_layers=4, num_experts=8, decoder_sparse_step=2, mlp_only_layers=[3]
    )
    assert [is_sparse_layer(config, i) for i in range(4)] == [False, True, False, False]
    assert not is_sparse_layer(AutoConfig.for_model("llama"), 0)


def test_the_worker_names_the_experts_path(model_dirs):
    """No silent fallback: the experts' matmuls are not the prepacked oneDNN ones, and the
    worker's registration says so."""
    from tests.gpu_worker.conftest import make_engine

    _, info = make_engine(model_dirs["qwen3_moe"])
    assert info.backends["linear"] == "onednn"
    assert [
        p
        for p in info.slow_paths
        if p.startswith("moe experts: torch F.linear per expert (8 experts, top 2)")
    ]
