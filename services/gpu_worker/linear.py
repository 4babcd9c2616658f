"""The model's matrix multiplications, y = x @ W.T + b, with the weight laid out once at
load time for the fastest kernel the device has.

On CPU in fp32 that is oneDNN with a prepacked weight (what vLLM's CPU build uses):
1.1-3x faster than F.linear's MKL call at the 1-256 rows of a decode step, measured on
the tiny and small models. Everywhere else, and with linear_backend "torch", F.linear.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from shared.models import ModelLoadError

LINEAR_BACKENDS = ("auto", "onednn", "torch")


def onednn_slow_path(backend: str, device: torch.device, dtype: torch.dtype) -> list[str]:
    """["why the linear layers run F.linear"] where "auto" wanted prepacked oneDNN and this
    torch cannot do it; [] where oneDNN runs or was never this device's fast path."""
    if backend == "auto" and device.type == "cpu" and dtype == torch.float32 and not torch.backends.mkldnn.is_available():
        return ["linear: F.linear instead of prepacked oneDNN, which this torch build lacks (mkldnn)"]
    return []


def use_onednn(backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether linear_backend `backend` means prepacked oneDNN here; "onednn" where it
    cannot run is a user's mistake, said at start-up."""
    if backend not in LINEAR_BACKENDS:
        raise ModelLoadError(f"linear_backend must be one of {LINEAR_BACKENDS} (got {backend!r})")
    possible = device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()
    if backend == "onednn" and not possible:
        raise ModelLoadError(f"linear_backend onednn needs float32 on a CPU with oneDNN (got {dtype} on {device.type})")
    return possible and backend != "torch"


class Linear:
    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, onednn: bool = False):
        self.weight = weight  # [out, in]; kept: tied embeddings and tests read it
        self.bias = bias
        # NOTE: packed without a batch-size hint: one layout serves every step's row count.
        self._packed = torch.ops.mkldnn._reorder_linear_weight(weight) if onednn else None

    @property
    def backend(self) -> str:
        return "torch" if self._packed is None else "onednn"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is None or x.shape[0] == 0:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
