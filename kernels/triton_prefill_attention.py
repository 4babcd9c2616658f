"""Triton flash-attention kernel for prefill chunks over the paged KV cache.

A program owns BLOCK_M query tokens of one sequence and all the query heads of one kv head
(the GQA group), so each K/V tile is loaded once per group and any head count works. A head
dim that is not a power of two (80, 96) is padded to one in registers, masked in memory.
With a sliding window a program starts at its first query's window and masks keys before
each row's window (see kernels/reference.py for the convention).
"""

import math

import torch
import triton
import triton.language as tl

# Query tokens x group heads per program: about 64 rows keeps tl.dot busy at every GQA ratio.
_ROWS = 64
_BLOCK_N = 32
# The largest head dim the tiles are sized for (Gemma's 256); past it they would outgrow
# registers and shared memory.
MAX_HEAD_DIM = 256


@triton.jit
def tile_mask(row_ok, dims, HEAD_DIM: tl.constexpr, HEAD_DIM_P2: tl.constexpr):
    """Which elements of a [rows, HEAD_DIM_P2] tile are real: rows where row_ok, and only the
    first HEAD_DIM columns. The padding columns load as zeros, which add nothing to q.k nor to
    p.v. A power-of-two head dim gets the row mask alone, as before padding existed."""
    mask = row_ok[:, None] if HEAD_DIM == HEAD_DIM_P2 else row_ok[:, None] & (dims < HEAD_DIM)[None, :]
    return mask


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    block_tables_ptr,
    cu_seqlens_q_ptr,
    seq_lens_ptr,
    scale_log2,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cb,
    stride_co,
    stride_ch,
    stride_bt,
    window,
    GROUP: tl.constexpr,
    GROUP_P2: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    tile = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    if tile * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    # The chunk is the last q_len positions: everything before it is cached prefix.
    prefix_len = seq_len - q_len

    # Row r is query token r // GROUP_P2 and head r % GROUP_P2 of this kv head's group.
    rows = tl.arange(0, BLOCK_M * GROUP_P2)
    tok = tile * BLOCK_M + rows // GROUP_P2
    head = kv_head * GROUP + rows % GROUP_P2
    row_ok = (tok < q_len) & (rows % GROUP_P2 < GROUP)
    q_pos = prefix_len + tok
    dims = tl.arange(0, HEAD_DIM_P2)
    q_mask = tile_mask(row_ok, dims, HEAD_DIM, HEAD_DIM_P2)

    q_off = (q_start + tok).to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :]
    q = tl.load(q_ptr + q_off, mask=q_mask, other=0.0)

    # Running max starts finite, so a row that has seen only masked keys gets
    # exp2(-inf) = 0 rather than (-inf) - (-inf) = NaN.
    m = tl.full([BLOCK_M * GROUP_P2], -1.0e30, dtype=tl.float32)
    l = tl.zeros([BLOCK_M * GROUP_P2], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M * GROUP_P2, HEAD_DIM_P2], dtype=tl.float32)

    # Keys past this tile's last query are in every row's future: stop there. With a window,
    # keys before its first query's window are before every row's: start there, and mask
    # keys at or below each row's q_pos - window.
    kv_end = tl.minimum(seq_len, prefix_len + (tile + 1) * BLOCK_M)
    kv_start = tl.where(window > 0, tl.maximum(prefix_len + tile * BLOCK_M - window + 1, 0), 0)
    below = tl.where(window > 0, q_pos - window, -1)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for start in range(kv_start, kv_end, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        pos_ok = pos < kv_end
        block = tl.load(table + pos // BLOCK_SIZE, mask=pos_ok, other=0).to(tl.int64)
        kv_off = block * stride_cb + (pos % BLOCK_SIZE) * stride_co + kv_head * stride_ch
        kv_off = kv_off[:, None] + dims[None, :]
        kv_mask = tile_mask(pos_ok, dims, HEAD_DIM, HEAD_DIM_P2)
        k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0)

        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        s = tl.where((pos[None, :] <= q_pos[:, None]) & (pos[None, :] > below[:, None]), s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new

    out = acc / l[:, None]
    o_off = (q_start + tok).to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :]
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=q_mask)


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's last q_len positions over its paged context (the
    last `window` positions of it, with a window)."""
    if out is None:
        out = torch.empty_like(q)
    total_q, num_heads, head_dim = q.shape
    num_seqs = seq_lens.shape[0]
    num_kv_heads = k_cache.shape[2]
    if total_q == 0 or num_seqs == 0:
        return out
    check_attention_args("prefill", q, out, k_cache, v_cache)
    group = num_heads // num_kv_heads
    group_p2 = triton.next_power_of_2(group)
    head_dim_p2 = padded_head_dim(head_dim)
    # Fewer rows past head dim 128 keep the fp32 accumulator [rows, head_dim] the size it is
    # at 128. A group wider than the rows takes one token per program: its heads alone are
    # rows enough for tl.dot (16), and more tokens would only spill registers.
    rows = _ROWS * 128 // max(128, head_dim_p2)
    block_m = max(1, rows // group_p2)
    # One host sync for the grid; the engine could pass it in if it ever matters.
    max_q_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    grid = (num_seqs, num_kv_heads, triton.cdiv(max_q_len, block_m))
    _prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        block_tables,
        cu_seqlens_q,
        seq_lens,
        scale * math.log2(math.e),
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        window or 0,
        GROUP=group,
        GROUP_P2=group_p2,
        BLOCK_SIZE=k_cache.shape[1],
        HEAD_DIM=head_dim,
        HEAD_DIM_P2=head_dim_p2,
        BLOCK_M=block_m,
        BLOCK_N=kv_tile_tokens(head_dim_p2, q.dtype),
        DOT_PRECISION=dot_precision(q.dtype),
    )
    return out


def check_attention_args(op: str, q, out, k_cache, v_cache) -> None:
    """What both attention kernels assume about their arguments; `op` names the caller in errors."""
    num_heads, head_dim = q.shape[1:]
    num_kv_heads = k_cache.shape[2]
    # A model's shape, not a bug here: say which shape, rather than run it wrong.
    if num_heads % num_kv_heads != 0:
        raise ValueError(
            f"triton {op} attention: {num_heads} query heads do not split evenly over {num_kv_heads} kv heads"
        )
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(
            f"triton {op} attention: head_dim {head_dim} is above {MAX_HEAD_DIM}, "
            f"the largest its tiles are sized for"
        )
    assert k_cache.shape[3] == head_dim, "q and the KV cache must share head_dim"
    assert q.stride(2) == 1 and out.stride(2) == 1, "head_dim must be contiguous"
    assert k_cache.is_contiguous() and v_cache.is_contiguous(), "KV cache must be contiguous"
    assert out.shape == q.shape and out.dtype == q.dtype


def padded_head_dim(head_dim: int) -> int:
    """tl.arange spans a power of two, and tl.dot needs at least 16 along the reduced dim."""
    return max(16, triton.next_power_of_2(head_dim))


def kv_tile_tokens(head_dim_p2: int, dtype: torch.dtype) -> int:
    """Keys per K/V tile: _BLOCK_N, halved where a key row passes 512 bytes (fp32 at head dim
    256), so the tiles the compiler pipelines through shared memory stay the size they are
    at head dim 128 in fp32."""
    row_bytes = head_dim_p2 * dtype.itemsize
    return _BLOCK_N if row_bytes <= 512 else _BLOCK_N // 2


def dot_precision(dtype: torch.dtype) -> str | None:
    """fp32 must stay fp32 through tl.dot (tf32 would miss the 1e-4 the tests ask for);
    half-precision inputs take the backend's tensor-core default."""
    return "ieee" if dtype == torch.float32 else None
