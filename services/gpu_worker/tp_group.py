"""One process's membership of a tensor-parallel worker: its torch.distributed group
(NCCL on CUDA, gloo on CPU) and the collectives the model and the step channel use, each
turning a peer's failure into RankFailure so that nobody mistakes it for a bad step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import urlparse

import torch
import torch.distributed as dist

from shared.models import ModelLoadError

# Rendezvous of the ranks: a rank that never shows up (hung while starting) ends the wait
# after this long; one that died ends it at once (init_group's `check`). Loading weights
# happens after it, so it need not cover that.
STARTUP_TIMEOUT = timedelta(minutes=5)
# NOTE: a follower waits in a collective for the next step for as long as the worker is
# idle, so the step group's timeout must never fire; a DEAD peer is still seen at once on
# gloo, which raises as soon as the peer's TCP connection closes. NCCL does not notice: there
# rank 0's follower watcher aborts the group (abort_group), and followers die with rank 0
# by PR_SET_PDEATHSIG.
IDLE_TIMEOUT = timedelta(days=365)
_JOINED = "conveyor/joined"  # rendezvous counter: followers that reached init_process_group


class RankFailure(RuntimeError):
    """A collective failed: a peer rank died or its connection broke. The model can no
    longer run; the worker must leave."""


@dataclass
class Group:
    rank: int
    world: int
    device: torch.device
    pg: dist.ProcessGroup
    failed: bool = False  # a collective raised: the peers are out of step for good
    aborted: bool = False

    def all_reduce(self, t: torch.Tensor) -> None:
        self._collective("all_reduce", lambda: dist.all_reduce(t, group=self.pg))

    def broadcast(self, t: torch.Tensor) -> None:
        """From rank 0 to the others, in place."""
        self._collective("broadcast", lambda: dist.broadcast(t, src=0, group=self.pg))

    def min_int(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        self._collective("all_reduce MIN", lambda: dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.pg))
        return int(t.item())

    def barrier(self) -> None:
        """Waits for every rank; a collective like the others, so a dead peer raises RankFailure."""
        self.min_int(0)

    def _collective(self, name: str, run) -> None:
        assert not self.failed, "a failed tensor-parallel group cannot run collectives"
        try:
            run()
        except RuntimeError as e:  # DistBackendError and gloo's "Connection closed by peer"
            self.failed = True
            raise RankFailure(f"rank {self.rank}: {name} failed, a peer rank is gone: {e}") from e


def check_devices(device: torch.device, world: int, device_count: int) -> None:
    """ModelLoadError unless the `world` devices from `device` on exist (rank_device's)."""
    if device.type != "cuda":
        return
    first, last = device.index or 0, (device.index or 0) + world - 1
    if last >= device_count:
        raise ModelLoadError(
            f"tensor_parallel_size {world} on cuda:{first} needs cuda:{first}..cuda:{last}, "
            f"but this host has {device_count} CUDA device(s): lower --tensor-parallel-size "
            f"or choose an earlier --device"
        )


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r computes on the r-th device after the worker's own (cuda:2 -> cuda:2+r); on CPU
    every rank is on the CPU."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + rank)


def init_group(
    rank: int, world: int, init_method: str, device: torch.device, check: Callable[[], None] = lambda: None
) -> Group:
    """Joins the group of `world` ranks that meet at `init_method` (tcp://host:port, rank 0's).
    Rank 0 calls `check` while it waits for the others: it raises to give the wait up."""
    assert not dist.is_initialized(), "one tensor-parallel model per process: close the other first"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    url = urlparse(init_method)
    assert url.hostname is not None and url.port is not None, f"{init_method!r} is not tcp://host:port"
    store = dist.TCPStore(
        url.hostname, url.port, world, is_master=rank == 0, timeout=STARTUP_TIMEOUT, wait_for_workers=False
    )
    if rank == 0:
        _wait_for_followers(store, world, check)
    else:
        store.add(_JOINED, 1)
    # NOTE: a follower that dies between joining and init_process_group still holds rank 0
    # for STARTUP_TIMEOUT (gloo waits for its address); that window is milliseconds.
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=STARTUP_TIMEOUT)
    return Group(rank, world, device, dist.new_group(timeout=IDLE_TIMEOUT))


def _wait_for_followers(store: dist.TCPStore, world: int, check: Callable[[], None]) -> None:
    # Polled rather than one blocking wait, which a follower dead before joining (a bad
    # device, a crash on import) would make last STARTUP_TIMEOUT.
    deadline = time.monotonic() + STARTUP_TIMEOUT.total_seconds()
    while (joined := store.add(_JOINED, 0)) < world - 1:
        check()
        if time.monotonic() > deadline:
            raise ModelLoadError(
                f"only {joined} of the {world - 1} tensor-parallel followers joined within {STARTUP_TIMEOUT}"
            )
        time.sleep(0.05)


def abort_group(group: Group) -> None:
    """Ends the collectives pending on this rank with an error, from any thread: NCCL's only
    way out of waiting for a dead peer (gloo's collectives raise by themselves)."""
    group.failed = True
    if group.device.type == "cuda" and not group.aborted:
        group.aborted = True
        group.pg.abort()


def close_group(group: Group) -> None:
    """Leaves the group; after a failure too (gloo drops its connections without asking the
    peers; NCCL is aborted first, as its destroy would wait for a dead peer's collectives),
    so that an in-process caller can start another tensor-parallel model."""
    if group.failed:
        abort_group(group)
    dist.destroy_process_group()
