"""A decoder layer's elementwise ops (rms_norm, residual add + rms_norm, act(gate) * up,
rotary embedding) on one of two backends: "eager" torch ops, the ground truth and the path
on other devices, or "cpu", fused C++ kernels (kernels/cpu_elementwise.py), the CPU default.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.activations import SiLUActivation

from services.gpu_worker.rope import apply_rotary

LAYER_OPS = ("cpu", "eager")
log = logging.getLogger(__name__)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # In fp32 then back, as transformers does, so low-precision runs round the same way.
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """(h + delta, rms_norm(h + delta)): the residual stream and the next sublayer's input."""
    h = h + delta
    return h, rms_norm(h, weight, eps)


def act_and_mul(act: Callable[[torch.Tensor], torch.Tensor], gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I], gate first -> act(gate) * up [T, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return act(gate) * up


@dataclass(frozen=True)
class LayerOps:
    name: str
    rms_norm: Callable[..., torch.Tensor]
    add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    act_and_mul: Callable[[torch.Tensor], torch.Tensor]
    rotary: Callable[..., tuple[torch.Tensor, torch.Tensor]]  # (q, k, cos, sin) -> (q, k)
    slow_paths: tuple[str, ...] = ()  # ops that run eager although this backend has kernels, and why


def get_layer_ops(device: torch.device, act: Callable, name: str = "auto") -> LayerOps:
    """The ops called `name` (the worker's layer_ops setting), or with "auto" the device's default."""
    device = torch.device(device)
    if name == "auto":
        return _cpu_or_eager(act) if device.type == "cpu" else _eager(act)
    if name == "eager":
        return _eager(act)
    if name == "cpu":
        if device.type != "cpu":
            raise ValueError(f"the cpu layer ops run on the CPU only, not on {device.type}")
        return _cpu(act)
    raise ValueError(f"unknown layer ops {name!r}; expected one of {('auto', *LAYER_OPS)}")


def _eager(act: Callable) -> LayerOps:
    return LayerOps("eager", rms_norm, add_rms_norm, functools.partial(act_and_mul, act), apply_rotary)


def _cpu(act: Callable) -> LayerOps:
    from kernels import cpu_elementwise as k

    k.load()  # builds the extension on first use, so a missing compiler shows here, not mid-step
    # The kernel is SiLU's (Llama, Qwen); any other activation keeps the eager path.
    silu = isinstance(act, (SiLUActivation, nn.SiLU))
    mlp_act = k.silu_and_mul if silu else functools.partial(act_and_mul, act)
    slow = (
        ()
        if silu
        else (
            f"layer ops: act(gate) * up runs as eager torch ops: the fused cpu kernel is SiLU's, "
            f"the model's activation is {type(act).__name__}",
        )
    )
    return LayerOps("cpu", k.rms_norm, k.add_rms_norm, mlp_act, k.rotary, slow)


def _cpu_or_eager(act: Callable) -> LayerOps:
    try:
        return _cpu(act)
    except RuntimeError as e:  # no compiler or ninja, or a failed build: the message says which
        log.warning("cpu layer ops unavailable, falling back to eager torch ops: %s", e)
        return dataclasses.replace(
            _eager(act),
            slow_paths=(
                f"layer ops: eager torch ops instead of the cpu kernels, which cannot be built: {e}",
            ),
        )
