"""The sampler's cost per step against greedy's argmax, on a real model's vocab (SmolLM2:
49,152) in fp32: top-p 0.9 at temperature 0.7 (seeded and unseeded), temperature alone
(no filter: a draw over the whole vocab), and greedy for scale. Figures are the process's
CPU time per step, best and median of the rounds (not wall time, which others' load on a
shared machine inflates at random); one torch thread, as the worker runs on 2 cores.

    python -m bench.sampler_cost [--batches 32 128 256] [--threads 1]

The logits are synthetic but shaped like a trained model's: each row's probabilities at
T=0.7 fall as rank^-s (s from 1.5 to 3) over token ids in random order, which gives nuclei
of about the sizes SmolLM2 gives on chat prompts (median 2 tokens, p99 38); the run prints
the sizes it got.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import msgspec
import torch

from services.gpu_worker.sampler import Sampler, SamplingRow
from shared.messages import SamplingParams

TEMPERATURE, TOP_P = 0.7, 0.9
CASES = {
    "greedy": SamplingParams(temperature=0.0),
    "top-p seeded": SamplingParams(temperature=TEMPERATURE, top_p=TOP_P, seed=0),
    "top-p unseeded": SamplingParams(temperature=TEMPERATURE, top_p=TOP_P),
    "temperature only, seeded": SamplingParams(temperature=TEMPERATURE, seed=0),
}


def peaked_logits(batch: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    s = 1.5 + 1.5 * torch.rand(batch, 1, generator=g)
    rank = torch.rand(batch, vocab, generator=g).argsort(dim=-1).argsort(dim=-1).float() + 1
    return -TEMPERATURE * s * rank.log() + 0.01 * torch.randn(batch, vocab, generator=g)


def nucleus_sizes(logits: torch.Tensor) -> list[int]:
    probs = (logits / TEMPERATURE).softmax(dim=-1).sort(dim=-1, descending=True).values
    return ((probs.cumsum(dim=-1) - probs) < TOP_P).sum(dim=-1).tolist()


def rows_for(params: SamplingParams, batch: int) -> list[SamplingRow]:
    """One row per request, seeds 0, 1, ... where seeded, each at output position 5."""
    return [
        SamplingRow(msgspec.structs.replace(params, seed=None if params.seed is None else i), [1] * 9, 4)
        for i in range(batch)
    ]


def cpu_ms(step: Callable[[], object], rounds: int, calls: int) -> list[float]:
    """CPU ms per call, one figure per round of `calls` calls."""
    step()  # warm up
    out = []
    for _ in range(rounds):
        t0 = time.process_time()
        for _ in range(calls):
            step()
        out.append((time.process_time() - t0) / calls * 1000)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", nargs="+", type=int, default=[32, 128, 256])
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (the serving default on 2 cores is 1)"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sampler = Sampler(args.vocab, [0], torch.device("cpu"))
    for batch in args.batches:
        logits = peaked_logits(batch, args.vocab, seed=batch)
        sizes = sorted(nucleus_sizes(logits))
        print(
            f"batch {batch}: top-p {TOP_P} nucleus sizes at T={TEMPERATURE}: "
            f"median {sizes[len(sizes) // 2]}, max {sizes[-1]}",
            flush=True,
        )
        for name, params in CASES.items():
            rows = rows_for(params, batch)
            ms = cpu_ms(functools.partial(sampler, logits, rows), args.rounds, args.calls)
            print(
                f"  {name:26s} best {min(ms):7.2f} ms/step   "
                f"median {statistics.median(ms):7.2f} ms/step (CPU time)",
                flush=True,
            )


if __name__ == "__main__":
    main()
