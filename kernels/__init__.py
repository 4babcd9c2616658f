"""Paged-KV attention kernels and the switch that picks a backend for a device.

Interchangeable backends with identical signatures: "cpu" (C++ kernels, the default
on CPU), "reference" (plain torch, the ground truth the others are tested against) and
"triton" (used on CUDA, or anywhere under TRITON_INTERPRET=1 for testing). Every backend's
prefill and decode take an optional sliding `window` (kernels/reference.py's convention).
"""

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernels import reference

BACKENDS = ("cpu", "reference", "triton")
log = logging.getLogger(__name__)


def _serves_all(head_dim: int) -> str | None:
    return None


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    store_kv: Callable[..., None]
    prefill_attention: Callable[..., torch.Tensor]
    decode_attention: Callable[..., torch.Tensor]
    # head_dim -> why this backend's kernels cannot serve it, or None when they can.
    unserved: Callable[[int], str | None] = _serves_all
    fallback_reason: str | None = None  # set when this is the reference standing in for another

    def for_shape(self, num_heads: int, num_kv_heads: int, head_dim: int) -> "AttentionBackend":
        """This backend, or the reference where its kernels cannot serve the model's shape:
        slower, and said so (slow_paths), but served rather than refused."""
        why = self.unserved(head_dim)
        if why is None:
            return self
        return AttentionBackend(
            "reference",
            reference.store_kv,
            reference.prefill_attention,
            reference.decode_attention,
            fallback_reason=f"{self.name} kernels for {num_heads} query heads over {num_kv_heads} "
            f"kv heads, head_dim {head_dim}: {why}",
        )

    def slow_paths(self) -> list[str]:
        """What of attention runs slower than this device's fast kernels, for the start-up
        log and the worker's figures: [] when the kernels serve the model."""
        if self.fallback_reason:
            return [
                "attention: decode and prefill run on the torch reference instead of the "
                f"{self.fallback_reason}"
            ]
        return []


def get_attention_backend(device: torch.device, name: str = "auto") -> AttentionBackend:
    """The backend called `name` (the worker's attention_backend setting), or with "auto" the
    device's default."""
    device = torch.device(device)
    if name == "auto":
        if device.type == "cpu":
            return _cpu_backend_or_reference()
        name = "triton"
    if name == "cpu":
        return _cpu_backend(device)
    if name == "reference":
        return AttentionBackend(
            name, reference.store_kv, reference.prefill_attention, reference.decode_attention
        )
    if name == "triton":
        return _triton_backend(device)
    raise ValueError(f"unknown attention backend {name!r}; expected one of {('auto', *BACKENDS)}")


def _cpu_backend(device: torch.device) -> AttentionBackend:
    from kernels import cpu

    if device.type != "cpu":
        raise ValueError(f"the cpu attention backend runs on the CPU only, not on {device.type}")

    cpu.load()  # builds the extension on first use, so a missing compiler shows here, not mid-step
    return AttentionBackend(
        "cpu",
        cpu.store_kv,
        cpu.prefill_attention,
        cpu.decode_attention,
        lambda head_dim: cpu.unserved(head_dim),
    )


def _cpu_backend_or_reference() -> AttentionBackend:
    """The default on CPU: the C++ kernel, or, where it cannot be built, the reference, saying why."""
    try:
        return _cpu_backend(torch.device("cpu"))
    except RuntimeError as e:  # no compiler or ninja, or a failed build: the message says which
        log.warning("cpu attention backend unavailable, falling back to the (slower) reference: %s", e)
        return AttentionBackend(
            "reference",
            reference.store_kv,
            reference.prefill_attention,
            reference.decode_attention,
            fallback_reason=f"cpu kernels, which cannot be built: {e}",
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
    return AttentionBackend(
        "triton", store.store_kv, prefill.prefill_attention, decode.decode_attention, _triton_unserved
    )


def _triton_unserved(head_dim: int) -> str | None:
    from kernels.triton_prefill_attention import MAX_HEAD_DIM

    if head_dim > MAX_HEAD_DIM:
        return f"head_dim {head_dim} is above {MAX_HEAD_DIM}, the largest the kernels' tiles are sized for"
    return None
