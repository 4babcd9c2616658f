"""A step's timings (StepTimings) are wall times that include the device's work: on CUDA
the clock is read only after a synchronize, on CPU with no cost; the parts add up to the
step's total, with prefill chunks that sample nothing and decodes alike."""

from __future__ import annotations

import pytest
import torch

from conveyor.tiny_model import make_model
from services.gpu_worker.device_clock import device_time
from tests.gpu_worker.conftest import make_engine
from tests.gpu_worker.plan_driver import PlanDriver


def test_the_clock_waits_for_cuda_kernels_and_costs_nothing_on_cpu(monkeypatch):
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    device_time(torch.device("cpu"))
    assert synced == [], "no synchronize on CPU"
    cuda = torch.device("cuda", 0)
    device_time(cuda)
    assert synced == [cuda], "the clock is read once the device's queued kernels have run"


def test_the_parts_of_a_step_add_up_to_its_total(tmp_path):
    model_dir = make_model(tmp_path / "m", preset="tiny", num_hidden_layers=1, seed=3)
    engine, info = make_engine(model_dir)
    driver = PlanDriver(engine.execute, info.block_size, info.num_blocks, info.eos_token_ids, chunk_size=8)
    driver.add("r", list(range(3, 33)), 4)  # a 30-token prompt in chunks of 8: three steps sample nothing
    driver.run()
    steps = [r for r in driver.results if r.timings.total_ms > 0]
    assert (
        sum(not r.sampled_token_ids for r in steps) == 3
        and sum(bool(r.sampled_token_ids) for r in steps) == 4
    )
    for r in steps:
        t = r.timings
        assert min(t.prepare_ms, t.forward_ms, t.sample_ms) >= 0.0 and t.forward_ms > 0.0, t
        assert t.prepare_ms + t.forward_ms + t.sample_ms == pytest.approx(t.total_ms, abs=1e-6), t
