"""The prepacked oneDNN linear gives F.linear's results (to fp32 rounding) at every row
count a step can have, and refuses to run where it cannot."""

import pytest
import torch
import torch.nn.functional as F

from services.gpu_worker.linear import Linear, use_onednn
from shared.models import ModelLoadError


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [0, 1, 3, 16, 65, 257])
def test_onednn_linear_matches_f_linear(rows, bias):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 80, generator=g)
    b = torch.randn(96, generator=g) if bias else None
    x = torch.randn(rows, 80, generator=g)
    packed = Linear(w, b, onednn=True)
    assert packed(x).shape == (rows, 96)
    torch.testing.assert_close(packed(x), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(
    not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="this CPU has no bf16 instructions"
)
@pytest.mark.parametrize("rows", [1, 16, 65])
def test_bf16_onednn_linear_equals_bf16_f_linear(rows):
    g = torch.Generator().manual_seed(rows)
    w, b, x = (torch.randn(*s, generator=g).bfloat16() for s in ((96, 80), (96,), (rows, 80)))
    assert torch.equal(Linear(w, b, onednn=True)(x), F.linear(x, w, b))


def test_backend_choice():
    cpu = torch.device("cpu")
    assert use_onednn("auto", cpu, torch.float32) == torch.backends.mkldnn.is_available()
    assert not use_onednn("torch", cpu, torch.float32)
    bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert use_onednn("auto", cpu, torch.bfloat16) == bf16  # where the CPU has bf16 instructions
    assert not use_onednn("auto", cpu, torch.float16)
    with pytest.raises(ModelLoadError, match="linear_backend onednn needs float32"):
        use_onednn("onednn", cpu, torch.float16)
    with pytest.raises(ModelLoadError, match="linear_backend must be one of"):
        use_onednn("fast", cpu, torch.float32)
