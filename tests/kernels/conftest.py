"""Shared setup for the kernel tests: Triton's interpreter where there is no GPU, and a
builder of random paged-cache batches laid out the way the engine lays them out.
"""

import os
import zlib
from dataclasses import dataclass

import pytest
import torch

# Must precede the first import of a Triton kernel module: triton reads it at decoration.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@dataclass
class PagedBatch:
    q: torch.Tensor  # [total_q_tokens, num_heads, head_dim]
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks_per_seq]
    cu_seqlens_q: torch.Tensor  # int32 [num_seqs + 1]
    seq_lens: torch.Tensor  # int32 [num_seqs]
    scale: float


def make_paged_batch(
    q_lens: list[int],
    seq_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> PagedBatch:
    """Random q and a cache holding each sequence's seq_lens[i] keys in shuffled blocks.

    Everything a kernel must not read is NaN: slots past a sequence's end in its last block,
    and the block that table entries past a sequence's end point at. Reading any of it
    would turn the output NaN.
    """
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 1
    poison_block = num_blocks - 1
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, dtype=dtype, device=device)
    v_cache = torch.randn(shape, dtype=dtype, device=device)

    # Spare columns so every sequence has table entries past its end.
    block_tables = torch.full((len(seq_lens), max(blocks_per_seq) + 2), poison_block, dtype=torch.int32)
    order = torch.randperm(num_blocks - 1).tolist()
    for i, (n_blocks, seq_len) in enumerate(zip(blocks_per_seq, seq_lens)):
        ids, order = order[:n_blocks], order[n_blocks:]
        block_tables[i, :n_blocks] = torch.tensor(ids, dtype=torch.int32)
        tail = seq_len - (n_blocks - 1) * block_size
        for cache in (k_cache, v_cache):
            cache[ids[-1], tail:] = float("nan")
    for cache in (k_cache, v_cache):
        cache[poison_block] = float("nan")

    cu = torch.tensor([0] + q_lens, dtype=torch.int64).cumsum(0).to(torch.int32)
    q = torch.randn(sum(q_lens), num_heads, head_dim, dtype=dtype, device=device)
    return PagedBatch(
        q=q,
        k_cache=k_cache,
        v_cache=v_cache,
        block_tables=block_tables.to(device),
        cu_seqlens_q=cu.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        scale=head_dim**-0.5,
    )


@pytest.fixture
def paged_batch():
    return make_paged_batch


def at_thread_counts(fn, counts=(1, 2)) -> list:
    """fn() run once with torch at each of `counts` threads; the caller's count is restored."""
    threads = torch.get_num_threads()
    try:
        results = []
        for n in counts:
            torch.set_num_threads(n)
            results.append(fn())
        return results
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def at_threads():
    return at_thread_counts


@pytest.fixture(autouse=True)
def seed_per_case(request):
    """Fresh, reproducible random inputs for every parametrisation."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


# Every GQA group real models use (SmolLM2 and Llama-3.2-3B 3, Qwen2.5-1.5B 6, -0.5B and -7B 7)
# and then some, at the head dims of real models (Phi-2 80, Gemma 3 256): the CPU kernels'
# tests run each, over two kv heads so that a group's heads must be found at the right one.
GROUPS = [1, 2, 3, 4, 5, 6, 7, 8, 16]
SERVED_HEAD_DIMS = [64, 80, 96, 128, 256]
