"""Per-call CPU paged prefill attention: Conveyor's C++ kernel (kernels/cpu.py) against the
plain-torch reference on the prefill batches of the `mixed` workload, one thread; and the
C++ store_kv against the reference's at a step's token counts.

    python -m bench.prefill_attention_cpu [--rounds 5] [--block-size 16]

Rounds alternate kernel, reference, kernel, ... and the figures are medians over rounds; the
ratio is the median of each round's own reference / kernel. GFLOP/s counts only the causal
half (the q·k and p·v products a query row really needs), the same figure for both.
"""

from __future__ import annotations

import argparse
import functools
import platform
import random
import statistics

import torch

from bench.decode_attention_cpu import HEAD_DIM, NUM_HEADS, NUM_KV_HEADS, logical_inputs, time_per_call

CHUNK_BUDGET = 512  # the scheduler's default tokens per step


def packed_prompts(seed: int) -> list[tuple[int, int]]:
    """Whole prompts of 16-256 tokens (the `mixed` workload) packed into one step's budget."""
    rng, chunks, total = random.Random(seed), [], 0
    while total < CHUNK_BUDGET:
        n = min(rng.randint(16, 256), CHUNK_BUDGET - total)  # the last one is cut: its first chunk
        chunks.append((n, n))
        total += n
    return chunks


# name -> [(q_len, seq_len)]: the chunk is the last q_len of seq_len positions.
CASES = {
    "prompt 16": [(16, 16)],
    "prompt 64": [(64, 64)],
    "prompt 256": [(256, 256)],
    "prompts 16-256 packed to 512 (a)": packed_prompts(1),
    "prompts 16-256 packed to 512 (b)": packed_prompts(2),
    "chunk 512, no prefix": [(512, 512)],
    "chunk 512 after 512 cached": [(512, 1024)],
    "chunk 200 after 56 cached + 3 prompts": [(200, 256), (100, 100), (150, 150), (62, 62)],
    "tail chunks 37/90 after 512/300 cached": [(37, 549), (90, 390)],
}


STORE_TOKENS = (1, 32, 96, 512)  # a decode step of 1 and of 32 sequences, mixed steps


def store_inputs(num_tokens: int) -> tuple:
    """The engine's k (its own tensor) and v (a view of the fused projection), slots scattered,
    one padding."""
    k_cache = torch.zeros(2048, 16, NUM_KV_HEADS, HEAD_DIM)
    qkv = torch.randn(num_tokens, (NUM_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM)
    k, v = (
        qkv[:, NUM_HEADS * HEAD_DIM :].view(num_tokens, 2 * NUM_KV_HEADS, HEAD_DIM).split(NUM_KV_HEADS, dim=1)
    )
    slots = torch.randperm(k_cache.shape[0] * 16)[:num_tokens]
    slots[0] = -1
    return k.contiguous(), v, k_cache, torch.zeros_like(k_cache), slots


def inputs(chunks: list[tuple[int, int]], block_size: int) -> tuple:
    x = logical_inputs([n for _, n in chunks], block_size)
    q_lens = [q for q, _ in chunks]
    cu = torch.tensor([0] + q_lens).cumsum(0).int()
    q = torch.randn(sum(q_lens), NUM_HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(sum(q_lens)))
    return q, x["k"], x["v"], x["block_tables"], cu, x["seq_lens"], x["scale"]


def causal_gflop(chunks: list[tuple[int, int]]) -> float:
    pairs = sum(q * (n - q) + q * (q + 1) // 2 for q, n in chunks)  # keys seen, summed over query rows
    return 4 * pairs * NUM_HEADS * HEAD_DIM / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--block-size", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from kernels import cpu, reference

    cpu.load()
    sides = {"kernel": cpu.prefill_attention, "reference": reference.prefill_attention}
    times = {(name, side): [] for name in CASES for side in sides}
    store = {(n, side): [] for n in STORE_TOKENS for side in sides}
    for i in range(args.rounds):
        for n in STORE_TOKENS:
            x = store_inputs(n)
            for side, fn in {"kernel": cpu.store_kv, "reference": reference.store_kv}.items():
                store[n, side].append(time_per_call(functools.partial(fn, *x)))
        for name, chunks in CASES.items():
            x = inputs(chunks, args.block_size)
            out = {side: torch.empty_like(x[0]) for side in sides}
            for side, fn in sides.items():
                times[name, side].append(time_per_call(functools.partial(fn, *x, out=out[side])))
            torch.testing.assert_close(out["kernel"], out["reference"], atol=1e-5, rtol=1e-4)
        print(f"round {i + 1}/{args.rounds} done", flush=True)

    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread, "
        f"{NUM_HEADS} heads / {NUM_KV_HEADS} kv heads / head_dim {HEAD_DIM}, fp32, block {args.block_size}, "
        f"medians of {args.rounds} rounds"
    )
    print(
        "| batch (q_len/seq_len) | kernel ms | reference ms | reference / kernel | kernel GFLOP/s "
        "| reference GFLOP/s |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    ratios = []
    for name, chunks in CASES.items():
        k, r = (statistics.median(times[name, side]) for side in sides)
        ratio = statistics.median(b / a for a, b in zip(times[name, "kernel"], times[name, "reference"]))
        ratios.append(ratio)
        gf = causal_gflop(chunks)
        print(
            f"| {name}: {' '.join(f'{q}/{n}' for q, n in chunks)} | {1e3 * k:.3f} | {1e3 * r:.3f} | "
            f"{ratio:.2f} | {gf / k:.1f} | {gf / r:.1f} |"
        )
    print(f"geometric mean of reference / kernel: {statistics.geometric_mean(ratios):.2f}")
    print("\n| store_kv tokens | C++ us | reference us | reference / C++ |\n|---:|---:|---:|---:|")
    for n in STORE_TOKENS:
        k, r = (statistics.median(store[n, side]) for side in sides)
        print(f"| {n} | {1e6 * k:.1f} | {1e6 * r:.1f} | {r / k:.1f} |")


if __name__ == "__main__":
    main()
