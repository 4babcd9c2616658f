"""A follower rank of a tensor-parallel worker (started by rank 0, never by hand): joins
the group, loads its shard and KV cache, then runs each forward pass rank 0 hands it until
told to stop. It dies with rank 0: by PR_SET_PDEATHSIG, and a failed collective ends it.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from shared.log import setup_logging

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
# The points of serve()'s start-up reported to its `at_point` hook, where the tests make a
# follower die as one that crashes or runs out of memory there (tests/gpu_worker/dying_tp_follower.py).
START_UP_POINTS = ("before-rendezvous", "before-ready")


def _nothing(point: str) -> None:
    pass


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when the thread that started it exits (rank 0 killed -9 too);
    if rank 0 is already gone, exit now."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # it died before prctl took effect
        sys.exit(1)


def main(argv: list[str], at_point: Callable[[str], None] = _nothing) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--init-method", required=True)
    ap.add_argument("--parent-pid", type=int, required=True)
    ap.add_argument(
        "--settings", required=True, help="the worker's WorkerSettings as JSON, with this rank's threads"
    )
    args = ap.parse_args(argv)
    die_with_parent(args.parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: rank 0 decides
    setup_logging(f"gpu_worker.tp{args.rank}")
    log = logging.getLogger("services.gpu_worker.tp_follower")

    from shared.config import WorkerSettings
    from shared.cpu_layout import apply as apply_cpu_layout

    settings = WorkerSettings.model_validate_json(args.settings)
    threads, cores = apply_cpu_layout(settings.num_threads, settings.cpu_affinity, settings.omp_num_threads)
    serve(settings, args.rank, args.world, args.init_method, at_point)
    log.info("rank %d stopped (%d threads, cores %s)", args.rank, threads, cores)
    return 0


def serve(
    settings, rank: int, world: int, init_method: str, at_point: Callable[[str], None] = _nothing
) -> None:
    """`at_point(name)` is called at each of START_UP_POINTS (a hook for the tests)."""
    import torch

    from services.gpu_worker.factory import resolve_device, resolve_dtype
    from services.gpu_worker.kv_cache import allocate_kv_cache
    from services.gpu_worker.model import DecoderModel
    from services.gpu_worker.tensor_parallel import load_rank
    from services.gpu_worker.tp_channel import recv_step
    from services.gpu_worker.tp_group import close_group, init_group, rank_device

    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    at_point("before-rendezvous")
    group = init_group(rank, world, init_method, rank_device(device, rank))
    model, num_blocks = load_rank(settings, Path(settings.model), group, dtype, DecoderModel)
    at_point("before-ready")
    kv_caches = allocate_kv_cache(model.shape, num_blocks, settings.block_size, dtype, group.device)
    group.barrier()  # rank 0's start-up ends here: this rank is ready
    logging.getLogger("services.gpu_worker.tp_follower").info(
        "rank %d of %d on %s: %d KV heads, %d KV blocks",
        rank,
        world,
        group.device,
        model.shape.num_kv_heads,
        num_blocks,
    )
    with torch.inference_mode():
        while (step := recv_step(group)) is not None:
            model.forward(*step, kv_caches)
    close_group(group)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
