"""The scheduler's own cost per step, against the model step it schedules.

    python -m bench.scheduler_step [--batches 64 256] [--steps 200]

With N requests decoding on one worker, one scheduler step is: schedule (policy + block
pool), build the StepPlan delta, encode it, decode the worker's StepResult, apply it
(append tokens, stop checks, prefix-cache registration, outputs). The model step is a
real `small` engine decode step at the same batch, measured in the same run by
bench/worker_step.py (--step-ms-only) in a child process: this one never loads torch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from services.scheduler.core import SchedulerCore
from services.scheduler.policy import Limits
from shared import messages as m


def scheduler_us_per_step(batch: int, steps: int, context: int = 128) -> float:
    core = SchedulerCore(Limits(max_num_seqs=batch, max_num_batched_tokens=max(2048, batch)))
    reg = m.RegisterWorker(
        "w", "bench", 1 << 20, 16, batch * (context + steps + 64) // 16 + 64, 8192, [0], "cpu", 0
    )
    core.add_worker(reg, 0.0)
    params = m.SamplingParams(temperature=0.0, max_tokens=1 << 20, ignore_eos=True)
    for i in range(batch):
        prompt = [(i * 7919 + j) % 8000 + 10 for j in range(context)]
        core.add_request(m.SubmitRequest(f"r{i}", prompt, params, "tcp://g", 0.0))

    def one_step() -> None:
        plan = core.next_plan("w", 0.0, 0.0)
        wire = m.encode(plan)  # what the scheduler sends...
        m.decode(wire)
        sampled = {rid: 4242 for rid in plan.num_scheduled_tokens}  # ...and gets back
        result = m.decode(m.encode(m.StepResult(plan.step_id, "w", sampled_token_ids=sampled)))
        core.on_step_result(result)
        core.outputs.clear()

    while any(r.num_computed_tokens < len(r.prompt_token_ids) for r in core.requests.values()):
        one_step()  # prefill first: we time steady-state decode
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        one_step()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def model_ms_per_step(batch: int, steps: int = 8, context: int = 128) -> float:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.worker_step",
            "--step-ms-only",
            "--models",
            "small",
            "--batches",
            str(batch),
            "--steps",
            str(steps),
            "--context",
            str(context),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", nargs="+", type=int, default=[64, 256])
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    print("| running requests | scheduler µs/step | small model ms/step | scheduler share |")
    print("|---:|---:|---:|---:|")
    for batch in args.batches:
        us = scheduler_us_per_step(batch, args.steps)
        model_ms = model_ms_per_step(batch)
        print(f"| {batch} | {us:.0f} | {model_ms:.1f} | {us / 1000 / model_ms:.1%} |", flush=True)


if __name__ == "__main__":
    main()
