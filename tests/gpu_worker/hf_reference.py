"""Hugging Face transformers as the reference: greedy `generate`, one prompt at a time
(no padding, so nothing about batching can leak into the reference), with the top-2
logit gap at each position, and the one rule for comparing Conveyor's greedy output to it.

On CPU, F.linear gives a row slightly different results when other rows share the call
(about 1e-6 on the test models, 4e-5 seen on a real one), so where HF's top two logits are
that close, the batch around a request can flip the choice. What holds, and what the tests
check: a request's greedy output equals HF's, except that it may diverge at a position
where HF's top-2 gap is below NEAR_TIE, taking HF's second choice; past that position
the two are different texts and nothing more is compared.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

# Absolute logit units: 100x the batch noise measured on the test models (see
# test_engine_vs_hf.py::test_batch_noise_is_far_inside_the_near_tie_bound), 2.5x the
# largest seen on a real model; a bug moves logits by far more than this.
NEAR_TIE = 1e-4


@dataclass
class Reference:
    tokens: list[int]  # HF's greedy continuation, EOS included where it stopped
    runner_up: list[int]  # HF's second choice at each position
    gaps: list[float]  # top-1 minus top-2 logit at each position


def hf_greedy(
    model_dir: Path, prompts: list[list[int]], max_new_tokens: int | list[int], ignore_eos: bool = False
) -> list[Reference]:
    """`max_new_tokens`: one for all prompts, or one per prompt. `ignore_eos`: generate past
    EOS, as a request with vLLM's ignore_eos does."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()
    eos = model.generation_config.eos_token_id
    pad = eos[0] if isinstance(eos, list) else eos
    if ignore_eos:
        model.generation_config.eos_token_id = None
    limits = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
    references = []
    for prompt, limit in zip(prompts, limits):
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=limit,
                do_sample=False,
                pad_token_id=pad,
                output_logits=True,
                return_dict_in_generate=True,
            )
        top2 = torch.cat(out.logits).float().topk(2, dim=-1)
        references.append(
            Reference(
                out.sequences[0, len(prompt) :].tolist(),
                top2.indices[:, 1].tolist(),
                (top2.values[:, 0] - top2.values[:, 1]).tolist(),
            )
        )
    return references


def assert_greedy_matches(got: list[int], ref: Reference, what: str = "") -> bool:
    """Asserts the rule above; True when `got` equals HF's output exactly, False when it
    diverged at a near-tie (then only the tokens before it were compared)."""
    same = next((i for i, (a, b) in enumerate(zip(got, ref.tokens)) if a != b), None)
    if same is None:
        assert len(got) == len(ref.tokens), f"{what}: {got} vs HF's {ref.tokens}"
        return True
    assert ref.gaps[same] < NEAR_TIE and got[same] == ref.runner_up[same], (
        f"{what}: token {same} is {got[same]}, HF's is {ref.tokens[same]} "
        f"(its second choice {ref.runner_up[same]}, top-2 gap {ref.gaps[same]:.3g}, "
        f"a near-tie below {NEAR_TIE}): {got} vs {ref.tokens}"
    )
    return False


def keeper_reference(model_dir: Path) -> Reference:
    """HF's output for the requests of `Stack.submit_keepers` (greedy, ignore_eos)."""
    from tests.stack import KEEPER_PROMPT, KEEPER_TOKENS

    return hf_greedy(model_dir, [KEEPER_PROMPT], KEEPER_TOKENS, ignore_eos=True)[0]
