"""What structured outputs cost the worker: decode step time with BATCH requests held to a
JSON schema against BATCH plain ones, same model, prompts and sampling, in one run.

    python -m bench.structured_cost [--models tiny small] [--batch 64] [--out FILE]

Each round prefills BATCH fresh requests per side (CONTEXT-token prompts, the same for
both), then runs STEPS decode steps of each side in turn (`Engine.execute` of a plan with
only that side's rows: everything a worker does per step). The schema's array has a
minItems that no request reaches within the steps, so every timed token is mask work.
Figures are medians over every timed step of REPEATS rounds; the ratio is constrained /
plain, for greedy and for temperature-1 sampling. The first round is a warm-up (it reads
the tokenizer and compiles the grammar) and is not timed. Last, the mask's apply step alone:
the worker's table lookup (GrammarMask) against xgrammar's own CPU kernel.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import torch

from bench.worker_step import cache_bytes, write_results
from conveyor.tiny_model import ensure_model
from services.gpu_worker.factory import create_engine
from services.gpu_worker.grammar_masks import byte_table
from services.gpu_worker.loader import load_config
from shared.config import WorkerSettings
from shared.messages import CachedRequest, NewRequest, SamplingParams, StepPlan, StructuredOutput

ITEM = {
    "type": "object",
    "additionalProperties": False,
    "required": ["id", "name", "kind", "ok"],
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 9999},
        "name": {"type": "string", "maxLength": 12},
        "kind": {"enum": ["alpha", "beta", "gamma"]},
        "ok": {"type": "boolean"},
    },
}
SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["items"],
    "properties": {"items": {"type": "array", "items": ITEM, "minItems": 64, "maxItems": 64}},
}
CONSTRAINT = StructuredOutput("json_schema", json.dumps(SCHEMA))
_step_ids = itertools.count()


class Side:
    """One side's BATCH requests on the engine, and what its timed steps took."""

    def __init__(self, name: str, sampling: SamplingParams):
        self.name, self.sampling = name, sampling
        self.ids: list[str] = []
        self.step_ms: list[float] = []
        self.sample_ms: list[float] = []
        self.open_rows = self.rows_timed = 0

    def start(self, engine, prompts: list[list[int]], first_block: int, per_request: int, tag: str) -> None:
        self.ids = [f"{self.name}-{tag}-{i}" for i in range(len(prompts))]
        new = [
            NewRequest(
                rid,
                prompt,
                len(prompt),
                self.sampling,
                list(range(first_block + i * per_request, first_block + (i + 1) * per_request)),
            )
            for i, (rid, prompt) in enumerate(zip(self.ids, prompts))
        ]
        _execute(
            engine,
            StepPlan(
                next(_step_ids),
                new_requests=new,
                num_scheduled_tokens={r: len(p) for r, p in zip(self.ids, prompts)},
            ),
        )

    def step(self, engine, computed: int, timed: bool) -> None:
        cached = [CachedRequest(r, [], computed) for r in self.ids]
        begin = time.perf_counter()
        result = _execute(
            engine,
            StepPlan(next(_step_ids), cached_requests=cached, num_scheduled_tokens={r: 1 for r in self.ids}),
        )
        if timed:
            self.step_ms.append((time.perf_counter() - begin) * 1000)
            self.sample_ms.append(result.timings.sample_ms)
            self.rows_timed += len(self.ids)
            self.open_rows += sum(1 for r in self.ids if _grammar_open(engine, r))

    def finish(self, engine) -> None:
        _execute(engine, StepPlan(next(_step_ids), finished_ids=self.ids))


def _execute(engine, plan: StepPlan):
    result = engine.execute(plan)
    assert result.error is None, result.error
    return result


def _grammar_open(engine, request_id: str) -> bool:
    grammar = engine.rows[request_id].sampling.grammar
    return grammar is None or not grammar.free


def measure(preset: str, batch: int, context: int, steps: int, repeats: int, temperature: float) -> dict:
    model_dir = ensure_model(preset)
    engine, info = create_engine(
        WorkerSettings(
            model=str(model_dir),
            device="cpu",
            dtype="float32",
            kv_cache_memory=cache_bytes(model_dir, 2 * batch * (context + steps + 16)),
        )
    )
    seed = None if temperature == 0 else 0
    plain = Side("plain", SamplingParams(temperature=temperature, seed=seed, max_tokens=1 << 20))
    constrained = Side(
        "constrained",
        SamplingParams(temperature=temperature, seed=seed, max_tokens=1 << 20, structured=CONSTRAINT),
    )
    per_request = -(-(context + steps + 1) // info.block_size)
    vocab = engine.model.shape.vocab_size
    for r in range(repeats + 1):
        g = torch.Generator().manual_seed(r)
        prompts = torch.randint(3, vocab, (batch, context), generator=g).tolist()  # the same for both sides
        plain.start(engine, prompts, 0, per_request, str(r))
        constrained.start(engine, prompts, batch * per_request, per_request, str(r))
        for s in range(steps):
            # Step by step, alternating which side goes first: drift in load hits both alike.
            for side in (plain, constrained) if s % 2 else (constrained, plain):
                side.step(engine, context + s, timed=r > 0)
        plain.finish(engine)
        constrained.finish(engine)
    row = dict(model=preset, batch=batch, temperature=temperature)
    for side in (plain, constrained):
        row[f"{side.name}_step_ms"] = statistics.median(side.step_ms)
        row[f"{side.name}_sample_ms"] = statistics.median(side.sample_ms)
        row[f"{side.name}_open_share"] = side.open_rows / side.rows_timed
    row["ratio"] = row["constrained_step_ms"] / row["plain_step_ms"]
    return row


def apply_ms(vocab: int, batch: int, repeats: int = 200) -> dict:
    """Applying one step's filled bitmask to the logits: xgrammar's CPU kernel against the
    table lookup GrammarMask uses (byte_table; both from the same random bitmask, results equal)."""
    import xgrammar as xgr

    logits = torch.randn(batch, vocab)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (batch, -(-vocab // 32)), dtype=torch.int32)
    table = byte_table(torch.device("cpu"))

    def ours():
        add = torch.nn.functional.embedding(bitmask.view(torch.uint8).long(), table).view(batch, -1)
        return logits.clone().add_(add[:, :vocab])

    def xgrammar_kernel():
        out = logits.clone()
        xgr.apply_token_bitmask_inplace(out, bitmask)
        return out

    assert torch.equal(ours(), xgrammar_kernel())
    timings = {}
    for name, fn in (("lookup_ms", ours), ("xgrammar_ms", xgrammar_kernel)):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        timings[name] = (time.perf_counter() - start) / repeats * 1000
    return dict(vocab=vocab, batch=batch, **timings)


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
            print(
                f"{preset:6s} batch {args.batch} T={temperature:g}: "
                f"plain {row['plain_step_ms']:7.2f} ms/step (sample {row['plain_sample_ms']:.2f})   "
                f"constrained {row['constrained_step_ms']:7.2f} ms/step "
                f"(sample {row['constrained_sample_ms']:.2f}, "
                f"grammar open {row['constrained_open_share']:.0%})   ratio {row['ratio']:.3f}",
                flush=True,
            )
    for vocab in sorted({ensure_model_vocab(preset) for preset in args.models}):
        row = apply_ms(vocab, args.batch)
        rows.append(row)
        print(
            f"apply a {args.batch} x {vocab} bitmask: table lookup {row['lookup_ms']:.3f} ms, "
            f"xgrammar's CPU kernel {row['xgrammar_ms']:.3f} ms",
            flush=True,
        )
    write_results(args, rows)


def ensure_model_vocab(preset: str) -> int:
    return load_config(ensure_model(preset)).vocab_size


if __name__ == "__main__":
    main()
