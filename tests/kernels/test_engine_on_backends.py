"""The whole engine on each attention backend (Triton compiled on CUDA or interpreted on
CPU, the CPU C++ kernel, the reference) gives the same greedy tokens as transformers:
kernels and the engine agree on every layout detail (slot mapping, decode-first ordering,
block tables, cu_seqlens)."""

from __future__ import annotations

import pytest
import torch

from conveyor.tiny_model import make_model
from kernels import get_attention_backend
from services.gpu_worker.engine import Engine
from services.gpu_worker.factory import eos_token_ids
from services.gpu_worker.kv_cache import allocate_kv_cache
from services.gpu_worker.loader import load_config, load_model
from tests.gpu_worker.hf_reference import assert_greedy_matches, hf_greedy
from tests.gpu_worker.plan_driver import PlanDriver


# The layer's elementwise ops too: the fused CPU kernels (the CPU default) and eager torch.
@pytest.mark.parametrize(
    "backend,layer_ops", [("triton", "eager"), ("cpu", "cpu"), ("cpu", "eager"), ("reference", "cpu")]
)
def test_engine_on_backend_matches_hf(tmp_path, backend, layer_ops):
    # Small enough for the interpreter: 1 layer, 64-wide, GQA 2. The C++ kernel is compiled
    # for head_dim 64 and 128 only (16 would go to the reference), so it gets heads of 64.
    model_dir = make_model(
        tmp_path / "m",
        arch="qwen3",
        preset="tiny",
        seed=3,
        num_hidden_layers=1,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16 if backend == "triton" else 64,
    )
    device = torch.device("cuda" if torch.cuda.is_available() and backend == "triton" else "cpu")
    model = load_model(
        model_dir, device, torch.float32, get_attention_backend(device, backend), layer_ops=layer_ops
    )
    assert model.ops.name == layer_ops
    block_size, num_blocks = 16, 64
    engine = Engine(
        model,
        allocate_kv_cache(model.shape, num_blocks, block_size, torch.float32, device),
        block_size,
        num_blocks,
        4096,
        eos_token_ids(model_dir, load_config(model_dir)),
    )
    prompts = [[5], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23], list(range(40, 75))]
    driver = PlanDriver(engine.execute, block_size, num_blocks, engine.sampler.eos_token_ids, chunk_size=11)
    for i, p in enumerate(prompts):
        driver.add(str(i), p, 5)
    outputs = driver.run()
    for i, want in enumerate(hf_greedy(model_dir, prompts, 5)):
        assert_greedy_matches(outputs[str(i)], want, f"prompt of {len(prompts[i])} tokens")
