"""Tensor parallelism, rank 0's side: the worker's own process is rank 0 and keeps the
whole Engine (rows, sampling, grammars, logprobs); ranks 1..N-1 are follower processes
(tp_follower.py) that only execute forward passes on their shards of the model.

  rank 0:  engine.execute -> LeaderModel.forward: broadcast inputs ─┬─> layers (all-reduce) -> LM head, sample
  rank r:  recv_step <──────────────────────────────────────────────┘   layers (all-reduce) -> discarded
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from kernels import get_attention_backend
from services.gpu_worker.kv_cache import num_blocks_in_budget
from services.gpu_worker.loader import load_config, load_model, model_shape, shard_model
from services.gpu_worker.model import DecoderModel
from services.gpu_worker.tp_channel import send_step, send_stop
from services.gpu_worker.tp_group import (
    Group,
    RankFailure,
    abort_group,
    check_devices,
    close_group,
    init_group,
    rank_device,
)
from shared.config import WorkerSettings
from shared.cpu_layout import allowed_cores, format_cores
from shared.cpu_layout import resolve as resolve_cpu_layout
from shared.models import ModelLoadError, max_model_len, read_config
from shared.ports import free_port

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]
# How a follower rank starts, before its flags (tests put a follower that dies on purpose here).
FOLLOWER_COMMAND = [sys.executable, "-m", "services.gpu_worker.tp_follower"]


def load_rank(
    settings: WorkerSettings, path: Path, group: Group, dtype: torch.dtype, cls: type[DecoderModel]
) -> tuple[DecoderModel, int]:
    """This rank's shard of the model, and the KV blocks every rank can hold: the fewest
    over the ranks, so that a block id means the same slots everywhere."""
    config = load_config(path)
    sharding = shard_model(config, model_shape(config), group.rank, group.world)
    model = load_model(
        path,
        group.device,
        dtype,
        get_attention_backend(group.device, settings.attention_backend),
        settings.linear_backend,
        sharding,
        group.all_reduce,
        cls,
        max_model_len(read_config(path), path, settings.max_model_len),
        settings.layer_ops,
    )
    # On CPU kv_cache_memory is the worker's: each rank takes its share.
    mine = num_blocks_in_budget(
        model.shape,
        settings.block_size,
        dtype,
        group.device,
        int(settings.kv_cache_memory) // group.world,
        settings.gpu_memory_fraction,
    )
    return model, group.min_int(mine)


class LeaderModel(DecoderModel):
    """Rank 0's shard: each forward pass first hands its inputs to the followers."""

    group: Group
    followers: Followers
    layout_before: RankLayout  # this process's threads and cores before it became rank 0

    def forward(self, input_ids, positions, meta, kv_caches):
        send_step(self.group, input_ids, positions, meta)
        try:
            return super().forward(input_ids, positions, meta, kv_caches)
        except RankFailure:
            raise
        except Exception as e:
            # NOTE: the followers may now wait in a collective rank 0 never joins, and would
            # take the next step's broadcast for it: no later step can be trusted.
            self.group.failed = True
            raise RankFailure(f"rank 0's forward failed mid-step, the ranks are out of step: {e!r}") from e

    def watch_ranks(self, on_failure: Callable[[str], None]) -> None:
        self.followers.watch(on_failure)

    def close(self) -> None:
        """Stops the followers: by a stop command while all are well, else by SIGKILL."""
        if self.followers.stopping:  # closed already
            return
        self.followers.stopping = True  # from here on a follower's exit is expected, not a death
        clean = not self.group.failed and self.followers.first_death() is None
        if clean:
            try:
                send_stop(self.group)
            except RankFailure as e:
                log.error("tensor-parallel stop: %s; killing the followers", e)
                clean = False
        # After a failure the live followers wait on rank 0 for nothing: kill them at once.
        if clean:
            self.followers.stop()
        else:
            self.followers.kill()
        close_group(self.group)
        _use_layout(self.layout_before)  # an in-process caller (tests, benchmarks) gets its threads back


class Followers:
    """The follower processes, watched until they are stopped: the first that exits unasked
    is `death`, reported once to the callback of `watch` (one that came too late for the
    death still gets it, at once). Until then a death is only logged."""

    def __init__(self, procs: list[subprocess.Popen]):
        self.procs = procs
        self.stopping = False
        self.death: str | None = None
        self._on_death: Callable[[str], None] = lambda reason: log.error("%s", reason)
        self._lock = threading.Lock()  # a death is handed to exactly one callback, the newest
        threading.Thread(target=self._watch, name="tp-followers", daemon=True).start()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def first_death(self, wait_s: float = 0.0) -> str | None:
        """Which follower has exited (waiting up to wait_s for one), or None."""
        deadline = time.monotonic() + wait_s
        while True:
            for rank, p in enumerate(self.procs, start=1):
                if p.poll() is not None:
                    return f"tensor-parallel rank {rank} (pid {p.pid}) exited with {p.returncode}"
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def watch(self, on_death: Callable[[str], None]) -> None:
        with self._lock:
            self._on_death, death = on_death, self.death
        if death is not None:
            on_death(death)
        else:  # it may have exited since the watcher last looked
            self._report_if_dead()

    def _watch(self) -> None:
        # One death is enough to end the worker: the watcher is done once it has one.
        while not self.stopping and not self._report_if_dead():
            time.sleep(0.1)

    def _report_if_dead(self) -> bool:
        with self._lock:
            if self.death is not None or self.stopping:
                return self.death is not None
            self.death, on_death = self.first_death(), self._on_death
        if self.death is not None:
            on_death(self.death)
        return self.death is not None

    def kill(self) -> None:
        self.stopping = True
        for p in self.procs:
            p.kill()
        self.stop()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Waits for the followers to exit (they were told to), killing any still there."""
        self.stopping = True
        for p in self.procs:
            try:
                p.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.error("tensor-parallel follower pid %d did not stop in %.0f s: killed", p.pid, timeout_s)
                p.kill()
                p.wait()


@dataclass(frozen=True)
class RankLayout:
    threads: int
    cores: list[int] | None  # None: unbound (fewer cores than ranks: they share)


def rank_layouts(threads: int, cores: list[int] | None, world: int) -> list[RankLayout]:
    """Each rank's share of the worker's threads and cores (None: unbound), in contiguous slices."""
    per_rank = max(1, threads // world)
    if cores is None or len(cores) < world:
        return [RankLayout(per_rank, None)] * world
    share, extra = divmod(len(cores), world)
    bounds = [r * share + min(r, extra) for r in range(world + 1)]
    return [RankLayout(per_rank, cores[bounds[r] : bounds[r + 1]]) for r in range(world)]


def share_out(settings: WorkerSettings, allowed: list[int], default_threads: int) -> list[RankLayout]:
    """Each rank's threads and cores: the worker's (`settings` as cpu_layout resolves them
    against the cores this process may use), shared out."""
    threads, cores = resolve_cpu_layout(
        settings.num_threads, settings.cpu_affinity, allowed, settings.omp_num_threads
    )
    return rank_layouts(threads or default_threads, cores, settings.tensor_parallel_size)


def start_tensor_parallel(
    settings: WorkerSettings, path: Path, device: torch.device, dtype: torch.dtype
) -> tuple[LeaderModel, int]:
    """Starts ranks 1..N-1, joins them as rank 0 and loads rank 0's shard; returns it with
    the number of KV blocks all ranks hold. Fails before starting anything when the model
    cannot be split N ways or the devices are not there."""
    world = settings.tensor_parallel_size
    config = load_config(path)
    shard_model(config, model_shape(config), 0, world)  # the ModelLoadError, before any process starts
    if device.type == "cuda":
        check_devices(device, world, torch.cuda.device_count())
    layouts = share_out(settings, allowed_cores(), torch.get_num_threads())
    before = RankLayout(torch.get_num_threads(), sorted(os.sched_getaffinity(0)))
    init_method = f"tcp://127.0.0.1:{free_port()}"
    # Spawned before rank 0 narrows itself to its share: a child inherits the cores it may bind to.
    followers = Followers(
        [_spawn(settings, path, rank, world, init_method, layouts[rank]) for rank in range(1, world)]
    )
    _use_layout(layouts[0])
    try:
        model, num_blocks = _join(settings, path, init_method, rank_device(device, 0), dtype, followers)
    except BaseException:  # undo everything, so that the caller may try again in this process
        _use_layout(before)
        raise
    model.followers, model.layout_before = followers, before
    log.info("tensor parallel over %d ranks (followers: pids %s)", world, followers.pids)
    return model, num_blocks


def _join(
    settings: WorkerSettings,
    path: Path,
    init_method: str,
    device: torch.device,
    dtype: torch.dtype,
    followers: Followers,
) -> tuple[LeaderModel, int]:
    """Rank 0's start-up: the rendezvous, its shard, then a barrier once every follower holds
    its KV cache. A follower that dies on the way fails it at once with ModelLoadError (it
    would otherwise hold rank 0 in a collective: on NCCL for ever), the followers killed."""
    group: Group | None = None

    def abort_start(reason: str) -> None:  # from the watcher's thread
        log.error("%s while the ranks were starting", reason)
        if group is not None:
            abort_group(group)

    def check() -> None:
        if (death := followers.first_death()) is not None:
            raise ModelLoadError(f"{death} before joining the tensor-parallel group (its log says why)")

    followers.watch(abort_start)
    try:
        group = init_group(0, settings.tensor_parallel_size, init_method, device, check)
        model, num_blocks = load_rank(settings, path, group, dtype, LeaderModel)
        assert isinstance(model, LeaderModel)  # load_model builds `cls`, or a subclass of it (Gemma 3)
        group.barrier()  # the followers' KV caches are allocated: an OOM there fails the start-up here
    except BaseException as e:
        # gloo's collective raises as the peer's connection closes, maybe before it is reaped
        death = followers.death or followers.first_death(wait_s=2.0 if isinstance(e, RankFailure) else 0.0)
        followers.kill()
        if group is not None:
            close_group(group)
        if death is not None and not isinstance(e, ModelLoadError):
            raise ModelLoadError(f"tensor-parallel start-up failed: {death} (its log says why)") from e
        raise
    followers.watch(lambda reason: log.error("%s", reason))  # until the worker watches the ranks
    model.group = group
    return model, num_blocks


def _use_layout(layout: RankLayout) -> None:
    # NOTE: OpenMP threads inherit the main thread's binding when they start, so this binds
    # rank 0's pool only if no parallel op has run yet (the worker process: none has).
    if layout.cores is not None:
        os.sched_setaffinity(0, layout.cores)
    torch.set_num_threads(layout.threads)


def _spawn(
    settings: WorkerSettings, path: Path, rank: int, world: int, init_method: str, layout: RankLayout
) -> subprocess.Popen:
    cores = format_cores(layout.cores) if layout.cores is not None else "none"
    # The command line is public (ps): the followers never talk to the scheduler or Redis, so no
    # keys and no Redis URL (it may hold a password).
    rank_settings = settings.model_copy(
        update=dict(
            model=str(path),
            num_threads=layout.threads,
            cpu_affinity=cores,
            zmq_server_public_key=None,
            zmq_client_secret_key=None,
            redis_url=None,
        )
    )
    cmd = [
        *FOLLOWER_COMMAND,
        "--rank",
        str(rank),
        "--world",
        str(world),
        "--init-method",
        init_method,
        "--parent-pid",
        str(os.getpid()),
        "--settings",
        rank_settings.model_dump_json(),
    ]
    return subprocess.Popen(cmd, cwd=REPO)  # its log lines go where the worker's go
