"""What structured outputs cost the worker: decode step time with BATCH requests held to a
JSON schema against BATCH plain ones, same model and sampling, rounds interleaved in one run.

    python -m services.gpu_worker.bench_structured [--models tiny small] [--batch 64] [--out FILE]

Each round prefills BATCH fresh requests (CONTEXT-token prompts), then times STEPS decode
steps (`Engine.execute`, everything a worker does per step). The schema's array has a
minItems that no request reaches within the steps, so every timed token is mask work.
Figures are medians over every timed step of REPEATS rounds per side; the ratio is
constrained / plain, for greedy and for temperature-1 sampling. The first round of each
side is a warm-up (it compiles the grammar and reads the tokenizer) and is not timed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from services.gpu_worker.bench_step import _cache_bytes, write_results
from services.gpu_worker.factory import create_engine
from shared.config import WorkerSettings
from shared.messages import CachedRequest, NewRequest, SamplingParams, StepPlan, StructuredOutput
from shared.tiny_model import ensure_model

ITEM = {"type": "object", "additionalProperties": False, "required": ["id", "name", "kind", "ok"],
        "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 9999},
                       "name": {"type": "string", "maxLength": 12},
                       "kind": {"enum": ["alpha", "beta", "gamma"]},
                       "ok": {"type": "boolean"}}}
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["items"],
          "properties": {"items": {"type": "array", "items": ITEM, "minItems": 64, "maxItems": 64}}}
CONSTRAINT = StructuredOutput("json_schema", json.dumps(SCHEMA))


def round_step_ms(engine, sampling: SamplingParams, batch: int, context: int, steps: int,
                  block_size: int, round_id: int) -> tuple[list[float], list[float], float]:
    """One round: decode step times (ms), their sample_ms, and the share of timed rows whose
    grammar was still open (1.0 for plain rows: nothing to close)."""
    vocab = engine.model.shape.vocab_size
    g = torch.Generator().manual_seed(round_id)
    prompts = torch.randint(3, vocab, (batch, context), generator=g).tolist()
    per_request = -(-(context + steps + 1) // block_size)
    ids = [f"r{round_id}-{i}" for i in range(batch)]
    new = [NewRequest(rid, prompt, context, sampling, list(range(i * per_request, (i + 1) * per_request)))
           for i, (rid, prompt) in enumerate(zip(ids, prompts))]
    step_id = round_id * (steps + 2)
    result = engine.execute(StepPlan(step_id, new_requests=new, num_scheduled_tokens={r: context for r in ids}))
    assert result.error is None, result.error
    step_ms, sample_ms, open_rows = [], [], 0
    for s in range(steps):
        cached = [CachedRequest(r, [], context + s) for r in ids]
        start = time.perf_counter()
        result = engine.execute(StepPlan(step_id + 1 + s, cached_requests=cached,
                                         num_scheduled_tokens={r: 1 for r in ids}))
        step_ms.append((time.perf_counter() - start) * 1000)
        assert result.error is None, result.error
        sample_ms.append(result.timings.sample_ms)
        open_rows += sum(1 for r in ids if _grammar_open(engine, r))
    engine.execute(StepPlan(step_id + steps + 1, finished_ids=ids))
    return step_ms, sample_ms, open_rows / (batch * steps)


def _grammar_open(engine, request_id: str) -> bool:
    grammar = engine.rows[request_id].sampling.grammar
    return grammar is None or not grammar.free


def measure(preset: str, batch: int, context: int, steps: int, repeats: int, temperature: float) -> dict:
    model_dir = ensure_model(preset)
    engine, info = create_engine(WorkerSettings(model=str(model_dir), device="cpu", dtype="float32",
                                                kv_cache_memory=_cache_bytes(model_dir, batch * (context + steps + 16))))
    seed = None if temperature == 0 else 0
    sides = {"plain": SamplingParams(temperature=temperature, seed=seed, max_tokens=1 << 20),
             "constrained": SamplingParams(temperature=temperature, seed=seed, max_tokens=1 << 20,
                                           structured=CONSTRAINT)}
    timed = {name: ([], [], []) for name in sides}
    for r in range(repeats + 1):
        # Alternate which side goes first, so drift in machine load hits both.
        for name in (sorted(sides) if r % 2 else sorted(sides, reverse=True)):
            step_ms, sample_ms, open_share = round_step_ms(engine, sides[name], batch, context, steps,
                                                           info.block_size, 2 * r + (name == "constrained"))
            if r > 0:
                timed[name][0].extend(step_ms)
                timed[name][1].extend(sample_ms)
                timed[name][2].append(open_share)
    row = dict(model=preset, batch=batch, temperature=temperature)
    for name, (step_ms, sample_ms, open_share) in timed.items():
        row[f"{name}_step_ms"] = statistics.median(step_ms)
        row[f"{name}_sample_ms"] = statistics.median(sample_ms)
        row[f"{name}_open_share"] = min(open_share)
    row["ratio"] = row["constrained_step_ms"] / row["plain_step_ms"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny", "small"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--temperatures", nargs="+", type=float, default=[0.0, 1.0])
    ap.add_argument("--out", default="bench/results/structured.json")
    args = ap.parse_args()
    rows = []
    for preset in args.models:
        for temperature in args.temperatures:
            row = measure(preset, args.batch, args.context, args.steps, args.repeats, temperature)
            rows.append(row)
            print(f"{preset:6s} batch {args.batch} T={temperature:g}: plain {row['plain_step_ms']:7.2f} ms/step "
                  f"(sample {row['plain_sample_ms']:.2f})   constrained {row['constrained_step_ms']:7.2f} ms/step "
                  f"(sample {row['constrained_sample_ms']:.2f}, grammar open {row['constrained_open_share']:.0%})   "
                  f"ratio {row['ratio']:.3f}", flush=True)
    write_results(args, rows)


if __name__ == "__main__":
    main()
