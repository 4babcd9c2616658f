"""Triton kernel that scatters this step's keys and values into the paged KV cache.

One program per token copies all of its kv heads; a negative slot (padding) writes nothing.
A head dim that is not a power of two (80, 96) is copied through a tile padded to one.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cb,
    stride_co,
    stride_ch,
    num_kv_heads,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr,
    HEADS_P2: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token)
    heads = tl.arange(0, HEADS_P2)
    dims = tl.arange(0, HEAD_DIM_P2)
    # A padding token (slot < 0) has no heads to copy: masked, not returned from early.
    mask = heads[:, None] < tl.where(slot >= 0, num_kv_heads, 0)
    if HEAD_DIM != HEAD_DIM_P2:
        mask = mask & (dims < HEAD_DIM)[None, :]

    src = heads[:, None] * stride_kh + dims[None, :]
    k = tl.load(key_ptr + token * stride_kt + src, mask=mask)
    src = heads[:, None] * stride_vh + dims[None, :]
    v = tl.load(value_ptr + token * stride_vt + src, mask=mask)

    # int64 before multiplying by strides: big caches overflow int32 offsets.
    block = (slot // BLOCK_SIZE).to(tl.int64)
    dst = block * stride_cb + (slot % BLOCK_SIZE) * stride_co + heads[:, None] * stride_ch + dims[None, :]
    tl.store(k_cache_ptr + dst, k, mask=mask)
    tl.store(v_cache_ptr + dst, v, mask=mask)


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write key/value [num_tokens, num_kv_heads, head_dim] into their cache slots; slot < 0 skips."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    # The kernel indexes the last dim with stride 1 and shares one set of cache strides.
    assert key.stride(2) == 1 and value.stride(2) == 1, "head_dim must be contiguous"
    assert k_cache.is_contiguous() and v_cache.is_contiguous(), "KV cache must be contiguous"
    assert k_cache.dtype == key.dtype and v_cache.dtype == value.dtype
    _store_kv_kernel[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        num_kv_heads,
        BLOCK_SIZE=k_cache.shape[1],
        HEAD_DIM=head_dim,
        HEAD_DIM_P2=triton.next_power_of_2(head_dim),
        HEADS_P2=triton.next_power_of_2(num_kv_heads),
    )
