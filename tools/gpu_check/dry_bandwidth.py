"""The dry run's stand-in for bench/decode_attention_bandwidth.py: the same measure() on
tiny shapes under TRITON_INTERPRET=1, against a CPU copy, written as the same JSON. Its
figures mean nothing; what it checks is the plumbing (inputs, kernel call, reference
check, the result file the GPU check reads)."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from bench import decode_attention_bandwidth as bw

SHAPES = ((2, 40), (3, 17))  # (batch, context): several tiles, one partial block
COPY_BYTES = 1 << 24


def do_bench(fn, return_mode: str = "median", repeats: int = 3) -> float:
    """triton.testing.do_bench's contract (milliseconds, median), by the host clock."""
    assert return_mode == "median"
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    bw.DTYPE = torch.float32  # the interpreter's bf16 arithmetic is wrong
    src = torch.empty(COPY_BYTES, dtype=torch.uint8)
    dst = torch.empty_like(src)
    copy_bw = 2 * COPY_BYTES / (do_bench(lambda: dst.copy_(src)) * 1e-3)
    rows = [bw.measure(b, c, do_bench, device="cpu") for b, c in SHAPES]
    for row in rows:
        row["fraction_of_copy"] = row["bandwidth_gbs"] * 1e9 / copy_bw
    args.out.write_text(
        json.dumps(
            dict(
                device="cpu (TRITON_INTERPRET=1)",
                dtype=str(bw.DTYPE),
                num_heads=bw.NUM_HEADS,
                num_kv_heads=bw.NUM_KV_HEADS,
                head_dim=bw.HEAD_DIM,
                block_size=bw.BLOCK_SIZE,
                copy_bandwidth_gbs=copy_bw / 1e9,
                rows=rows,
            ),
            indent=2,
        )
    )
    print(f"{len(rows)} shapes measured, each checked against the reference")


if __name__ == "__main__":
    main()
