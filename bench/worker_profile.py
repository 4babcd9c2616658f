"""Where a worker step's time goes, by part, on a mixed-workload-like stream of steps.

    python -m bench.worker_profile [--model tiny|small|smollm2] [--steps 60] [--decodes 32]

About 32 requests (--decodes) decode every step while a new prompt of 16-256 tokens is prefilled every
other step (as BENCH.md's `mixed` looks once it is running). The same steps run on two
configurations, one thread each: "before" (plain-torch attention, F.linear) and "after"
(the CPU kernels and prepacked linears the worker uses by default). Each part is timed by
wrapping it, so the serving code carries no instrumentation.
"""

from __future__ import annotations

import argparse
import random
import time
from collections import defaultdict
from dataclasses import replace

import torch

from conveyor.tiny_model import ensure_model
from services.gpu_worker.factory import create_engine
from shared.config import WorkerSettings
from shared.messages import CachedRequest, NewRequest, SamplingParams, StepPlan
from tools.real_models import ensure_smollm2

GREEDY = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=1 << 20)
CONFIGS = {"before": ("reference", "torch"), "after": ("cpu", "auto")}


class Timed:
    """Calls `fn`, adding its wall time to totals[part]."""

    def __init__(self, fn, part: str, totals: dict[str, float]):
        self.fn, self.part, self.totals = fn, part, totals

    def __call__(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.totals[self.part] += time.perf_counter() - t


def instrument(engine, totals: dict[str, float]) -> None:
    model = engine.model
    a = model.attn
    model.attn = replace(
        a,
        store_kv=Timed(a.store_kv, "store K/V", totals),
        decode_attention=Timed(a.decode_attention, "decode attention", totals),
        prefill_attention=Timed(a.prefill_attention, "prefill attention", totals),
    )
    for layer in model.layers:
        for name in ("qkv", "o", "gate_up", "down"):
            setattr(layer, name, Timed(getattr(layer, name), "linear layers", totals))
    model.lm_head = Timed(model.lm_head, "LM head", totals)
    model.forward = Timed(model.forward, "forward", totals)
    engine.sampler = Timed(engine.sampler, "sampling", totals)


def steps(vocab: int, block_size: int, num_steps: int, num_decodes: int = 32, seed: int = 0):
    """The plans of a mixed-like stream: ~32 decodes a step, a new prompt every other step."""
    rng = random.Random(seed)
    next_block, running, step_id = 0, {}, 0
    ids = iter(range(1 << 30))

    def new(prompt_len: int):
        nonlocal next_block
        rid = f"r{next(ids)}"
        blocks = -(-(prompt_len + num_steps + 1) // block_size)
        req = NewRequest(
            rid,
            [rng.randrange(3, vocab) for _ in range(prompt_len)],
            prompt_len,
            GREEDY,
            list(range(next_block, next_block + blocks)),
        )
        next_block += blocks
        return req

    first = [new(rng.randint(50, 400)) for _ in range(num_decodes)]
    running = {r.request_id: len(r.token_ids) for r in first}
    yield StepPlan(0, new_requests=first, num_scheduled_tokens=dict(running)), False
    for step_id in range(1, num_steps + 1):
        plan_new, finished = [], []
        if step_id % 2 == 0:
            finished = [next(iter(running))]
            del running[finished[0]]
            plan_new = [new(rng.randint(16, 256))]
        cached = [CachedRequest(rid, [], n) for rid, n in running.items()]
        scheduled = {rid: 1 for rid in running} | {r.request_id: len(r.token_ids) for r in plan_new}
        yield StepPlan(step_id, plan_new, cached, scheduled, finished), True
        for rid in running:
            running[rid] += 1
        running.update({r.request_id: len(r.token_ids) for r in plan_new})


def profile(
    preset: str, config: str, num_steps: int, num_decodes: int = 32, dtype: str = "float32"
) -> dict[str, float]:
    attention, linear = CONFIGS[config]
    model_dir = ensure_smollm2() if preset == "smollm2" else ensure_model(preset)
    engine, info = create_engine(
        WorkerSettings(
            model=str(model_dir),
            device="cpu",
            dtype=dtype,
            attention_backend=attention,
            linear_backend=linear,
            num_threads=1,
            cpu_affinity="none",
            kv_cache_memory="4GiB",
        )
    )
    totals: dict[str, float] = defaultdict(float)
    instrument(engine, totals)
    for plan, timed in steps(engine.model.shape.vocab_size, info.block_size, num_steps, num_decodes):
        t = time.perf_counter()
        result = engine.execute(plan)
        assert result.error is None, result.error
        if not timed:  # the first plan prefills the 32 running requests: not a mixed step
            totals.clear()
            continue
        totals["step"] += time.perf_counter() - t
    return {part: s * 1000 / num_steps for part, s in totals.items()}  # ms per step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--decodes", type=int, default=32, help="requests decoding every step")
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ms = {
        config: profile(args.model, config, args.steps, args.decodes, args.dtype) for config in args.configs
    }
    parts = ["linear layers", "LM head", "decode attention", "prefill attention", "store K/V"]
    for m in ms.values():
        m["norms, rope, activations (rest of forward)"] = m["forward"] - sum(
            m.get(p, 0.0) for p in parts[:1] + parts[2:]
        )
        m["step bookkeeping (batch, plan)"] = (
            m["step"] - m["forward"] - m.get("LM head", 0.0) - m.get("sampling", 0.0)
        )
    rows = parts + [
        "norms, rope, activations (rest of forward)",
        "sampling",
        "step bookkeeping (batch, plan)",
        "step",
    ]
    print(
        f"{args.model} ({args.dtype}): ms per step (share), "
        f"{args.steps} steps of ~{args.decodes} decodes + a prompt every other step"
    )
    print(f"| part | {' | '.join(ms)} |\n|---|{'---:|' * len(ms)}")
    for p in rows:
        cells = [f"{m.get(p, 0.0):.2f} ({m.get(p, 0.0) / m['step']:.0%})" for m in ms.values()]
        print(f"| {p} | {' | '.join(cells)} |")
    if len(ms) == 2:
        print(f"step time after / before: {ms['after']['step'] / ms['before']['step']:.2f}")


if __name__ == "__main__":
    main()
