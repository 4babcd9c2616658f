"""Hugging Face transformers as the reference: greedy `generate`, one prompt at a time
(no padding, so nothing about batching can leak into the reference)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM


def hf_greedy(model_dir: Path, prompts: list[list[int]], max_new_tokens: int | list[int]) -> list[list[int]]:
    """`max_new_tokens`: one for all prompts, or one per prompt."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()
    eos = model.generation_config.eos_token_id
    pad = eos[0] if isinstance(eos, list) else eos
    limits = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
    outputs = []
    for prompt, limit in zip(prompts, limits):
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=limit,
                                 do_sample=False, pad_token_id=pad)
        outputs.append(out[0, len(prompt):].tolist())
    return outputs
