"""Paged-KV attention kernels and the switch that picks a backend for a device.

Two interchangeable backends with identical signatures: "reference" (plain torch, used on
CPU) and "triton" (used on CUDA, or anywhere under TRITON_INTERPRET=1 for testing).
"""

import importlib
import os
from dataclasses import dataclass
from typing import Callable

import torch

from kernels import reference

BACKEND_ENV_VAR = "CONVEYOR_ATTENTION_BACKEND"
BACKENDS = ("reference", "triton")


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    store_kv: Callable[..., None]
    prefill_attention: Callable[..., torch.Tensor]
    decode_attention: Callable[..., torch.Tensor]


def get_attention_backend(device: torch.device, name: str | None = None) -> AttentionBackend:
    """The backend called `name`, else $CONVEYOR_ATTENTION_BACKEND, else the device's default."""
    device = torch.device(device)
    if name is None:
        name = os.environ.get(BACKEND_ENV_VAR) or ("triton" if device.type == "cuda" else "reference")
    if name == "reference":
        return AttentionBackend(name, reference.store_kv, reference.prefill_attention, reference.decode_attention)
    if name == "triton":
        return _triton_backend(device)
    raise ValueError(
        f"unknown attention backend {name!r} (from argument or ${BACKEND_ENV_VAR}); expected one of {BACKENDS}"
    )


def _triton_backend(device: torch.device) -> AttentionBackend:
    # Imported here so that CPU-only use never needs triton installed.
    from triton import knobs

    # Triton decides when a kernel module is imported whether its kernels compile or run in
    # the interpreter, so a CPU device needs TRITON_INTERPRET=1 set before that import.
    if device.type != "cuda" and not knobs.runtime.interpret:
        raise ValueError(
            f"the triton attention backend needs a CUDA device, or TRITON_INTERPRET=1 to run on {device.type}"
        )
    store = importlib.import_module("kernels.triton_store_kv")
    prefill = importlib.import_module("kernels.triton_prefill_attention")
    decode = importlib.import_module("kernels.triton_decode_attention")
    return AttentionBackend("triton", store.store_kv, prefill.prefill_attention, decode.decode_attention)
