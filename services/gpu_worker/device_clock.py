"""The clock a step's timings read (StepTimings, Drafts.ms). CUDA runs kernels
asynchronously: a launch returns at once, so a clock read right after the forward pass would
time its launches, and the kernels' time would land in whatever waits on them next."""

from __future__ import annotations

import time

import torch


def device_time(device: torch.device) -> float:
    """time.perf_counter(), once every kernel queued on `device` has run: on CUDA after a
    synchronize (it gives up the overlap of the next host work with those kernels); on CPU,
    where every op has finished when it returns, just the clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
