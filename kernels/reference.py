"""Plain-torch paged-KV attention: the ground truth the Triton kernels are tested against,
and the production backend wherever Triton is not available (CPU).

Cache layout: k_cache/v_cache are [num_blocks, block_size, num_kv_heads, head_dim]; token
slot = block_id * block_size + offset. Query head h reads kv head h // (num_heads // num_kv_heads).

Sliding window (Mistral, Phi-3, Gemma 3's local layers): with window W, the query at
position p attends to keys at positions p - W + 1 .. p, the last W including itself; as
transformers' masking_utils.sliding_window_overlay (kv_idx > q_idx - W, and causal).
window None or 0: no window.
"""

import torch
import torch.nn.functional as F


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write key/value [num_tokens, num_kv_heads, head_dim] into their cache slots.

    A negative slot marks a padding token, which is skipped.
    """
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    # view (not reshape) so the write lands in the caller's cache, never in a copy.
    k_cache.view(-1, *k_cache.shape[2:])[slots] = key[keep]
    v_cache.view(-1, *v_cache.shape[2:])[slots] = value[keep]


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
    """Causal attention for a ragged batch of query chunks over the paged cache.

    Sequence i owns q rows cu_seqlens_q[i]:cu_seqlens_q[i+1]; they are its last q_len
    positions out of seq_lens[i], so a chunk sees the cached prefix plus itself (the
    last `window` positions of it, with a window).
    """
    if out is None:
        out = torch.empty_like(q)
    block_size = k_cache.shape[1]
    # One host copy of the (small) metadata instead of a sync per sequence.
    starts = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    for i, seq_len in enumerate(lens):
        q_start, q_end = starts[i], starts[i + 1]
        if q_end == q_start:
            continue
        k, v = _gather_kv(k_cache, v_cache, block_tables[i], seq_len, block_size)
        out[q_start:q_end] = _causal_attention(q[q_start:q_end], k, v, scale, window)
    return out


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
    """One query per sequence (q [num_seqs, num_heads, head_dim]) over all its seq_lens[i] keys
    (its last `window` ones, with a window).

    num_splits only tunes the Triton kernel; it is accepted here so the backends are
    interchangeable, and ignored.
    """
    del num_splits
    if out is None:
        out = torch.empty_like(q)
    if q.shape[0] == 0:
        return out
    # A continuous batch is ragged (contexts of 20 and of 1,300 tokens side by side), and
    # padding everyone to the longest would copy several times the K/V needed. Sequences
    # are grouped by the power of two of their block count: padding within a group at
    # most doubles what is gathered.
    block_size = k_cache.shape[1]
    num_blocks = (-(-seq_lens.long() // block_size)).clamp(min=1)
    buckets = torch.log2(num_blocks.float()).floor().long()
    groups = torch.unique(buckets)
    if len(groups) == 1:
        out.copy_(_decode_padded(q, k_cache, v_cache, block_tables, seq_lens, scale, window))
        return out
    for g in groups.tolist():
        idx = (buckets == g).nonzero(as_tuple=True)[0]
        out[idx] = _decode_padded(q[idx], k_cache, v_cache, block_tables[idx], seq_lens[idx], scale, window)
    return out


def _decode_padded(q, k_cache, v_cache, block_tables, seq_lens, scale, window=None) -> torch.Tensor:
    """Decode attention for sequences padded to the longest among them."""
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    num_blocks = -(-int(seq_lens.max()) // block_size)
    padded_len = num_blocks * block_size

    # Batch the sequences by padding to the longest; everything past a sequence's end is
    # masked out of the softmax. Masking alone is not enough: 0 * NaN is NaN, and a slot
    # may hold anything (a freed block's old contents). So table entries past the end,
    # which are arbitrary, read the sequence's own first block (its real, finite K/V),
    # and the few unwritten slots at the tail of its last block are zeroed.
    lens = seq_lens[:, None].long()
    pos = torch.arange(padded_len, device=q.device)[None, :]
    invalid = pos >= lens
    table = block_tables[:, :num_blocks].long()
    table = torch.where(invalid[:, ::block_size], table[:, :1], table).flatten()
    # index_select of whole blocks: one contiguous copy per block, the cheapest gather on CPU.
    k = (
        k_cache.view(k_cache.shape[0], -1)
        .index_select(0, table)
        .view(num_seqs, padded_len, num_kv_heads, head_dim)
    )
    v = (
        v_cache.view(v_cache.shape[0], -1)
        .index_select(0, table)
        .view(num_seqs, padded_len, num_kv_heads, head_dim)
    )
    last_block_end = -(-lens // block_size) * block_size
    stale = (invalid & (pos < last_block_end)).nonzero(as_tuple=True)  # < block_size per sequence
    k[stale] = 0.0  # k and v are fresh copies: zeroing them leaves the cache untouched
    v[stale] = 0.0
    mask = torch.zeros(num_seqs, 1, 1, padded_len, device=q.device)
    masked = invalid | (pos <= lens - 1 - window) if window else invalid  # the query sits at lens - 1
    mask.masked_fill_(masked[:, None, None, :], float("-inf"))

    # Query heads grouped by the kv head they share: [seqs, kv_heads, group, head_dim]
    # against [seqs, kv_heads, len, head_dim], so K/V are never copied per query head.
    qg = q.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    # In fp32 whatever the cache dtype (a no-op for fp32): this is the ground truth.
    o = F.scaled_dot_product_attention(
        qg.float(), k.transpose(1, 2).float(), v.transpose(1, 2).float(), attn_mask=mask, scale=scale
    )
    return o.reshape(num_seqs, num_heads, head_dim).to(q.dtype)


def _gather_kv(k_cache, v_cache, block_table, seq_len, block_size):
    """The first seq_len keys and values of one sequence, [seq_len, num_kv_heads, head_dim]."""
    num_blocks = -(-seq_len // block_size)
    blocks = block_table[:num_blocks].long()
    k = k_cache[blocks].flatten(0, 1)[:seq_len]
    v = v_cache[blocks].flatten(0, 1)[:seq_len]
    return k, v


def _causal_attention(q, k, v, scale, window=None):
    """q [q_len, H, D] are the last q_len of the k/v [seq_len, H_kv, D] positions."""
    q_len, num_heads, head_dim = q.shape
    seq_len, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    # Group query heads by the kv head they share instead of copying K/V per query head.
    qg = q.reshape(q_len, num_kv_heads, group, head_dim).float()
    scores = torch.einsum("qhgd,khd->hgqk", qg, k.float()) * scale
    q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
    k_pos = torch.arange(seq_len, device=q.device)
    hidden = k_pos[None, :] > q_pos[:, None]  # the future: [q_len, seq_len]
    if window:
        hidden |= k_pos[None, :] <= q_pos[:, None] - window  # before the window
    probs = scores.masked_fill(hidden, float("-inf")).softmax(dim=-1)
    o = torch.einsum("hgqk,khd->qhgd", probs, v.float())
    return o.reshape(q_len, num_heads, head_dim).to(q.dtype)
