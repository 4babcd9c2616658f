"""Prompt logprobs from the engine: in a batch of prompts of different lengths, prefilled in
several chunks beside requests that do not ask, every prompt token's logprob and its top-N
equal transformers' log_softmax over the same weights (fp32, within 1e-3); the lm_head runs
only on the positions that need it, in bounded slices."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from services.gpu_worker import prompt_logprobs as module
from shared.messages import PromptLogprobs, SamplingParams, StepResult, TokenLogprobs
from tests.gpu_worker.conftest import VARIANTS, make_engine
from tests.gpu_worker.plan_driver import PlanDriver

PROMPT_LENGTHS = [1, 2, 15, 17, 40, 129]
TOP = 3
TOLERANCE = 1e-3  # fp32 logprobs; batching and chunking move them by ~1e-6
MAX_TOKENS = 3


def _prompts(seed: int, vocab: int, lengths=PROMPT_LENGTHS) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def _hf_logprobs(model_dir, prompts: list[list[int]]) -> list[torch.Tensor]:
    """[P, vocab] per prompt: row p is the distribution of the token at position p + 1."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()
    with torch.inference_mode():
        return [model(torch.tensor([p])).logits[0].float().log_softmax(dim=-1) for p in prompts]


def _assembled(
    results: list[StepResult], request_id: str
) -> tuple[list[PromptLogprobs], list[TokenLogprobs]]:
    """The request's chunks in step order, checked to follow each other from position 1."""
    chunks = [r.prompt_logprobs[request_id] for r in results if request_id in r.prompt_logprobs]
    position = 1
    for chunk in chunks:
        assert chunk.start == position, f"{request_id}: a chunk starts at {chunk.start}, expected {position}"
        position += len(chunk.entries)
    return chunks, [e for c in chunks for e in c.entries]


def _assert_matches_hf(entries: list[TokenLogprobs], prompt: list[int], reference: torch.Tensor, top: int):
    assert len(entries) == len(prompt) - 1, f"{len(entries)} entries for a {len(prompt)}-token prompt"
    for q, entry in enumerate(entries, start=1):
        ref = reference[q - 1]
        assert entry.token_id == prompt[q]
        assert abs(entry.logprob - ref[prompt[q]].item()) < TOLERANCE, (
            q,
            entry.logprob,
            ref[prompt[q]].item(),
        )
        ref_values, ref_ids = ref.topk(top)
        assert len(entry.top) == top
        # Same ids in the same order; where HF's values tie within the tolerance, either of
        # the tied ids is right, so each id is checked by its own HF logprob.
        for (got_id, got_lp), want_lp in zip(entry.top, ref_values.tolist()):
            assert abs(got_lp - want_lp) < TOLERANCE and abs(ref[got_id].item() - got_lp) < TOLERANCE, (
                q,
                entry.top,
                list(zip(ref_ids.tolist(), ref_values.tolist())),
            )
        assert len({i for i, _ in entry.top}) == top
        if top > 1 and (ref_values[:-1] - ref_values[1:]).min() > 1e-4:
            assert [i for i, _ in entry.top] == ref_ids.tolist()


class _CountingLogits:
    """Wraps the model's lm_head call and records how many hidden rows each call gets."""

    def __init__(self, engine):
        self.inner, self.rows = engine.model.compute_logits, []
        engine.model.compute_logits = self

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        self.rows.append(hidden.shape[0])
        return self.inner(hidden)


@pytest.mark.parametrize("arch", list(VARIANTS))
def test_prompt_logprobs_match_hf_in_a_chunked_mixed_batch(model_dirs, arch):
    engine, info = make_engine(model_dirs[arch])
    prompts = _prompts(seed=11, vocab=info.vocab_size)
    plain = _prompts(seed=12, vocab=info.vocab_size, lengths=[30, 70])
    reference = _hf_logprobs(model_dirs[arch], prompts)
    counting = _CountingLogits(engine)

    driver = PlanDriver(engine.execute, info.block_size, info.num_blocks, info.eos_token_ids, chunk_size=13)
    for i, prompt in enumerate(prompts):
        driver.add(f"asks{i}", prompt, MAX_TOKENS, SamplingParams(temperature=0.0, prompt_logprobs=TOP))
    driver.add("token-only", prompts[4], MAX_TOKENS, SamplingParams(temperature=0.0, prompt_logprobs=0))
    for i, prompt in enumerate(plain):
        driver.add(f"plain{i}", prompt, MAX_TOKENS, SamplingParams(temperature=0.0))
    outputs = driver.run()

    for i, prompt in enumerate(prompts):
        chunks, entries = _assembled(driver.results, f"asks{i}")
        _assert_matches_hf(entries, prompt, reference[i], TOP)
        assert len(chunks) == max(0, -(-(len(prompt) - 1) // 13)), "one chunk per prefill step that predicts"
    _, token_only = _assembled(driver.results, "token-only")
    _assert_matches_hf(token_only, prompts[4], reference[4], 0)
    assert not any(f"plain{i}" in r.prompt_logprobs for r in driver.results for i in range(len(plain)))
    # The lm_head saw the sampled rows and the predicting prompt positions, nothing more.
    sampled = sum(len(tokens) for tokens in outputs.values())
    predicted = sum(len(p) - 1 for p in prompts) + len(prompts[4]) - 1
    assert sum(counting.rows) == sampled + predicted


def test_plain_requests_cost_no_extra_logits(model_dirs):
    engine, info = make_engine(model_dirs["llama"])
    counting = _CountingLogits(engine)
    driver = PlanDriver(engine.execute, info.block_size, info.num_blocks, info.eos_token_ids, chunk_size=13)
    for i, prompt in enumerate(_prompts(seed=13, vocab=info.vocab_size)):
        driver.add(f"r{i}", prompt, MAX_TOKENS, SamplingParams(temperature=0.0))
    outputs = driver.run()
    assert sum(counting.rows) == sum(len(t) for t in outputs.values())
    assert not any(r.prompt_logprobs for r in driver.results)


def test_long_prompts_are_computed_in_bounded_slices(model_dirs, monkeypatch):
    model_dir = model_dirs["qwen3"]
    prompt = _prompts(seed=14, vocab=4096, lengths=[200])[0]
    results = {}
    for height in (None, 7):
        engine, info = make_engine(model_dir)
        if height is not None:
            monkeypatch.setattr(module, "SLICE_ELEMENTS", height * info.vocab_size)
        counting = _CountingLogits(engine)
        driver = PlanDriver(engine.execute, info.block_size, info.num_blocks, info.eos_token_ids)
        driver.add("long", prompt, 1, SamplingParams(temperature=0.0, prompt_logprobs=2))
        driver.run()
        results[height] = (_assembled(driver.results, "long")[1], counting.rows)
    whole, sliced = results[None], results[7]
    assert max(whole[1]) == len(prompt) - 1, "one slice: the whole prompt at once"
    assert max(sliced[1]) == 7 and sum(sliced[1]) == sum(whole[1])
    for a, b in zip(whole[0], sliced[0]):
        assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-5
        assert [i for i, _ in a.top] == [i for i, _ in b.top]
    _assert_matches_hf(sliced[0], prompt, _hf_logprobs(model_dir, [prompt])[0], 2)
