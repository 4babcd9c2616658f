"""The BENCH.md workloads: sizes, length ranges, arrivals, and the same requests for the same seed."""

from __future__ import annotations

import numpy as np
import pytest

from bench import workloads as w

VOCAB = 4096


def test_mixed_matches_bench_md():
    wl = w.build("mixed", VOCAB)
    assert len(wl) == 400
    plens = [len(r.prompt) for r in wl.requests]
    outs = [r.max_tokens for r in wl.requests]
    assert 16 <= min(plens) and max(plens) <= 256
    assert 8 <= min(outs) and max(outs) <= 1024
    assert 48 <= np.median(outs) <= 80  # lognormal, median 64
    assert all(r.arrival == 0.0 for r in wl.requests)
    ids = np.concatenate([r.prompt for r in wl.requests])
    assert ids.min() >= 3 and ids.max() < VOCAB  # no special ids, inside the vocabulary


def test_small_model_gets_100_mixed_requests():
    assert len(w.build("mixed", VOCAB, preset="small")) == 100
    assert len(w.build("mixed", VOCAB, preset="tiny")) == 400


def test_same_seed_same_requests_other_seed_other_requests():
    a, b, c = w.build("mixed", VOCAB, 20), w.build("mixed", VOCAB, 20), w.build("mixed", VOCAB, 20, seed=1)
    assert a.requests == b.requests
    assert a.requests != c.requests


def test_mixed_online_is_mixed_with_poisson_arrivals():
    offline, online = w.build("mixed", VOCAB, 50), w.build("mixed-online", VOCAB, 50, rate=5.0)
    assert [(r.prompt, r.max_tokens) for r in offline.requests] == [(r.prompt, r.max_tokens) for r in online.requests]
    arrivals = [r.arrival for r in online.requests]
    assert arrivals[0] == 0.0 and arrivals == sorted(arrivals) and arrivals[-1] > 0


def test_poisson_rate_is_roughly_right():
    rng = np.random.default_rng(0)
    arrivals = w.poisson_arrivals(rng, 4001, 10.0)
    assert np.mean(np.diff(arrivals)) == pytest.approx(0.1, rel=0.05)


def test_shared_prefix():
    wl = w.build("shared-prefix", VOCAB)
    assert len(wl) == 200
    prefix = wl.requests[0].prompt[:512]
    assert all(len(r.prompt) == 544 and r.prompt[:512] == prefix and r.max_tokens == 32 for r in wl.requests)
    assert len({tuple(r.prompt[512:]) for r in wl.requests}) == 200
    assert w.ideal_prefix_hit_rate(wl, 16) == pytest.approx(199 * 512 / (200 * 544))


def test_long_short_and_its_short_only_variant():
    wl = w.build("long-short", VOCAB, rate=4.0)
    longs = [r for r in wl.requests if r.tag == "long"]
    shorts = [r for r in wl.requests if r.tag == "short"]
    assert (len(longs), len(shorts)) == (20, 300)
    assert all(len(r.prompt) == 2048 and r.max_tokens == 512 for r in longs)
    assert all(len(r.prompt) == 64 and r.max_tokens == 32 for r in shorts)
    only = wl.only("short")
    assert only.requests == shorts  # same requests, same arrival times
    assert w.long_short(VOCAB, None, 40).requests[5].prompt == w.long_short(VOCAB, 2.0, 40).requests[5].prompt


def test_scaled_down_long_short_keeps_some_long_requests():
    wl = w.build("long-short", VOCAB, 40, rate=2.0)
    assert len(wl) == 40 and 2 <= sum(r.tag == "long" for r in wl.requests) <= 3


def test_custom_workload_and_length_specs():
    wl = w.custom(VOCAB, 30, w.LengthDist.parse("fixed:10"), w.LengthDist.parse("uniform:2:5"), rate=None)
    assert {len(r.prompt) for r in wl.requests} == {10}
    assert all(2 <= r.max_tokens <= 5 for r in wl.requests)
    for bad in ("fixed", "uniform:5:2", "normal:3:4", "lognormal:64:1:0:10", "fixed:x"):
        with pytest.raises(ValueError):
            w.LengthDist.parse(bad)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="workload must be one of"):
        w.build("nope", VOCAB)
    with pytest.raises(ValueError, match="rate"):
        w.build("mixed-online", VOCAB, 10)
    with pytest.raises(ValueError, match="rate"):
        w.build("long-short", VOCAB, 10)
