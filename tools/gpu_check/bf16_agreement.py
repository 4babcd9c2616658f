"""How far the engine's greedy output in bf16 follows transformers' in fp32, on the
Llama/Qwen2/Qwen3 test models: bf16 rounding flips near-ties, after which the texts part,
so this is a figure to report, not a pass/fail bound. Prompts run in one batch, as served.

    python -m tools.gpu_check.bf16_agreement --device cuda --out bf16.json
    python -m tools.gpu_check.bf16_agreement --device cpu --smollm2 48 --tokens 64 --out bf16.json

--smollm2 N adds the real model SmolLM2-135M-Instruct on N of the `chat` workload's messages
(chat template applied): real text, whose top-2 gaps are those of a trained model.

The reported agreement: tokens equal before the first difference, over all tokens compared.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from conveyor.tiny_model import PRESETS, make_model
from services.gpu_worker.factory import create_engine
from shared.config import WorkerSettings
from tests.gpu_worker.conftest import VARIANTS
from tests.gpu_worker.hf_reference import Reference, hf_greedy
from tests.gpu_worker.plan_driver import PlanDriver
from tests.gpu_worker.test_engine_vs_hf import PROMPT_LENGTHS, random_prompts


def first_difference(got: list[int], want: list[int]) -> int:
    return next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))


def model_agreement(
    model_dir: Path,
    device: str,
    dtype: str,
    prompts: list[list[int]],
    tokens: int,
    max_model_len: int | None = None,
    kv_cache_memory: str = "64MiB",
) -> dict:
    refs: list[Reference] = hf_greedy(model_dir, prompts, tokens)  # fp32, on the CPU: the ground truth
    engine, info = create_engine(
        WorkerSettings(
            model=str(model_dir),
            device=device,
            dtype=dtype,
            block_size=16,
            kv_cache_memory=kv_cache_memory,
            worker_id="bf16-check",
            max_model_len=max_model_len,
        )
    )
    try:
        driver = PlanDriver(engine.execute, info.block_size, info.num_blocks, info.eos_token_ids)
        for i, prompt in enumerate(prompts):
            driver.add(str(i), prompt, tokens)
        outputs = driver.run()
    finally:
        engine.close()
    firsts = [first_difference(outputs[str(i)], ref.tokens) for i, ref in enumerate(refs)]
    gaps = [ref.gaps[f] for f, ref in zip(firsts, refs) if f < len(ref.tokens)]
    return {
        "prefix_agreement": sum(firsts) / sum(len(r.tokens) for r in refs),
        "exact": sum(outputs[str(i)] == ref.tokens for i, ref in enumerate(refs)),
        "first_difference": firsts,
        # fp32 top-2 logit gap where they part: small means bf16 flipped a near-tie.
        "median_gap_at_difference": statistics.median(gaps) if gaps else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--tokens", type=int, default=32, help="N: greedy tokens compared per prompt")
    ap.add_argument("--prompts", type=int, default=len(PROMPT_LENGTHS), help="prompts per model")
    ap.add_argument("--smollm2", type=int, default=0, metavar="N", help="also SmolLM2 on N chat messages")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    models = {}
    if args.smollm2:
        models["smollm2"] = smollm2_agreement(args.device, args.dtype, args.smollm2, args.tokens)
    with tempfile.TemporaryDirectory() as tmp:
        for arch, overrides in VARIANTS.items():
            model_dir = make_model(Path(tmp) / arch, preset="tiny", num_hidden_layers=2, seed=1, **overrides)
            prompts = random_prompts(
                seed=7, vocab=PRESETS["tiny"]["vocab_size"], lengths=PROMPT_LENGTHS[: args.prompts]
            )
            models[arch] = model_agreement(model_dir, args.device, args.dtype, prompts, args.tokens)
            print(
                f"{arch}: {models[arch]['prefix_agreement']:.0%} of tokens equal before the first "
                f"difference, {models[arch]['exact']}/{len(prompts)} prompts equal throughout",
                flush=True,
            )
    args.out.write_text(
        json.dumps(
            {
                "device": args.device,
                "dtype": args.dtype,
                "tokens": args.tokens,
                "prompts": args.prompts,
                "models": models,
            },
            indent=2,
        )
    )


def smollm2_agreement(device: str, dtype: str, n: int, tokens: int) -> dict:
    import numpy as np
    from transformers import AutoTokenizer

    from bench.chat_prompts import messages
    from tools.real_models import ensure_smollm2

    model_dir = ensure_smollm2()
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": m}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        for m in messages(n, np.random.default_rng(0))
    ]
    result = model_agreement(
        model_dir, device, dtype, prompts, tokens, max_model_len=1024, kv_cache_memory="1GiB"
    )
    print(
        f"smollm2: {result['prefix_agreement']:.0%} of tokens equal before the first difference, "
        f"{result['exact']}/{n} prompts equal throughout",
        flush=True,
    )
    return result


if __name__ == "__main__":
    main()
