"""One process's membership of a tensor-parallel worker: its torch.distributed group
(NCCL on CUDA, gloo on CPU) and the collectives the model and the step channel use, each
turning a peer's failure into RankFailure so that nobody mistakes it for a bad step.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# Rendezvous of the ranks: a rank that never shows up (it died while starting) ends the
# wait after this long. Loading weights happens after it, so it need not cover that.
STARTUP_TIMEOUT = timedelta(minutes=5)
# NOTE: a follower waits in a collective for the next step for as long as the worker is
# idle, so the step group's timeout must never fire; a DEAD peer is still seen at once,
# because gloo raises as soon as the peer's TCP connection closes (NCCL: see the worker's
# watchdog, and followers die with rank 0 by PR_SET_PDEATHSIG).
IDLE_TIMEOUT = timedelta(days=365)


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

    def all_reduce(self, t: torch.Tensor) -> None:
        self._collective("all_reduce", lambda: dist.all_reduce(t, group=self.pg))

    def broadcast(self, t: torch.Tensor) -> None:
        """From rank 0 to the others, in place."""
        self._collective("broadcast", lambda: dist.broadcast(t, src=0, group=self.pg))

    def min_int(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        self._collective("all_reduce MIN", lambda: dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.pg))
        return int(t.item())

    def _collective(self, name: str, run) -> None:
        assert not self.failed, "a failed tensor-parallel group cannot run collectives"
        try:
            run()
        except RuntimeError as e:  # DistBackendError and gloo's "Connection closed by peer"
            self.failed = True
            raise RankFailure(f"rank {self.rank}: {name} failed, a peer rank is gone: {e}") from e


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r computes on the r-th device after the worker's own (cuda:2 -> cuda:2+r); on CPU
    every rank is on the CPU."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + rank)


def init_group(rank: int, world: int, init_method: str, device: torch.device) -> Group:
    """Joins the group of `world` ranks that meet at `init_method` (tcp://host:port, rank 0's)."""
    assert not dist.is_initialized(), "one tensor-parallel model per process: close the other first"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world, timeout=STARTUP_TIMEOUT)
    return Group(rank, world, device, dist.new_group(timeout=IDLE_TIMEOUT))


def close_group(group: Group) -> None:
    """Leaves the group; after a failure too (gloo drops its connections without asking the
    peers), so that an in-process caller can start another tensor-parallel model."""
    dist.destroy_process_group()
