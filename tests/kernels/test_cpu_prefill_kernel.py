"""The CPU C++ prefill kernel against the plain-torch reference: ragged batches of chunks
with and without a cached prefix, GQA, block sizes, unaligned lengths, NaN wherever it must
not read, strided q/out as the engine passes them, other dtypes, threads, and fallbacks."""

import pytest
import torch

from kernels import cpu, reference
from tests.kernels.conftest import GROUPS, SERVED_HEAD_DIMS

# (q_len, seq_len) per sequence: whole prompts, chunks after a cached prefix, single tokens,
# lengths off every tile and block boundary, a sequence with no queries this step.
CHUNKS = [(1, 1), (600, 600), (17, 40), (1, 300), (33, 33), (0, 20), (250, 513), (15, 16), (64, 64), (5, 129)]


def both(b, **kw):
    args = (b.q, b.k_cache, b.v_cache, b.block_tables, b.cu_seqlens_q, b.seq_lens, b.scale)
    return cpu.prefill_attention(*args, **kw), reference.prefill_attention(*args)


def batch(paged_batch, chunks, *shape, **kw):
    return paged_batch([q for q, _ in chunks], [n for _, n in chunks], *shape, **kw)


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("head_dim", SERVED_HEAD_DIMS)
def test_matches_reference_fp32(paged_batch, group, head_dim):
    test_matches_reference_fp32_at_block_size(paged_batch, 16, 2 * group, 2, head_dim)


@pytest.mark.parametrize("block_size", [32, 128])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (9, 3), (8, 1)])
def test_matches_reference_fp32_at_block_size(paged_batch, block_size, num_heads, num_kv_heads, head_dim=64):
    assert cpu.unserved(head_dim, block_size) is None, "the C++ kernel, not the fallback"
    b = batch(paged_batch, CHUNKS, num_heads, num_kv_heads, head_dim, block_size)
    got, want = both(b)
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("q_len", [1, 2, 7, 16, 31, 100, 599])
def test_every_chunk_length_with_and_without_a_prefix(paged_batch, q_len):
    b = batch(paged_batch, [(q_len, q_len), (q_len, q_len + 45), (q_len, q_len + 1)], 4, 2, 64, 16)
    got, want = both(b)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_caches_accumulate_in_fp32(paged_batch, dtype):
    b = batch(paged_batch, CHUNKS, 4, 2, 64, 16, dtype=dtype)
    got, want = both(b)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=1e-2)


def test_strided_rows_as_the_engine_passes_them(paged_batch):
    # The engine's q is a view of the fused qkv projection, and out the rows after the decodes.
    b = batch(paged_batch, [(3, 3), (70, 90), (16, 16)], 4, 2, 64, 16)
    n = b.q.shape[0]
    qkv = torch.randn(n, 8 * 64)
    qkv[:, : 4 * 64] = b.q.flatten(1)
    b.q = qkv[:, : 4 * 64].view(n, 4, 64)
    out = torch.full((n + 2, 4, 64), float("nan"))
    got, want = both(b, out=out[2:])
    assert got.data_ptr() == out[2:].data_ptr()
    torch.testing.assert_close(out[2:], want, atol=2e-6, rtol=1e-5)
    assert out[:2].isnan().all(), "rows before the chunk are not written"


def test_threads_split_the_batch_without_changing_it(paged_batch, at_threads):
    b = batch(paged_batch, [((i * 37) % 90 + 1, (i * 37) % 90 + 1 + i * 5) for i in range(12)], 4, 2, 64, 16)
    one, two = at_threads(lambda: both(b)[0])
    assert torch.equal(one, two)


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(6, 2, 40), (4, 2, 72)])
def test_shapes_without_a_compiled_kernel_go_to_the_reference(paged_batch, num_heads, num_kv_heads, head_dim):
    assert f"head_dim {head_dim} has no compiled kernel" in cpu.unserved(head_dim, 16)
    b = batch(paged_batch, [(5, 5), (9, 40)], num_heads, num_kv_heads, head_dim, 16)
    got, want = both(b)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_empty_batch_and_metadata_that_does_not_fit(paged_batch):
    b = batch(paged_batch, [(4, 4), (9, 9)], 4, 2, 64, 16)
    empty = cpu.prefill_attention(
        b.q[:0], b.k_cache, b.v_cache, b.block_tables, b.cu_seqlens_q, b.seq_lens, b.scale
    )
    assert empty.shape[0] == 0
    with pytest.raises(RuntimeError, match="sequence 1 has 9 query tokens but seq_len 8"):
        cpu.prefill_attention(
            b.q,
            b.k_cache,
            b.v_cache,
            b.block_tables,
            b.cu_seqlens_q,
            torch.tensor([4, 8], dtype=torch.int32),
            b.scale,
        )
    with pytest.raises(RuntimeError, match="cu_seqlens_q runs 0 .. 13 but q has 12 rows"):
        cpu.prefill_attention(
            b.q[:12], b.k_cache, b.v_cache, b.block_tables, b.cu_seqlens_q, b.seq_lens, b.scale
        )


# Windows of one token, below, at and off the block and tile sizes, and longer than every chunk.
WINDOWS = [1, 5, 16, 37, 100, 4096]


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (6, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_window_matches_reference_and_skips_keys_before_it(
    paged_batch, window, num_heads, num_kv_heads, dtype
):
    # CHUNKS holds chunks after a prefix longer than the window (the chunk crosses the window's
    # lower edge: chunked prefill) and whole prompts longer and shorter than it.
    b = batch(paged_batch, CHUNKS, num_heads, num_kv_heads, 64, 16, dtype=dtype)
    args = (b.q, b.k_cache, b.v_cache, b.block_tables, b.cu_seqlens_q, b.seq_lens, b.scale)
    want = reference.prefill_attention(*args, window=window)
    # Blocks wholly before the window of a chunk's first token are never read: NaN there.
    for i, (q_len, seq_len) in enumerate(CHUNKS):
        first = max(0, seq_len - q_len - window + 1) if q_len else seq_len
        for blk in b.block_tables[i, : first // 16].tolist():
            b.k_cache[blk] = b.v_cache[blk] = float("nan")
    got = cpu.prefill_attention(*args, window=window)
    tol = dict(atol=2e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(got.float(), want.float(), **tol)


@pytest.mark.parametrize("window", [1, 20, 33])
def test_window_with_every_chunk_length_and_prefix(paged_batch, window):
    for q_len in (1, 7, 16, 31, 100):
        b = batch(paged_batch, [(q_len, q_len), (q_len, q_len + 45), (q_len, q_len + 1)], 9, 3, 64, 16)
        args = (b.q, b.k_cache, b.v_cache, b.block_tables, b.cu_seqlens_q, b.seq_lens, b.scale)
        torch.testing.assert_close(
            cpu.prefill_attention(*args, window=window),
            reference.prefill_attention(*args, window=window),
            atol=2e-6,
            rtol=1e-5,
        )


def test_window_zero_is_no_window(paged_batch):
    b = batch(paged_batch, CHUNKS, 4, 2, 64, 16)
    args = (b.q, b.k_cache, b.v_cache, b.block_tables, b.cu_seqlens_q, b.seq_lens, b.scale)
    assert torch.equal(cpu.prefill_attention(*args, window=0), cpu.prefill_attention(*args))
