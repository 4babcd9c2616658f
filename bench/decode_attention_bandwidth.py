"""How close the Triton split-KV decode kernel gets to the GPU's memory bandwidth.

Decode attention is memory-bound, so the figure of merit is bytes moved per second, set
against a device-to-device copy measured in the same run. CUDA only.

    python -m bench.decode_attention_bandwidth --out bench/results/decode_bw.json
"""

import argparse
import json
import os
import sys

import torch

# The gpu-0.5b model: 14 query heads share 2 kv heads (groups of 7, not a power of two).
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 14, 2, 64, 16
DTYPE = torch.bfloat16
BATCHES = (64, 256)
CONTEXTS = (512, 2048, 8192)
COPY_BYTES = 1 << 30


def copy_bandwidth(do_bench) -> float:
    """Bytes read plus written per second by a plain device-to-device copy."""
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * COPY_BYTES / (ms * 1e-3)


def make_inputs(batch: int, context: int, device: str = "cuda") -> dict:
    """A full cache for `batch` sequences of `context` tokens, blocks shuffled as after churn."""
    blocks_per_seq = -(-context // BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    block_tables = torch.randperm(num_blocks, device=device).view(batch, blocks_per_seq).int()
    return dict(
        q=torch.randn(batch, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device=device),
        k_cache=torch.randn(shape, dtype=DTYPE, device=device),
        v_cache=torch.randn(shape, dtype=DTYPE, device=device),
        block_tables=block_tables,
        seq_lens=torch.full((batch,), context, dtype=torch.int32, device=device),
        scale=HEAD_DIM**-0.5,
    )


def bytes_moved(batch: int, context: int) -> int:
    """The kernel's unavoidable traffic: every K and V read once, q read, out written."""
    elem = torch.finfo(DTYPE).bits // 8
    kv = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * elem
    q_and_out = 2 * batch * NUM_HEADS * HEAD_DIM * elem
    return kv + q_and_out


def measure(batch: int, context: int, do_bench, device: str = "cuda") -> dict:
    from kernels import reference
    from kernels.triton_decode_attention import decode_attention, default_num_splits

    inputs = make_inputs(batch, context, device)
    out = torch.empty_like(inputs["q"])
    num_splits = default_num_splits(batch, NUM_KV_HEADS, context, out.device)

    def run():
        decode_attention(**inputs, out=out, num_splits=num_splits)

    run()
    if batch * context <= 64 * 2048:  # the reference is too slow for the big shapes
        torch.testing.assert_close(out, reference.decode_attention(**inputs), rtol=2e-2, atol=2e-2)
    ms = do_bench(run, return_mode="median")
    return dict(
        batch=batch,
        context=context,
        num_splits=num_splits,
        time_us=ms * 1e3,
        bandwidth_gbs=bytes_moved(batch, context) / (ms * 1e-3) / 1e9,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the results as JSON to this path")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit(
            "decode_attention_bandwidth: needs a CUDA GPU (bandwidth under the CPU interpreter means nothing)"
        )
    from triton.testing import do_bench

    copy_bw = copy_bandwidth(do_bench)
    rows = [measure(b, c, do_bench) for b in BATCHES for c in CONTEXTS]
    for row in rows:
        row["fraction_of_copy"] = row["bandwidth_gbs"] * 1e9 / copy_bw

    print(f"{torch.cuda.get_device_name()}: copy bandwidth {copy_bw / 1e9:.0f} GB/s (read + write)\n")
    print("| batch | context | splits | time (us) | GB/s | of copy |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['batch']} | {r['context']} | {r['num_splits']} | {r['time_us']:.1f} "
            f"| {r['bandwidth_gbs']:.0f} | {r['fraction_of_copy']:.0%} |"
        )
    if args.out:
        result = dict(
            device=torch.cuda.get_device_name(),
            dtype=str(DTYPE),
            num_heads=NUM_HEADS,
            num_kv_heads=NUM_KV_HEADS,
            head_dim=HEAD_DIM,
            block_size=BLOCK_SIZE,
            copy_bandwidth_gbs=copy_bw / 1e9,
            rows=rows,
        )
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
