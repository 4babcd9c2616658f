"""Every Triton kernel against the torch reference: on CUDA when there is one, else on CPU
under TRITON_INTERPRET=1 (set in conftest.py). Outputs start as NaN so unwritten rows show.
"""

import os

import pytest
import torch

from kernels import reference

pytest.importorskip("triton")
from kernels import triton_decode_attention, triton_prefill_attention, triton_store_kv

# Kernels run where triton was told to run them: the interpreter takes CPU tensors only.
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
# The interpreter's bf16 arithmetic is wrong, so bf16 is only checked on a GPU.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# (num_heads, num_kv_heads): GQA ratios 1, 2, 4.
GQA = [(2, 2), (4, 2), (8, 2)]
# Every GQA group real models use (SmolLM2 and Llama-3.2-3B 3, Qwen2.5-1.5B 6, -0.5B and -7B
# 7) and then some, at the head dims of real models (Phi-2 80, Gemma 256), 80 and 96 padded
# to 128 inside the kernels.
GROUPS = [1, 2, 3, 4, 5, 6, 7, 8]
HEAD_DIMS = [64, 80, 96, 128, 256]
# The whole group x head dim grid, each case in one dtype, taken in turn so that every group
# and every head dim meets each dtype; the interpreter is too slow for the full product.
# Then a group of 16 (Llama-3.1-405B), whose heads alone fill a program's rows.
SHAPES = [
    pytest.param(g, d, DTYPES[(i + j) % len(DTYPES)], id=f"group{g}-d{d}-{DTYPES[(i + j) % len(DTYPES)]}")
    for i, g in enumerate(GROUPS)
    for j, d in enumerate(HEAD_DIMS)
] + [
    pytest.param(16, d, dtype, id=f"group16-d{d}-{dtype}")
    for d, dtype in [(128, torch.float16), (80, torch.float32)]
]

# (q_lens, seq_lens): a lone token, a chunk after a cached prefix, a whole prompt longer
# than one tile, a one-token chunk after a long prefix; none aligned to blocks.
PREFILL = ([1, 17, 70, 1], [1, 50, 70, 100])
DECODE_SEQ_LENS = [1, 33, 100, 47]


def assert_close(actual, expected):
    tol = TOLERANCE[actual.dtype]
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol)


def nan_padded(x: torch.Tensor) -> torch.Tensor:
    """x as a strided view whose rows run on into 64 NaN columns, the way the engine's q is a
    slice of the fused qkv projection. A kernel that reads or writes its padding columns past
    head_dim (up to 48 of them, at 80) hits this row's NaNs, not the next row's values."""
    wide = torch.full((*x.shape[:-1], x.shape[-1] + 64), float("nan"), dtype=x.dtype, device=x.device)
    wide[..., : x.shape[-1]] = x
    return wide[..., : x.shape[-1]]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("head_dim", [64, 80])
def test_store_kv(dtype, block_size, head_dim):
    num_blocks, num_kv_heads, num_tokens = 5, 2, 24
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


@pytest.mark.parametrize("group,head_dim,dtype", SHAPES)
def test_prefill_attention_at_every_group_and_head_dim(paged_batch, group, head_dim, dtype):
    # A 7-token chunk after 33 cached tokens (its context ends mid-way through a third block
    # of 16) and a whole 5-token prompt, over two kv heads so each group must find its own.
    b = paged_batch([7, 5], [40, 5], 2 * group, 2, head_dim, 16, dtype, DEVICE)
    q = nan_padded(b.q)
    out = nan_padded(torch.full_like(b.q, float("nan")))
    args = (q, b.k_cache, b.v_cache, b.block_tables, b.cu_seqlens_q, b.seq_lens, b.scale)

    triton_prefill_attention.prefill_attention(*args, out=out)

    assert_close(out, reference.prefill_attention(*args))
    assert out._base[..., head_dim:].isnan().all(), "nothing written past head_dim"


@pytest.mark.parametrize("group,head_dim,dtype", SHAPES)
def test_decode_attention_at_every_group_and_head_dim(paged_batch, group, head_dim, dtype):
    # 37 tokens end mid-way through a third block; in two splits the second holds those 5
    # tokens of a partial tile, and for the 1-token context it is empty.
    b = paged_batch([1, 1], [37, 1], 2 * group, 2, head_dim, 16, dtype, DEVICE)
    q = nan_padded(b.q)
    out = nan_padded(torch.full_like(b.q, float("nan")))
    args = (q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens, b.scale)

    triton_decode_attention.decode_attention(*args, out=out, num_splits=2)

    assert_close(out, reference.decode_attention(*args))
    assert out._base[..., head_dim:].isnan().all(), "nothing written past head_dim"


@pytest.mark.parametrize("head_dim", [16, 40])
def test_small_head_dims(paged_batch, head_dim):
    # Below 64 too: 16, the smallest tl.dot takes, and 40, padded to 64.
    q_lens, seq_lens = [1, 9, 3], [1, 40, 21]
    b = paged_batch(q_lens, seq_lens, 6, 2, head_dim, 16, torch.float16, DEVICE)
    args = (b.q, b.k_cache, b.v_cache, b.block_tables, b.cu_seqlens_q, b.seq_lens, b.scale)
    assert_close(triton_prefill_attention.prefill_attention(*args), reference.prefill_attention(*args))

    q = torch.randn(len(seq_lens), 6, head_dim, dtype=torch.float16, device=DEVICE)
    args = (q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens, b.scale)
    assert_close(
        triton_decode_attention.decode_attention(*args, num_splits=2), reference.decode_attention(*args)
    )


@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim,why",
    [
        (8, 2, 320, "head_dim 320 is above 256"),
        (6, 4, 64, "6 query heads do not split evenly over 4 kv heads"),
    ],
)
def test_shapes_the_kernels_cannot_serve_are_refused_by_name(
    paged_batch, num_heads, num_kv_heads, head_dim, why
):
    b = paged_batch([3], [3], num_heads, num_kv_heads, head_dim, 16, torch.float32, DEVICE)
    with pytest.raises(ValueError, match=f"triton prefill attention: {why}"):
        triton_prefill_attention.prefill_attention(
            b.q, b.k_cache, b.v_cache, b.block_tables, b.cu_seqlens_q, b.seq_lens, b.scale
        )
    with pytest.raises(ValueError, match=f"triton decode attention: {why}"):
        triton_decode_attention.decode_attention(
            b.q[:1], b.k_cache, b.v_cache, b.block_tables, b.seq_lens, b.scale, num_splits=1
        )


def test_default_num_splits_grows_with_context_and_shrinks_with_batch(monkeypatch):
    # Pretend to be a 132-SM GPU without needing one.
    monkeypatch.setattr(triton_decode_attention, "_num_sms", lambda device: 132)
    pick = triton_decode_attention.default_num_splits
    gpu = torch.device("cuda")
    assert pick(1, 2, 100, gpu) == 1  # a short context is never split
    assert pick(1, 2, 8192, gpu) == 32  # long context, tiny batch: many programs
    assert pick(256, 2, 8192, gpu) == 1  # the batch alone fills the GPU


# Sliding windows, in fp32 (the interpreter is slow): one token, below and off the block
# and tile sizes (a chunk after a prefix crosses its edge), and longer than every context.
@pytest.mark.parametrize("window", [1, 20, 37, 1000])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (6, 2)])
def test_prefill_attention_with_a_window(paged_batch, window, num_heads, num_kv_heads):
    q_lens, seq_lens = PREFILL
    b = paged_batch(q_lens, seq_lens, num_heads, num_kv_heads, 64, 16, torch.float32, DEVICE)
    args = (b.q, b.k_cache, b.v_cache, b.block_tables, b.cu_seqlens_q, b.seq_lens, b.scale)
    got = triton_prefill_attention.prefill_attention(
        *args, out=torch.full_like(b.q, float("nan")), window=window
    )
    assert_close(got, reference.prefill_attention(*args, window=window))


@pytest.mark.parametrize("window", [1, 20, 37, 1000])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (6, 2)])
def test_decode_attention_with_a_window(paged_batch, window, num_heads, num_kv_heads):
    b = paged_batch(
        [1] * len(DECODE_SEQ_LENS), DECODE_SEQ_LENS, num_heads, num_kv_heads, 64, 16, torch.float32, DEVICE
    )
    args = (b.q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens, b.scale)
    expected = reference.decode_attention(*args, window=window)
    for num_splits in [1, 3, None]:  # the splits share out the window's keys only
        got = triton_decode_attention.decode_attention(
            *args, out=torch.full_like(b.q, float("nan")), num_splits=num_splits, window=window
        )
        assert_close(got, expected)
