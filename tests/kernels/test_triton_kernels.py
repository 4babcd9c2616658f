"""Every Triton kernel against the torch reference: on CUDA when there is one, else on CPU
under TRITON_INTERPRET=1 (set in conftest.py). Outputs start as NaN so unwritten rows show.
"""

import os

import pytest
import torch

from kernels import reference

pytest.importorskip("triton")
from kernels import triton_decode_attention, triton_prefill_attention, triton_store_kv  # noqa: E402

# Kernels run where triton was told to run them: the interpreter takes CPU tensors only.
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
# The interpreter's bf16 arithmetic is wrong, so bf16 is only checked on a GPU.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# (num_heads, num_kv_heads): GQA ratios 1, 2, 4.
GQA = [(2, 2), (4, 2), (8, 2)]

# (q_lens, seq_lens): a lone token, a chunk after a cached prefix, a whole prompt longer
# than one tile, a one-token chunk after a long prefix; none aligned to blocks.
PREFILL = ([1, 17, 70, 1], [1, 50, 70, 100])
DECODE_SEQ_LENS = [1, 33, 100, 47]


def assert_close(actual, expected):
    tol = TOLERANCE[actual.dtype]
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size", [16, 32])
def test_store_kv(dtype, block_size):
    num_blocks, num_kv_heads, head_dim, num_tokens = 5, 2, 64, 24
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    v_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    # A slice of a wider tensor, as the engine's fused qkv projection produces.
    kv = torch.randn(num_tokens, 2, num_kv_heads, head_dim, dtype=dtype, device=DEVICE)
    key, value = kv[:, 0], kv[:, 1]
    slots = torch.randperm(num_blocks * block_size, device=DEVICE)[:num_tokens]
    slots[::5] = -1  # padding tokens

    triton_store_kv.store_kv(key, value, k_cache, v_cache, slots)

    expected_k = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    expected_v = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    reference.store_kv(key, value, expected_k, expected_v, slots)
    # equal_nan: every slot not written must still hold its NaN.
    torch.testing.assert_close(k_cache, expected_k, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, expected_v, rtol=0, atol=0, equal_nan=True)
    assert (~k_cache.isnan().all(-1).all(-1)).sum() == (slots >= 0).sum()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("num_heads,num_kv_heads", GQA)
def test_prefill_attention(paged_batch, dtype, block_size, num_heads, num_kv_heads):
    q_lens, seq_lens = PREFILL
    b = paged_batch(q_lens, seq_lens, num_heads, num_kv_heads, 64, block_size, dtype, DEVICE)
    args = (b.q, b.k_cache, b.v_cache, b.block_tables, b.cu_seqlens_q, b.seq_lens, b.scale)
    out = torch.full_like(b.q, float("nan"))

    got = triton_prefill_attention.prefill_attention(*args, out=out)

    assert got is out
    assert_close(out, reference.prefill_attention(*args))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("num_heads,num_kv_heads", GQA)
def test_decode_attention(paged_batch, dtype, block_size, num_heads, num_kv_heads):
    seq_lens = DECODE_SEQ_LENS
    b = paged_batch([1] * len(seq_lens), seq_lens, num_heads, num_kv_heads, 64, block_size, dtype, DEVICE)
    args = (b.q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens, b.scale)
    expected = reference.decode_attention(*args)

    # 1: no split; 2, 3: splits of several tiles, uneven; 8: more splits than the
    # longest context has tiles, so some are empty; None: the default heuristic.
    for num_splits in [1, 2, 3, 8, None]:
        out = torch.full_like(b.q, float("nan"))
        got = triton_decode_attention.decode_attention(*args, out=out, num_splits=num_splits)
        assert got is out
        assert_close(out, expected)


@pytest.mark.parametrize("dtype", [torch.float16], ids=str)
@pytest.mark.parametrize("head_dim", [16, 128])
def test_other_head_dims_and_a_non_power_of_two_group(paged_batch, dtype, head_dim):
    # 14 query heads over 2 kv heads, as in the gpu-0.5b model: groups of 7, padded to 8.
    q_lens, seq_lens = [1, 9, 3], [1, 40, 21]
    b = paged_batch(q_lens, seq_lens, 14, 2, head_dim, 16, dtype, DEVICE)
    args = (b.q, b.k_cache, b.v_cache, b.block_tables, b.cu_seqlens_q, b.seq_lens, b.scale)
    assert_close(triton_prefill_attention.prefill_attention(*args), reference.prefill_attention(*args))

    q = torch.randn(len(seq_lens), 14, head_dim, dtype=dtype, device=DEVICE)
    args = (q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens, b.scale)
    expected = reference.decode_attention(*args)
    for num_splits in [1, 2]:
        assert_close(triton_decode_attention.decode_attention(*args, num_splits=num_splits), expected)


def test_default_num_splits_grows_with_context_and_shrinks_with_batch(monkeypatch):
    # Pretend to be a 132-SM GPU without needing one.
    monkeypatch.setattr(triton_decode_attention, "_num_sms", lambda device: 132)
    pick = triton_decode_attention.default_num_splits
    gpu = torch.device("cuda")
    assert pick(1, 2, 100, gpu) == 1  # a short context is never split
    assert pick(1, 2, 8192, gpu) == 32  # long context, tiny batch: many programs
    assert pick(256, 2, 8192, gpu) == 1  # the batch alone fills the GPU
