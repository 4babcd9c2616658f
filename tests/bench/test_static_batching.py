"""The static-batching baseline: when batches start and what they hold (the 32 / 50 ms rule),
and what each request is credited with, on a 1-layer model with a handful of requests."""

from __future__ import annotations

import pytest
import torch

from bench import baselines
from bench.baselines import next_batch
from bench.workloads import Request, Workload
from conveyor.tiny_model import make_model


def test_offline_requests_go_in_batches_of_32_at_once():
    arrivals = [0.0] * 70
    assert next_batch(arrivals, 0, free_at=0.0) == (0.0, 32)
    assert next_batch(arrivals, 32, free_at=3.0) == (3.0, 64)
    assert next_batch(arrivals, 64, free_at=5.0) == (5.0, 70)


def test_a_partial_batch_starts_50_ms_after_its_first_arrival():
    arrivals = [1.0, 1.01, 1.2]
    start, end = next_batch(arrivals, 0, free_at=0.0)
    assert start == pytest.approx(1.05) and end == 2  # the third arrives after the start
    assert next_batch(arrivals, 2, free_at=1.5) == (pytest.approx(1.5), 3)  # waited long enough already


def test_a_batch_starts_when_32_are_waiting():
    arrivals = [i * 0.001 for i in range(40)]  # 32 within 50 ms
    assert next_batch(arrivals, 0, free_at=0.0) == (pytest.approx(0.031), 32)


def test_a_busy_runner_takes_at_most_32_of_those_waiting():
    arrivals = [i * 0.1 for i in range(50)]
    assert next_batch(arrivals, 0, free_at=4.0) == (4.0, 32)  # 41 waiting by then
    assert next_batch(arrivals, 0, free_at=0.5) == (pytest.approx(0.5), 6)


@pytest.fixture(scope="module")
def one_layer_model(tmp_path_factory):
    path = make_model(tmp_path_factory.mktemp("bench-model"), preset="tiny", num_hidden_layers=1)
    return baselines.load_model(path, torch.float32, "cpu")


def test_static_run_credits_each_request_its_own_tokens_and_the_batch_end(one_layer_model):
    reqs = [Request([3 + i] * (2 + i), n, 0.0) for i, n in enumerate([3, 1, 4, 2, 2])]
    recs = baselines.run_static(one_layer_model, Workload("t", reqs), batch_size=2, progress=False)
    assert [r.output_tokens for r in recs] == [3, 1, 4, 2, 2]
    assert [len(r.chunk_times) for r in recs] == [3, 1, 4, 2, 2]
    for a, b in ((0, 1), (2, 3)):  # batch-mates: one first token, one end
        assert recs[a].first_token == recs[b].first_token and recs[a].end == recs[b].end
    assert recs[1].end >= recs[0].chunk_times[-1]  # the 1-token request waits for its batch
    assert recs[2].first_token >= recs[0].end  # the next batch starts after the previous one
    assert all(r.ok and r.start == 0.0 for r in recs)


def test_no_batching_runs_one_at_a_time_on_an_even_subset(one_layer_model):
    wl = Workload("t", [Request([5, 6, 7], 2, 0.0, "long" if i == 3 else "short") for i in range(10)])
    subset = baselines.subset_indices(wl, 4)
    assert 3 in subset and len(subset) in (4, 5)  # about 4; each tag keeps a share
    recs = baselines.run_no_batching(one_layer_model, wl, subset[:2], progress=False)
    assert [r.output_tokens for r in recs] == [2, 2]
    assert recs[1].start >= recs[0].end


def test_chat_rows_stop_at_eos_or_their_own_max_tokens(one_layer_model):
    model, prompt = one_layer_model, [3, 4, 5, 6]
    greedy = model.generate(
        torch.tensor([prompt]), max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0
    )[0, len(prompt) :].tolist()
    eos, saved = greedy[2], model.generation_config.eos_token_id
    model.generation_config.eos_token_id = eos  # a token the first row makes by its third step
    try:
        reqs = [
            Request(prompt, 6, 0.0, message="m", ignore_eos=False),
            Request([7, 8, 9], 2, 0.0, message="m", ignore_eos=False),
        ]
        static = baselines.run_static(model, Workload("chat", reqs), progress=False)
        single = baselines.run_no_batching(model, Workload("chat", reqs), [0], progress=False)
    finally:
        model.generation_config.eos_token_id = saved
    stops_at = greedy.index(eos) + 1
    for rec in (static[0], single[0]):
        assert (rec.output_tokens, rec.finish_reason) == (stops_at, "stop") and len(
            rec.chunk_times
        ) == stops_at
    assert 1 <= static[1].output_tokens <= 2 and static[1].finish_reason in ("stop", "length")
    assert static[0].end == static[1].end and all(r.ok for r in static)
