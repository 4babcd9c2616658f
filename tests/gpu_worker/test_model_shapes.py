"""Models shaped like the real ones people serve run on the fast kernels, and the worker says
which kernels it runs on: for each GQA group and head dim below, the registered backends are
the CPU kernels with no slow path, and greedy output equals transformers token for token.
A shape the kernels cannot serve still runs (on the reference) and is named as a slow path,
in the worker's registration and in `conveyor status`."""

from __future__ import annotations

import logging
import random
import time

import pytest

from conveyor.status import render
from conveyor.tiny_model import make_model
from shared.figure_records import SystemStatus, WorkerFigures
from tests.gpu_worker.conftest import make_engine
from tests.gpu_worker.hf_reference import assert_greedy_matches, hf_greedy
from tests.gpu_worker.plan_driver import PlanDriver, assert_batch_matches_hf

# (query heads, kv heads, head_dim): the groups and head dims of real models. SmolLM2-135M
# (9/3, 64), Llama-3.2-3B (24/8: group 3, 128), Qwen2.5-1.5B (12/2: 6), Qwen2.5-0.5B (14/2: 7),
# Phi-2's head_dim 80, Gemma 3's 256, and a group of 5; kept to a few heads so that the
# random-weight models stay small (hidden size 32 per head: transformers wants a multiple).
SHAPES = [(9, 3, 64), (6, 2, 128), (12, 2, 64), (7, 1, 96), (10, 2, 80), (4, 2, 256), (5, 1, 64)]
MAX_TOKENS = 8


def _model(tmp_path_factory, num_heads: int, num_kv_heads: int, head_dim: int):
    return make_model(
        tmp_path_factory.mktemp(f"h{num_heads}-kv{num_kv_heads}-d{head_dim}"),
        preset="tiny",
        num_hidden_layers=2,
        hidden_size=32 * num_heads,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        seed=3,
    )


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", SHAPES)
def test_real_model_shapes_run_the_fast_kernels_and_match_hf(
    tmp_path_factory, num_heads, num_kv_heads, head_dim
):
    model_dir = _model(tmp_path_factory, num_heads, num_kv_heads, head_dim)
    engine, info = make_engine(model_dir)
    assert info.backends == {"attention": "cpu", "layer_ops": "cpu", "linear": "onednn", "dtype": "float32"}
    assert info.slow_paths == []

    rng = random.Random(head_dim * 100 + num_heads)
    prompts = [[rng.randrange(3, info.vocab_size) for _ in range(n)] for n in (1, 17, 40, 90)]
    # Chunks of 13 tokens: prefill tiles that end mid-group and mid-block, beside decodes.
    assert_batch_matches_hf(
        engine,
        info,
        model_dir,
        prompts,
        MAX_TOKENS,
        13,
        f"{num_heads}/{num_kv_heads} heads, head_dim {head_dim}",
    )


def test_a_shape_without_kernels_is_named_at_start_up_and_in_status(tmp_path_factory, caplog):
    model_dir = _model(tmp_path_factory, 4, 2, 72)  # no real model has head_dim 72; none compiled
    with caplog.at_level(logging.INFO, logger="services.gpu_worker.factory"):
        engine, info = make_engine(model_dir)
    assert info.backends["attention"] == "reference"
    [slow] = info.slow_paths
    assert "torch reference instead of the cpu kernels for 4 query heads over 2 kv heads, head_dim 72" in slow
    assert "head_dim 72 has no compiled kernel" in slow
    assert f"slow path: {slow}" in caplog.text
    assert "kernels: attention reference, layer_ops cpu, linear onednn, dtype float32" in caplog.text

    # It still serves, correctly, on the reference.
    prompt = list(range(3, 40))
    driver = PlanDriver(engine.execute, info.block_size, info.num_blocks, info.eos_token_ids)
    driver.add("r", prompt, MAX_TOKENS)
    assert_greedy_matches(driver.run()["r"], hf_greedy(model_dir, [prompt], MAX_TOKENS)[0])

    now = time.time()
    status = SystemStatus(
        scheduler=None,
        workers={info.worker_id: WorkerFigures(registered=info, max_len=4096, updated_at=now)},
        errors=[],
        queue_length=0,
        pending=0,
    )
    screen = render(status, now, "test")
    assert "kernels: attention reference, layer_ops cpu, linear onednn, dtype float32" in screen
    assert f"SLOW PATH: {slow}" in screen
