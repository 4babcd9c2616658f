"""The CPU attention backend: C++ paged decode and prefill kernels (kernels/csrc/*_attention.cpp)
that read K/V in place from the cache blocks, and the cache writer (store_kv.cpp), built on first
use with torch's JIT extension loader and cached in the torch extensions dir (~/.cache/torch_extensions).
"""

import functools
from pathlib import Path

import torch
from torch import Tensor

from kernels import reference
from kernels.cpu_build import build

CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / "decode_attention.cpp", CSRC / "prefill_attention.cpp", CSRC / "store_kv.cpp"]
# The head dims the kernels are compiled for (CONVEYOR_HEAD_DIMS in csrc/softmax_math.h); any
# GQA group is served. Other shapes go to the reference, and unserved() says so at start-up.
HEAD_DIMS, MAX_BLOCK_SIZE = (32, 64, 80, 96, 112, 128, 160, 192, 256), 128


@functools.cache
def load() -> torch._ops.OpOverload:
    """Build or load the attention extension (decode, prefill, store_kv) and return its decode op."""
    build("conveyor_cpu_attention", SOURCES)
    return torch.ops.conveyor_cpu.decode_attention.default


def unserved(head_dim: int, block_size: int = MAX_BLOCK_SIZE) -> str | None:
    """Why the kernels cannot serve this shape (the reference then does), or None."""
    if head_dim not in HEAD_DIMS:
        return f"head_dim {head_dim} has no compiled kernel (compiled: {', '.join(map(str, HEAD_DIMS))})"
    if block_size > MAX_BLOCK_SIZE:
        return f"block_size {block_size} exceeds the kernels' {MAX_BLOCK_SIZE}"
    return None


def _compiled_for(q: Tensor, k_cache: Tensor) -> bool:
    _, block_size, _, head_dim = k_cache.shape
    return head_dim in HEAD_DIMS and block_size <= MAX_BLOCK_SIZE


def decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    scale: float,
    out: Tensor | None = None,
    num_splits: int | None = None,
    window: int | None = None,
) -> Tensor:
    """Same contract as kernels.reference.decode_attention; num_splits (a Triton knob) is ignored."""
    out = torch.empty_like(q, memory_format=torch.contiguous_format) if out is None else out
    if q.shape[0] == 0:
        return out
    if not _compiled_for(q, k_cache):
        return reference.decode_attention(
            q, k_cache, v_cache, block_tables, seq_lens, scale, out, window=window
        )
    # The kernel walks rows by stride but needs head_dim contiguous and int32 metadata;
    # the engine already passes exactly that, so these are no-ops on the serving path.
    if q.stride(-1) != 1:
        q = q.contiguous()
    load()(q, k_cache, v_cache, block_tables.int(), seq_lens.int(), scale, window or 0, out)
    return out


def store_kv(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """Same contract as kernels.reference.store_kv."""
    load()
    # The kernel copies each token's row whole; the engine's k and v already are such rows.
    key, value = (
        x if x.stride(-1) == 1 and x.stride(-2) == x.shape[-1] else x.contiguous() for x in (key, value)
    )
    torch.ops.conveyor_cpu.store_kv(key, value, k_cache, v_cache, slot_mapping.long())


def prefill_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    cu_seqlens_q: Tensor,
    seq_lens: Tensor,
    scale: float,
    out: Tensor | None = None,
    window: int | None = None,
) -> Tensor:
    """Same contract as kernels.reference.prefill_attention."""
    out = torch.empty_like(q, memory_format=torch.contiguous_format) if out is None else out
    if q.shape[0] == 0:
        return out
    if not _compiled_for(q, k_cache):
        return reference.prefill_attention(
            q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale, out, window=window
        )
    if q.stride(-1) != 1:
        q = q.contiguous()
    load()
    torch.ops.conveyor_cpu.prefill_attention(
        q, k_cache, v_cache, block_tables.int(), cu_seqlens_q.int(), seq_lens.int(), scale, window or 0, out
    )
    return out


if (
    __name__ == "__main__"
):  # `python -m kernels.cpu`: build now (make does, after install), not at first start
    from kernels import cpu_elementwise

    load()
    cpu_elementwise.load()
    print(f"cpu kernels built: {torch.ops.conveyor_cpu.decode_attention}, {cpu_elementwise.OPS}")
