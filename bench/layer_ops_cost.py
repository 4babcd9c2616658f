"""Decode step time with the layer's elementwise ops fused (CPU kernels) against eager torch,
on one engine in one run, rounds alternating so drift in machine load hits both. Figures are
the process's CPU time per step, best and median of the rounds (not wall time, which others'
load on a shared machine inflates at random; load only ever adds, so the best round is the
steadiest figure); one torch thread, as the worker runs on 2 cores.

    python -m bench.layer_ops_cost [--models tiny small] [--batches 16 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.worker_step import cache_bytes, conveyor_decode_rate
from conveyor.tiny_model import ensure_model
from services.gpu_worker.factory import create_engine
from services.gpu_worker.layer_ops import get_layer_ops
from shared.config import WorkerSettings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny", "small"])
    ap.add_argument("--batches", nargs="+", type=int, default=[16, 64])
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (the serving default on 2 cores is 1)"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for preset in args.models:
        model_dir = ensure_model(preset)
        tokens = max(args.batches) * (args.context + args.steps + 16)
        engine, info = create_engine(
            WorkerSettings(
                model=str(model_dir),
                device="cpu",
                dtype="float32",
                kv_cache_memory=cache_bytes(model_dir, tokens),
            )
        )
        ops = {name: get_layer_ops(torch.device("cpu"), engine.model.act, name) for name in ("eager", "cpu")}
        for batch in args.batches:
            ms = {name: [] for name in ops}
            for _ in range(args.repeats):
                for name, layer_ops in ops.items():
                    engine.model.ops = layer_ops
                    rate = conveyor_decode_rate(
                        engine, batch, args.context, args.steps, info.block_size, clock=time.process_time
                    )
                    ms[name].append(batch / rate * 1000)
            for stat in (min, statistics.median):
                eager, fused = stat(ms["eager"]), stat(ms["cpu"])
                print(
                    f"{preset:6s} batch {batch:4d} {stat.__name__:6s}: eager {eager:7.2f} ms/step   "
                    f"fused {fused:7.2f} ms/step (CPU time)   eager/fused {eager / fused:.3f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
