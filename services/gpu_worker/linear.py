"""The model's matrix multiplications, y = x @ W.T + b, with the weight laid out once at
load time for the fastest kernel the device has.

On CPU in fp32 that is oneDNN with a prepacked weight (what vLLM's CPU build uses):
1.1-3x faster than F.linear's MKL call at the 1-256 rows of a decode step, measured on
the tiny and small models. In bf16 too, where the CPU has bf16 instructions (AVX512-BF16,
AMX): 1.6x F.linear's bf16 at 32-128 rows on SmolLM2's shapes, with identical results.
Everywhere else, and with linear_backend "torch", F.linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shared.models import ModelLoadError

LINEAR_BACKENDS = ("auto", "onednn", "torch")


def _onednn_dtypes() -> tuple[torch.dtype, ...]:
    if not torch.backends.mkldnn.is_available():
        return ()
    return (
        (torch.float32, torch.bfloat16) if torch.ops.mkldnn._is_mkldnn_bf16_supported() else (torch.float32,)
    )


def onednn_slow_path(backend: str, device: torch.device, dtype: torch.dtype) -> list[str]:
    """["why the linear layers run F.linear"] where "auto" would want prepacked oneDNN and
    this torch or CPU cannot do it; [] where oneDNN runs or was never this device's fast path."""
    if backend != "auto" or device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return []
    if not torch.backends.mkldnn.is_available():
        return ["linear: F.linear instead of prepacked oneDNN, which this torch build lacks (mkldnn)"]
    if dtype not in _onednn_dtypes():
        return [
            "linear: bfloat16 F.linear instead of prepacked oneDNN: this CPU has no bf16 instructions "
            "(avx512_bf16 or AMX); float32 may well be faster here"
        ]
    return []


def use_onednn(backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether linear_backend `backend` means prepacked oneDNN here; "onednn" where it
    cannot run is a user's mistake, said at start-up."""
    if backend not in LINEAR_BACKENDS:
        raise ModelLoadError(f"linear_backend must be one of {LINEAR_BACKENDS} (got {backend!r})")
    possible = device.type == "cpu" and dtype in _onednn_dtypes()
    if backend == "onednn" and not possible:
        raise ModelLoadError(
            f"linear_backend onednn needs float32, or bfloat16 on a CPU with bf16 instructions, "
            f"on a CPU with oneDNN (got {dtype} on {device.type})"
        )
    return possible and backend != "torch"


class Linear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, onednn: bool = False):
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
