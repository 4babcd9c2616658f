"""Fused CPU kernels for a decoder layer's elementwise ops (kernels/csrc/elementwise.cpp),
built and cached as the attention kernels are (kernels/cpu_build.py). Same contracts as the eager
versions in services/gpu_worker/layer_ops.py, which they are tested against.
"""

import functools
from pathlib import Path

import torch
from torch import Tensor

from kernels.cpu_build import build

SOURCE = Path(__file__).parent / "csrc" / "elementwise.cpp"
OPS = ("rms_norm", "add_rms_norm", "silu_and_mul", "rotary")
# Eager torch rounds every product before it adds; without contraction into fused
# multiply-adds this does too, so fp32 rotary and the residual add match it bit for bit.
EXTRA_CFLAGS = ("-ffp-contract=off",)


@functools.cache
def load():
    """Build or load the extension (see kernels.cpu_build.build); returns the op namespace."""
    build("conveyor_cpu_elementwise", [SOURCE], EXTRA_CFLAGS)
    return torch.ops.conveyor_cpu


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x [T, H] or [T, heads, H], H contiguous -> weight * x / rms(x) over H, a new tensor."""
    assert x.dim() in (2, 3) and x.stride(-1) == 1, f"rms_norm: x {tuple(x.shape)} must have H contiguous"
    out = torch.empty(x.shape, dtype=x.dtype)
    x3 = x if x.dim() == 3 else x.unsqueeze(0)
    load().rms_norm(x3, weight, eps, out.view(x3.shape))
    return out


def add_rms_norm(h: Tensor, delta: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """h += delta in place, then (h, rms_norm(h)): the residual stream and the next layer's input."""
    assert h.is_contiguous(), "the residual stream is updated in place and must be contiguous"
    out = torch.empty_like(h)
    load().add_rms_norm(h, delta.contiguous(), weight, eps, out)
    return h, out


def silu_and_mul(gate_up: Tensor) -> Tensor:
    """gate_up [T, 2I], gate first -> silu(gate) * up [T, I]."""
    if gate_up.stride(-1) != 1:
        gate_up = gate_up.contiguous()
    out = torch.empty(gate_up.shape[0], gate_up.shape[1] // 2, dtype=gate_up.dtype)
    load().silu_and_mul(gate_up, out)
    return out


def rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """q [T, H, D], k [T, Hkv, D] rotated in place (neox style), cos/sin [T, 1, D] -> (q, k)."""
    load().rotary(q, k, cos.flatten(1), sin.flatten(1))
    return q, k
