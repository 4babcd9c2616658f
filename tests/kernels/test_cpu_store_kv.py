"""The CPU C++ cache writer against the plain-torch reference: padding slots skipped, the
engine's strided value rows, keys whose rows are not contiguous, other dtypes, a bad slot."""

import pytest
import torch

from kernels import cpu, reference


def write_both(key, value, slots, dtype=torch.float32):
    caches = [torch.full((9, 16, 2, 64), float("nan"), dtype=dtype) for _ in range(4)]
    reference.store_kv(key, value, caches[0], caches[1], slots)
    cpu.store_kv(key, value, caches[2], caches[3], slots)
    return caches


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference_and_skips_padding(dtype):
    n = 40
    qkv = torch.randn(n, 8 * 64).to(dtype)  # v is a view of the fused projection, as in the engine
    key, value = qkv[:, 4 * 64 : 6 * 64].reshape(n, 2, 64).clone(), qkv[:, 6 * 64 :].view(n, 2, 64)
    slots = torch.randperm(9 * 16)[:n]
    slots[::7] = -1
    k_ref, v_ref, k_cpu, v_cpu = write_both(key, value, slots, dtype)
    torch.testing.assert_close(k_cpu, k_ref, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(v_cpu, v_ref, atol=0, rtol=0, equal_nan=True)
    assert k_cpu.isnan().sum() == (9 * 16 - (slots >= 0).sum()) * 2 * 64, "only the mapped slots are written"


def test_key_rows_that_are_not_contiguous_are_copied_first():
    key = torch.randn(5, 64, 2).transpose(1, 2)  # [5, 2, 64] with head_dim strided
    value = torch.randn(5, 2, 64)
    slots = torch.tensor([3, 0, -1, 17, 100])
    k_ref, v_ref, k_cpu, v_cpu = write_both(key, value, slots)
    torch.testing.assert_close(k_cpu, k_ref, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(v_cpu, v_ref, atol=0, rtol=0, equal_nan=True)


def test_a_slot_past_the_cache_is_an_error():
    kv, cache = torch.randn(2, 2, 64), torch.zeros(9, 16, 2, 64)
    with pytest.raises(RuntimeError, match="token 1 has slot 144 of 144"):
        cpu.store_kv(kv, kv, cache, cache.clone(), torch.tensor([0, 9 * 16]))
