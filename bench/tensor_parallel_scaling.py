"""Decode throughput of one worker at tensor-parallel sizes 1 and 2, on the same model,
threads and batches, in one run (rounds alternate so that drift in machine load hits both).

    python -m bench.tensor_parallel_scaling [--models tiny small] [--batches 1 16 64] [--threads 2]

Both sizes get the same THREADS compute threads: TP 1 uses them all in one process, TP N
gives each rank THREADS / N. On a CPU the ranks' all-reduces (gloo, over loopback TCP, two
per layer) cost more than splitting the matmuls gains; the figure that matters comes from a
GPU with NCCL. Figures are medians over REPEATS rounds; the ratio is TP N / TP 1.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from bench.worker_step import cache_bytes, conveyor_decode_rate, write_results
from conveyor.tiny_model import ensure_model
from services.gpu_worker.factory import create_engine
from shared.config import WorkerSettings


def _engine(args: argparse.Namespace, model_dir, tp: int, tokens: int, max_len: int):
    settings = WorkerSettings(
        model=str(model_dir),
        device=args.device,
        dtype=args.dtype,
        tensor_parallel_size=tp,
        num_threads=args.threads,
        cpu_affinity="none",
        worker_id=f"bench-tp{tp}",
        kv_cache_memory=cache_bytes(model_dir, tokens),
        max_model_len=max_len,
    )
    return create_engine(settings)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny", "small"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64])
    ap.add_argument(
        "--sizes", nargs="+", type=int, default=[1, 2], help="tensor-parallel sizes; the first is the base"
    )
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: rank r on cuda:r")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument(
        "--threads", type=int, default=2, help="compute threads of the worker, shared by its ranks"
    )
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/results/tensor_parallel.json")
    args = ap.parse_args()
    if sum(tp > 1 for tp in args.sizes) > 1:  # both engines stay up, and a process joins one group
        ap.error("--sizes: at most one size above 1 per run")

    rows = []
    for preset in args.models:
        model_dir = ensure_model(preset)
        tokens = max(args.batches) * (args.context + args.steps + 16)
        max_len = args.context + args.steps + 16
        engines = {tp: _engine(args, model_dir, tp, tokens, max_len) for tp in args.sizes}
        try:
            for batch in args.batches:
                rates: dict[int, list[float]] = {tp: [] for tp in args.sizes}
                for _ in range(args.repeats):
                    for tp, (engine, info) in engines.items():
                        # Rank 0 runs in this process: give it its share, as the worker would.
                        torch.set_num_threads(max(1, args.threads // tp))
                        rates[tp].append(
                            conveyor_decode_rate(engine, batch, args.context, args.steps, info.block_size)
                        )
                rows.append(_row(preset, batch, args.sizes, rates))
        finally:
            for engine, _ in engines.values():
                engine.close()
    torch.set_num_threads(args.threads)  # what the results record as the run's threads
    write_results(args, rows)


def _row(preset: str, batch: int, sizes: list[int], rates: dict[int, list[float]]) -> dict:
    base = statistics.median(rates[sizes[0]])
    row = dict(model=preset, batch=batch)
    for tp in sizes:
        row[f"tp{tp}_tok_s"] = statistics.median(rates[tp])
        row[f"tp{tp}_ratio"] = row[f"tp{tp}_tok_s"] / base
    print(
        f"{preset:6s} batch {batch:4d}: "
        + "   ".join(
            f"TP {tp} {row[f'tp{tp}_tok_s']:9.1f} tok/s ({row[f'tp{tp}_ratio']:.2f}x)" for tp in sizes
        ),
        flush=True,
    )
    return row


if __name__ == "__main__":
    main()
