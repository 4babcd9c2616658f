"""The torch reference backend against a deliberately naive attention: keys gathered one
token at a time through the block table, one head at a time, with an explicit causal (and
sliding-window) mask.
"""

import pytest
import torch

from kernels import reference

# (q_lens, seq_lens): a lone token, a chunk after a cached prefix, a whole prompt, a
# one-token chunk after a long prefix; lengths deliberately off block boundaries.
RAGGED = ([1, 17, 40, 1, 5], [1, 50, 40, 70, 37])
GQA = [(2, 2), (4, 2), (8, 2)]  # (num_heads, num_kv_heads): ratios 1, 2, 4


def naive_attention(q, k_cache, v_cache, block_table, seq_len, scale, window=None):
    """q [q_len, num_heads, head_dim] are the last q_len positions of one sequence; with a
    window W, position p sees keys p - W + 1 .. p (transformers' sliding_window_overlay)."""
    q_len, num_heads, _ = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    keys, values = [], []
    for pos in range(seq_len):
        block = int(block_table[pos // block_size])
        keys.append(k_cache[block, pos % block_size])
        values.append(v_cache[block, pos % block_size])
    k = torch.stack(keys).double()  # [seq_len, num_kv_heads, head_dim]
    v = torch.stack(values).double()

    mask = torch.zeros(q_len, seq_len, dtype=torch.bool)
    for j in range(q_len):
        position = seq_len - q_len + j
        mask[j, max(0, position + 1 - window) if window else 0 : position + 1] = True

    out = torch.empty(q.shape, dtype=torch.float64)
    for h in range(num_heads):
        kv_head = h // group
        scores = q[:, h].double() @ k[:, kv_head].T * scale
        scores[~mask] = float("-inf")
        out[:, h] = torch.softmax(scores, dim=-1) @ v[:, kv_head]
    return out


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("num_heads,num_kv_heads", GQA)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_prefill_matches_naive(paged_batch, block_size, num_heads, num_kv_heads, head_dim):
    q_lens, seq_lens = RAGGED
    b = paged_batch(q_lens, seq_lens, num_heads, num_kv_heads, head_dim, block_size)
    args = (b.q, b.k_cache, b.v_cache, b.block_tables, b.cu_seqlens_q, b.seq_lens, b.scale)
    out = reference.prefill_attention(*args)

    starts = b.cu_seqlens_q.tolist()
    for i, seq_len in enumerate(seq_lens):
        rows = slice(starts[i], starts[i + 1])
        expected = naive_attention(b.q[rows], b.k_cache, b.v_cache, b.block_tables[i], seq_len, b.scale)
        torch.testing.assert_close(out[rows].double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("num_heads,num_kv_heads", GQA)
def test_decode_matches_naive(paged_batch, block_size, num_heads, num_kv_heads):
    seq_lens = [1, 16, 33, 70]
    b = paged_batch([1] * len(seq_lens), seq_lens, num_heads, num_kv_heads, 64, block_size)
    out = reference.decode_attention(b.q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens, b.scale)

    for i, seq_len in enumerate(seq_lens):
        expected = naive_attention(b.q[i : i + 1], b.k_cache, b.v_cache, b.block_tables[i], seq_len, b.scale)
        torch.testing.assert_close(out[i : i + 1].double(), expected, rtol=1e-4, atol=1e-5)


def test_out_argument_is_filled_and_returned(paged_batch):
    b = paged_batch([3, 1], [3, 9], 4, 2, 64, 16)
    out = torch.full_like(b.q, float("nan"))
    args = (b.q, b.k_cache, b.v_cache, b.block_tables, b.cu_seqlens_q, b.seq_lens, b.scale)
    got = reference.prefill_attention(*args, out=out)
    assert got is out and out.isfinite().all()

    q = b.q[:2]
    out = torch.full_like(q, float("nan"))
    got = reference.decode_attention(q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens, b.scale, out=out)
    assert got is out and out.isfinite().all()


@pytest.mark.parametrize("block_size", [16, 32])
def test_store_kv_writes_slots_and_skips_padding(block_size):
    num_blocks, num_kv_heads, head_dim, num_tokens = 4, 2, 64, 10
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"))
    v_cache = torch.full(shape, float("nan"))
    key = torch.randn(num_tokens, num_kv_heads, head_dim)
    value = torch.randn(num_tokens, num_kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size)[:num_tokens]
    slots[[2, 7]] = -1  # padding

    reference.store_kv(key, value, k_cache, v_cache, slots)

    flat_k = k_cache.view(-1, num_kv_heads, head_dim)
    flat_v = v_cache.view(-1, num_kv_heads, head_dim)
    for token, slot in enumerate(slots.tolist()):
        if slot >= 0:
            assert torch.equal(flat_k[slot], key[token]) and torch.equal(flat_v[slot], value[token])
    written = slots[slots >= 0]
    untouched = torch.ones(len(flat_k), dtype=torch.bool)
    untouched[written] = False
    assert flat_k[untouched].isnan().all() and flat_v[untouched].isnan().all()
    assert untouched.sum() == len(flat_k) - (num_tokens - 2)


# Windows shorter than every context, not a multiple of the block size, one token (a query
# sees only itself), exactly a context's length, and longer than all of them.
WINDOWS = [1, 7, 16, 37, 70, 1000]


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (6, 2)])
def test_prefill_with_a_window_matches_naive(paged_batch, window, num_heads, num_kv_heads):
    q_lens, seq_lens = RAGGED
    b = paged_batch(q_lens, seq_lens, num_heads, num_kv_heads, 64, 16)
    out = reference.prefill_attention(
        b.q, b.k_cache, b.v_cache, b.block_tables, b.cu_seqlens_q, b.seq_lens, b.scale, window=window
    )
    starts = b.cu_seqlens_q.tolist()
    for i, seq_len in enumerate(seq_lens):
        rows = slice(starts[i], starts[i + 1])
        expected = naive_attention(
            b.q[rows], b.k_cache, b.v_cache, b.block_tables[i], seq_len, b.scale, window
        )
        torch.testing.assert_close(out[rows].double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (6, 2)])
def test_decode_with_a_window_matches_naive(paged_batch, window, num_heads, num_kv_heads):
    seq_lens = [1, 16, 33, 70, 300]  # two length groups: the padded batches are masked per sequence
    b = paged_batch([1] * len(seq_lens), seq_lens, num_heads, num_kv_heads, 64, 16)
    out = reference.decode_attention(
        b.q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens, b.scale, window=window
    )
    for i, seq_len in enumerate(seq_lens):
        expected = naive_attention(
            b.q[i : i + 1], b.k_cache, b.v_cache, b.block_tables[i], seq_len, b.scale, window
        )
        torch.testing.assert_close(out[i : i + 1].double(), expected, rtol=1e-4, atol=1e-5)


def test_no_window_is_none_or_zero(paged_batch):
    b = paged_batch([1, 1], [40, 9], 4, 2, 64, 16)
    args = (b.q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens, b.scale)
    full = reference.decode_attention(*args)
    assert torch.equal(reference.decode_attention(*args, window=0), full)
    assert not torch.equal(reference.decode_attention(*args, window=8), full)
