"""The fused CPU elementwise kernels against the eager torch ops they replace
(services/gpu_worker/layer_ops.py): ragged row counts including 1 and 0, aligned and
unaligned widths, strided q/k views as the engine passes them, bf16, and the backend switch.
The whole engine on both is in test_engine_on_backends.py."""

from types import SimpleNamespace

import pytest
import torch
from transformers.activations import ACT2FN

from kernels import cpu_elementwise as k
from services.gpu_worker import layer_ops
from services.gpu_worker.rope import RotaryEmbedding
from shared.config import WorkerSettings

ROWS = [0, 1, 7, 33]
WIDTHS = [64, 100, 1000, 1536]
FP32 = dict(atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("width", WIDTHS)
def test_rms_norm(rows, width):
    x, w = torch.randn(rows, width) * 3, torch.randn(width)
    torch.testing.assert_close(k.rms_norm(x, w, 1e-6), layer_ops.rms_norm(x, w, 1e-6), **FP32)


def test_rms_norm_per_head_of_a_strided_view():
    # Qwen3's q_norm: q is a view of the qkv projection, heads of 64, rows strided.
    qkv = torch.randn(5, (8 + 2 * 2) * 64)
    q = qkv[:, : 8 * 64].view(5, 8, 64)
    w = torch.randn(64)
    torch.testing.assert_close(k.rms_norm(q, w, 1e-6), layer_ops.rms_norm(q, w, 1e-6), **FP32)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("width", WIDTHS)
def test_add_rms_norm_updates_the_residual_in_place(rows, width):
    h, delta, w = torch.randn(rows, width), torch.randn(rows, width), torch.randn(width)
    want_h, want_x = layer_ops.add_rms_norm(h, delta, w, 1e-5)
    got_h, got_x = k.add_rms_norm(h, delta, w, 1e-5)
    assert got_h.data_ptr() == h.data_ptr()
    assert torch.equal(got_h, want_h), "one rounded fp32 add, as eager"
    torch.testing.assert_close(got_x, want_x, **FP32)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("width", WIDTHS)
def test_silu_and_mul(rows, width):
    gate_up = torch.randn(rows, 2 * width) * 4
    gate_up[:, :3] = torch.tensor([-100.0, 100.0, 0.0])  # exp's clamp and both sigmoid branches
    want = layer_ops.act_and_mul(ACT2FN["silu"], gate_up)
    torch.testing.assert_close(k.silu_and_mul(gate_up), want, **FP32)


def rope_case(rows, head_dim, dtype=torch.float32):
    """q and k as strided views of one qkv row, and their positions' cos/sin."""
    rotary = RotaryEmbedding(SimpleNamespace(rope_theta=10000.0), head_dim, 4096, torch.device("cpu"))
    qkv = torch.randn(rows, (4 + 2 * 2) * head_dim, dtype=dtype)
    q = qkv[:, : 4 * head_dim].view(rows, 4, head_dim)
    kk = qkv[:, 4 * head_dim : 6 * head_dim].view(rows, 2, head_dim)
    return q, kk, *rotary.for_positions(torch.randint(0, 4096, (rows,)), dtype)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_rotary_in_place_matches_eager_bit_for_bit(rows, head_dim):
    q, kk, cos, sin = rope_case(rows, head_dim)
    want_q, want_k = layer_ops.apply_rotary(q, kk, cos, sin)
    got_q, got_k = k.rotary(q, kk, cos, sin)
    assert got_q.data_ptr() == q.data_ptr() and got_k.data_ptr() == kk.data_ptr()
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)


def test_bf16_rounds_like_eager():
    x, d, w = (torch.randn(9, 320, dtype=torch.bfloat16) for _ in range(3))
    w = w[0]
    bf16 = dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(k.rms_norm(x, w, 1e-6), layer_ops.rms_norm(x, w, 1e-6), **bf16)
    want_h, want_x = layer_ops.add_rms_norm(x, d, w, 1e-6)
    got_h, got_x = k.add_rms_norm(x.clone(), d, w, 1e-6)
    assert torch.equal(got_h, want_h)
    torch.testing.assert_close(got_x, want_x, **bf16)
    gate_up = torch.randn(9, 640, dtype=torch.bfloat16)
    torch.testing.assert_close(
        k.silu_and_mul(gate_up), layer_ops.act_and_mul(ACT2FN["silu"], gate_up), **bf16
    )
    q, kk, cos, sin = rope_case(9, 64, torch.bfloat16)
    want_q, want_k = layer_ops.apply_rotary(q, kk, cos, sin)
    got_q, got_k = k.rotary(q, kk, cos, sin)
    torch.testing.assert_close(got_q, want_q, **bf16)
    torch.testing.assert_close(got_k, want_k, **bf16)


def test_switch_defaults_to_cpu_on_cpu_and_keeps_other_activations_eager(monkeypatch):
    assert layer_ops.get_layer_ops(torch.device("cpu"), ACT2FN["silu"]).act_and_mul is k.silu_and_mul
    gelu = layer_ops.get_layer_ops(torch.device("cpu"), ACT2FN["gelu"])
    gate_up = torch.randn(3, 128)
    assert gelu.name == "cpu" and torch.equal(
        gelu.act_and_mul(gate_up), layer_ops.act_and_mul(ACT2FN["gelu"], gate_up)
    )
    monkeypatch.setenv("CONVEYOR_LAYER_OPS", "eager")  # the worker's layer_ops setting
    assert (
        layer_ops.get_layer_ops(torch.device("cpu"), ACT2FN["silu"], WorkerSettings().layer_ops).name
        == "eager"
    )
    with pytest.raises(ValueError, match="'fused'.*expected one of"):
        layer_ops.get_layer_ops(torch.device("cpu"), ACT2FN["silu"], "fused")
    with pytest.raises(ValueError, match="CPU only, not on cuda"):
        layer_ops.get_layer_ops(torch.device("cuda"), ACT2FN["silu"], "cpu")


def test_without_a_compiler_the_default_falls_back_to_eager_and_says_why(monkeypatch, caplog):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    k.load.cache_clear()  # forget the build this process already loaded
    try:
        with caplog.at_level("WARNING", logger=layer_ops.__name__):
            assert layer_ops.get_layer_ops(torch.device("cpu"), ACT2FN["silu"]).name == "eager"
        assert "'/nonexistent/c++' not found" in caplog.text
        with pytest.raises(RuntimeError, match="needs a C\\+\\+ compiler"):
            layer_ops.get_layer_ops(torch.device("cpu"), ACT2FN["silu"], "cpu")
    finally:
        k.load.cache_clear()


def test_bf16_conversion_rounds_exactly_as_torch_on_edge_values():
    """The kernels convert bf16 by its bits (vectorizable) rather than through c10's type:
    the same results on ties, overflow to inf, infinities and NaN."""
    bits = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)  # every bf16
    h = bits.float().reshape(256, 256)
    tiny = torch.finfo(torch.bfloat16).eps * h.abs() / 2  # exactly half a unit: ties to even
    deltas = [tiny, -tiny, torch.full_like(h, 3e38), torch.full_like(h, float("nan")), torch.randn(256, 256)]
    for delta in deltas:
        hb, db = h.to(torch.bfloat16), delta.to(torch.bfloat16)
        w = torch.ones(256, dtype=torch.bfloat16)
        got_h, _ = k.add_rms_norm(hb.clone(), db, w, 1e-6)
        torch.testing.assert_close(got_h, hb + db, atol=0, rtol=0, equal_nan=True)
    # fp32 values that round to a bf16 tie, overflow, or are NaN: through silu(x) * 1 for x >> 0.
    x = torch.tensor([1.00390625, 1.01171875, 3.3961e38, 3.4e38, float("inf"), float("nan"), 65504.0, 1e-40])
    gate_up = torch.cat([x, torch.ones_like(x)]).reshape(1, -1)
    want = layer_ops.act_and_mul(ACT2FN["silu"], gate_up.to(torch.bfloat16))
    torch.testing.assert_close(
        k.silu_and_mul(gate_up.to(torch.bfloat16)), want, atol=0, rtol=0, equal_nan=True
    )
