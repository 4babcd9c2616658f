"""Triton split-KV (flash-decoding) attention for one query token per sequence.

Pass 1 splits each context into num_splits partitions, one program per (sequence, kv head,
partition), each leaving a normalised partial output and its log-sum-exp; pass 2 merges them.
Splitting keeps the GPU busy when the batch is small but the contexts are long. With a
sliding window the partitions split only the window's keys (see kernels/reference.py).
"""

import functools
import math

import torch
import triton
import triton.language as tl

from kernels.triton_prefill_attention import (
    check_attention_args,
    dot_precision,
    kv_tile_tokens,
    padded_head_dim,
    tile_mask,
)

# A split shorter than this costs more to merge than it saves.
_MIN_SPLIT_TOKENS = 256
_MAX_SPLITS = 64


@triton.jit
def _decode_partial_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    part_out_ptr,
    part_lse_ptr,
    scale_log2,
    stride_qs,
    stride_qh,
    stride_cb,
    stride_co,
    stride_ch,
    stride_bt,
    num_heads,
    num_splits,
    window,
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    # The window's first key (the query sits at seq_len - 1); keys before it are never read.
    first = tl.where(window > 0, tl.maximum(seq_len - window, 0), 0)
    # Partitions are whole tiles; with more splits than tiles the last ones are empty.
    part_len = tl.cdiv(tl.cdiv(seq_len - first, num_splits), BLOCK_N) * BLOCK_N
    start = first + split * part_len
    end = tl.minimum(start + part_len, seq_len)

    # Row r is query head r of this kv head's group, padded to BLOCK_H (>= 16 for tl.dot).
    rows = tl.arange(0, BLOCK_H)
    head = kv_head * GROUP + rows
    row_ok = rows < GROUP
    dims = tl.arange(0, HEAD_DIM_P2)
    q_off = seq.to(tl.int64) * stride_qs + head[:, None] * stride_qh + dims[None, :]
    q = tl.load(q_ptr + q_off, mask=tile_mask(row_ok, dims, HEAD_DIM, HEAD_DIM_P2), other=0.0)

    # Finite start so an empty split never computes (-inf) - (-inf).
    m = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)
    l = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM_P2], dtype=tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for tile_start in range(start, end, BLOCK_N):
        pos = tile_start + tl.arange(0, BLOCK_N)
        pos_ok = pos < end
        block = tl.load(table + pos // BLOCK_SIZE, mask=pos_ok, other=0).to(tl.int64)
        kv_off = block * stride_cb + (pos % BLOCK_SIZE) * stride_co + kv_head * stride_ch
        kv_off = kv_off[:, None] + dims[None, :]
        kv_mask = tile_mask(pos_ok, dims, HEAD_DIM, HEAD_DIM_P2)
        k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0)

        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        s = tl.where(pos_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new

    # An empty split reports lse = -inf, which gives it zero weight in the merge.
    nonempty = l > 0
    safe_l = tl.where(nonempty, l, 1.0)
    lse = tl.where(nonempty, m + tl.log2(safe_l), float("-inf"))
    out = acc / safe_l[:, None]
    # Partials are [num_seqs, num_heads, num_splits(, HEAD_DIM_P2)], contiguous fp32: padded,
    # so they are written and read whole (the padding columns hold zeros).
    part = (seq.to(tl.int64) * num_heads + head) * num_splits + split
    tl.store(part_lse_ptr + part, lse, mask=row_ok)
    tl.store(part_out_ptr + part[:, None] * HEAD_DIM_P2 + dims[None, :], out, mask=row_ok[:, None])


@triton.jit
def _decode_merge_kernel(
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    stride_os,
    stride_oh,
    num_heads,
    num_splits,
    SPLITS_P2: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_P2)
    dims = tl.arange(0, HEAD_DIM_P2)
    split_ok = splits < num_splits
    part = (seq.to(tl.int64) * num_heads + head) * num_splits + splits
    lse = tl.load(part_lse_ptr + part, mask=split_ok, other=float("-inf"))
    part_off = part[:, None] * HEAD_DIM_P2 + dims[None, :]
    part_out = tl.load(part_out_ptr + part_off, mask=split_ok[:, None], other=0.0)
    # Each split's softmax was normalised by its own sum; reweight by its share of the total.
    weight = tl.exp2(lse - tl.max(lse, axis=0))
    out = tl.sum(weight[:, None] * part_out, axis=0) / tl.sum(weight, axis=0)
    o_off = seq.to(tl.int64) * stride_os + head * stride_oh + dims
    if HEAD_DIM == HEAD_DIM_P2:
        tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty))
    else:
        tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Attention of q [num_seqs, num_heads, head_dim] (position seq_lens[i]-1) over all its keys,
    or its last `window` ones.

    num_splits: partitions per context; None picks one from the batch and context length
    (at the cost of one host sync to read the longest context).
    """
    if out is None:
        out = torch.empty_like(q)
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    if num_seqs == 0:
        return out
    check_attention_args("decode", q, out, k_cache, v_cache)
    if num_splits is None:
        num_splits = default_num_splits(num_seqs, num_kv_heads, int(seq_lens.max()), q.device)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    head_dim_p2 = padded_head_dim(head_dim)
    part_out, part_lse = _split_attention(
        q, k_cache, v_cache, block_tables, seq_lens, scale, num_splits, window, head_dim_p2
    )
    _decode_merge_kernel[(num_seqs, num_heads)](
        part_out,
        part_lse,
        out,
        out.stride(0),
        out.stride(1),
        num_heads,
        num_splits,
        SPLITS_P2=triton.next_power_of_2(num_splits),
        HEAD_DIM=head_dim,
        HEAD_DIM_P2=head_dim_p2,
    )
    return out


def _split_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int,
    window: int | None,
    head_dim_p2: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 1: each partition's normalised output [seqs, heads, splits, head_dim_p2] and its
    log-sum-exp (base 2) [seqs, heads, splits], for pass 2 to merge."""
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    part_out = torch.empty(num_seqs, num_heads, num_splits, head_dim_p2, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
    _decode_partial_kernel[(num_seqs, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        part_out,
        part_lse,
        scale * math.log2(math.e),
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        num_heads,
        num_splits,
        window or 0,
        GROUP=group,
        BLOCK_H=max(16, triton.next_power_of_2(group)),
        BLOCK_SIZE=k_cache.shape[1],
        HEAD_DIM=head_dim,
        HEAD_DIM_P2=head_dim_p2,
        BLOCK_N=kv_tile_tokens(head_dim_p2, q.dtype),
        DOT_PRECISION=dot_precision(q.dtype),
    )
    return part_out, part_lse


def default_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, device: torch.device) -> int:
    """Enough partitions to give the GPU about two programs per SM, none shorter than _MIN_SPLIT_TOKENS."""
    wanted = triton.cdiv(2 * _num_sms(device), num_seqs * num_kv_heads)
    return max(1, min(wanted, triton.cdiv(max_seq_len, _MIN_SPLIT_TOKENS), _MAX_SPLITS))


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: few programs, it runs them one by one anyway
