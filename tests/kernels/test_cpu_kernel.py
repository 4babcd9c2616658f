"""The CPU C++ decode kernel against the plain-torch reference: ragged batches, GQA, block
sizes, context lengths that end mid-block, NaN wherever it must not read, strided q/out
as the engine passes them, other dtypes, threads, and shapes it hands to the reference."""

import pytest
import torch

from kernels import cpu, reference
from tests.kernels.conftest import GROUPS, SERVED_HEAD_DIMS

LENGTHS = [1, 15, 17, 1000, 16, 33, 250]


def both(b, **kw):
    args = (b.q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens, b.scale)
    return cpu.decode_attention(*args, **kw), reference.decode_attention(*args)


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("head_dim", SERVED_HEAD_DIMS)
def test_matches_reference_fp32(paged_batch, group, head_dim):
    test_matches_reference_fp32_at_block_size(paged_batch, 16, 2 * group, 2, head_dim)


@pytest.mark.parametrize("block_size", [32, 128])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (9, 3), (8, 1)])
def test_matches_reference_fp32_at_block_size(paged_batch, block_size, num_heads, num_kv_heads, head_dim=64):
    assert cpu.unserved(head_dim, block_size) is None, "the C++ kernel, not the fallback"
    b = paged_batch([1] * len(LENGTHS), LENGTHS, num_heads, num_kv_heads, head_dim, block_size)
    got, want = both(b)
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_caches_accumulate_in_fp32(paged_batch, dtype):
    b = paged_batch([1] * len(LENGTHS), LENGTHS, 4, 2, 64, 16, dtype=dtype)
    got, want = both(b)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=1e-2)


def test_strided_rows_as_the_engine_passes_them(paged_batch):
    # The engine's q is a view of the fused qkv projection, and out a slice of a larger buffer.
    b = paged_batch([1] * 5, [3, 70, 16, 129, 2], 4, 2, 64, 16)
    qkv = torch.randn(5, 8 * 64)
    qkv[:, : 4 * 64] = b.q.flatten(1)
    b.q = qkv[:, : 4 * 64].view(5, 4, 64)
    out = torch.full((7, 4, 64), float("nan"))
    got, want = both(b, out=out[:5])
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out[:5], want, atol=2e-6, rtol=1e-5)
    assert out[5:].isnan().all(), "rows past the batch are not written"


def test_threads_split_the_batch_without_changing_it(paged_batch, at_threads):
    b = paged_batch([1] * 40, [(i * 37) % 300 + 1 for i in range(40)], 4, 2, 64, 16)
    one, two = at_threads(lambda: both(b)[0])
    assert torch.equal(one, two)


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(6, 2, 40), (4, 2, 72)])
def test_shapes_without_a_compiled_kernel_go_to_the_reference(paged_batch, num_heads, num_kv_heads, head_dim):
    assert f"head_dim {head_dim} has no compiled kernel" in cpu.unserved(head_dim, 16)
    b = paged_batch([1] * 3, [5, 40, 17], num_heads, num_kv_heads, head_dim, 16)
    got, want = both(b)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_empty_batch_and_empty_sequence(paged_batch):
    b = paged_batch([1, 1], [4, 9], 4, 2, 64, 16)
    assert (
        cpu.decode_attention(
            b.q[:0], b.k_cache, b.v_cache, b.block_tables[:0], b.seq_lens[:0], b.scale
        ).shape[0]
        == 0
    )
    with pytest.raises(RuntimeError, match="sequence 1 has seq_len 0"):
        cpu.decode_attention(
            b.q, b.k_cache, b.v_cache, b.block_tables, torch.tensor([4, 0], dtype=torch.int32), b.scale
        )


def poison_before(b, first_keys):
    """NaN in every block that lies wholly before sequence i's first_keys[i]: a kernel that
    reads any of them (instead of skipping them) returns NaN."""
    block_size = b.k_cache.shape[1]
    for i, first in enumerate(first_keys):
        for blk in b.block_tables[i, : first // block_size].tolist():
            b.k_cache[blk] = float("nan")
            b.v_cache[blk] = float("nan")


# Windows of one token, below, at and off the block size, equal to a context (70), longer than all.
WINDOWS = [1, 5, 16, 37, 70, 4096]


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (6, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_window_matches_reference_and_skips_blocks_before_it(
    paged_batch, window, num_heads, num_kv_heads, dtype
):
    lens = [1, 15, 17, 70, 250, 1000]
    b = paged_batch([1] * len(lens), lens, num_heads, num_kv_heads, 64, 16, dtype=dtype)
    args = (b.q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens, b.scale)
    want = reference.decode_attention(*args, window=window)
    assert not torch.allclose(want.float(), reference.decode_attention(*args).float()) or window >= 1000
    poison_before(b, [max(0, n - window) for n in lens])
    got = cpu.decode_attention(*args, window=window)
    tol = dict(atol=2e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(got.float(), want.float(), **tol)


def test_window_zero_is_no_window(paged_batch):
    b = paged_batch([1] * 3, [5, 300, 17], 4, 2, 64, 16)
    args = (b.q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens, b.scale)
    assert torch.equal(cpu.decode_attention(*args, window=0), cpu.decode_attention(*args))
