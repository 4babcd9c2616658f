"""A tensor-parallel rank that dies takes its worker down cleanly and promptly: in process,
the next step raises RankFailure (never a step error the scheduler would retry here); as a
worker process, a killed follower makes the worker say WorkerLeaving and exit non-zero, and
a killed rank 0 leaves no follower behind. A follower that dies while the worker starts
fails the start-up at once."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from services.gpu_worker import tensor_parallel
from services.gpu_worker.factory import create_engine
from services.gpu_worker.tp_follower import START_UP_POINTS
from services.gpu_worker.tp_group import RankFailure
from services.gpu_worker.worker import Worker
from shared import messages as m
from shared.models import ModelLoadError
from tests.gpu_worker.fake_scheduler import FakeScheduler, start_worker
from tests.gpu_worker.plan_driver import PlanDriver
from tests.gpu_worker.test_tensor_parallel import tp_settings

GREEDY = m.SamplingParams(temperature=0)


def _wait(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_a_dead_follower_is_a_rank_failure_not_a_bad_step(model_dirs):
    engine, info = create_engine(tp_settings(model_dirs["llama"]))
    deaths = []
    engine.model.watch_ranks(deaths.append)
    try:
        driver = PlanDriver(engine.execute, info.block_size, info.num_blocks, info.eos_token_ids)
        driver.add("a", [5, 6, 7], 4)
        driver.step()
        follower = engine.model.followers.procs[0]
        follower.kill()
        follower.wait(timeout=10)
        with pytest.raises(RankFailure, match="peer rank is gone"):
            driver.step()
        _wait(lambda: deaths, 10, "the follower's death was not reported")  # the watcher polls every 0.1 s
        assert "rank 1" in deaths[0] and str(follower.pid) in deaths[0]
    finally:
        engine.close()


def _followers_of_this_process() -> list[psutil.Process]:
    """Follower processes this test process started (and nothing else: the session's Redis
    is a child of it too)."""
    alive = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "tp_follower" in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.mark.parametrize("point", START_UP_POINTS)
def test_a_follower_dying_at_start_up_fails_the_start_up_at_once(model_dirs, monkeypatch, point):
    """Before the rendezvous rank 0 would wait 5 minutes for it; after loading (an OOM in its
    KV cache) rank 0 would start and, on NCCL, block for ever in its first step."""
    monkeypatch.setattr(
        tensor_parallel,
        "FOLLOWER_COMMAND",
        [sys.executable, "-m", "tests.gpu_worker.dying_tp_follower", point],
    )
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match=r"tensor-parallel rank 1 \(pid \d+\) exited with 3"):
        create_engine(tp_settings(model_dirs["llama"]))
    assert time.monotonic() - start < 60, "start-up waited for the dead follower"
    assert not _followers_of_this_process(), "the start-up left a follower behind"


def test_a_follower_dead_before_the_worker_watches_is_reported_at_once(model_dirs):
    engine, _ = create_engine(tp_settings(model_dirs["llama"]))
    try:
        follower = engine.model.followers.procs[0]
        follower.kill()
        follower.wait(timeout=10)
        time.sleep(0.3)  # the follower watcher has seen it, with no one to tell yet
        deaths = []
        engine.model.watch_ranks(deaths.append)
        assert len(deaths) == 1 and "rank 1" in deaths[0]
        time.sleep(0.3)
        assert len(deaths) == 1, "one death is reported once"
    finally:
        engine.close()


def test_a_worker_stops_heartbeating_once_a_rank_died_while_its_step_hangs(model_dirs):
    """NCCL's case, which gloo cannot produce (its collectives raise on a dead peer): the
    watcher reports a death while the step waits for ever. Here the step waits on a frozen
    follower and the test reports the death as the watcher would."""
    engine, info = create_engine(tp_settings(model_dirs["llama"]))
    scheduler = FakeScheduler()
    worker = Worker(engine, info, scheduler.address, heartbeat_interval=0.05)
    serving = threading.Thread(target=worker.serve, daemon=True)
    follower = psutil.Process(engine.model.followers.pids[0])
    try:
        serving.start()
        assert isinstance(scheduler.recv(timeout_s=30), m.RegisterWorker)
        follower.suspend()
        plan = m.StepPlan(1, [m.NewRequest("a", [5, 6, 7, 8], 4, GREEDY, [1])], num_scheduled_tokens={"a": 4})
        scheduler.send_raw(m.encode(plan))  # rank 0 now waits in an all-reduce for the frozen follower
        time.sleep(0.5)
        worker._rank_died("tensor-parallel rank 1 (pid 0) exited with -9")
        with contextlib.suppress(TimeoutError):  # beats sent before it may still be queued
            for _ in range(20):
                scheduler.recv(timeout_s=0.3, skip_heartbeats=False)
        with pytest.raises(TimeoutError):
            scheduler.recv(timeout_s=1.0, skip_heartbeats=False)
    finally:
        follower.resume()
    leaving = scheduler.recv_until(lambda msg: isinstance(msg, m.WorkerLeaving), timeout_s=20)[-1]
    assert "tensor-parallel rank failed" in leaving.reason
    serving.join(timeout=10)
    engine.close()
    scheduler.close()


@pytest.fixture
def tp_worker(model_dirs):
    """(fake scheduler, worker process, its follower's psutil.Process, registration)."""
    scheduler = FakeScheduler()
    proc = start_worker(
        "--model",
        str(model_dirs["llama"]),
        "--scheduler-address",
        scheduler.address,
        "--device",
        "cpu",
        "--kv-cache-memory",
        "16MiB",
        "--worker-id",
        "tp",
        "--tensor-parallel-size",
        "2",
        log=subprocess.DEVNULL,
    )
    followers: list[psutil.Process] = []
    try:
        reg = scheduler.recv(timeout_s=120)
        assert isinstance(reg, m.RegisterWorker) and reg.pid == proc.pid
        followers = psutil.Process(proc.pid).children()
        assert len(followers) == 1 and "tp_follower" in " ".join(followers[0].cmdline())
        yield scheduler, proc, followers[0], reg
    finally:
        # Nothing of this worker may outlive the test, and nothing else may be touched: the
        # session's Redis is a child of this process too.
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for p in followers:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        scheduler.close()


def _one_step(scheduler: FakeScheduler, step_id: int, rid: str) -> m.StepResult:
    plan = m.StepPlan(
        step_id, [m.NewRequest(rid, [5, 6, 7, 8], 4, GREEDY, [step_id])], num_scheduled_tokens={rid: 4}
    )
    return scheduler.execute(plan, timeout_s=60)


@pytest.mark.slow
def test_a_killed_follower_makes_the_worker_leave(tp_worker):
    scheduler, proc, follower, _ = tp_worker
    assert _one_step(scheduler, 1, "a").sampled_token_ids.keys() == {"a"}
    follower.send_signal(signal.SIGKILL)
    leaving = scheduler.recv(timeout_s=30)
    assert isinstance(leaving, m.WorkerLeaving) and leaving.worker_id == "tp"
    assert "tensor-parallel rank failed" in leaving.reason and "rank 1" in leaving.reason
    assert proc.wait(timeout=30) == 1


@pytest.mark.slow
def test_a_killed_follower_mid_step_makes_the_worker_leave(tp_worker):
    """The step in flight gets no result (it cannot be trusted), only WorkerLeaving."""
    scheduler, proc, follower, _ = tp_worker
    follower.suspend()  # holds the next step inside its collectives until it is killed
    plan = m.StepPlan(1, [m.NewRequest("a", [5, 6, 7, 8], 4, GREEDY, [1])], num_scheduled_tokens={"a": 4})
    scheduler.send_raw(m.encode(plan))
    time.sleep(0.5)
    follower.kill()
    leaving = scheduler.recv(timeout_s=30)
    assert isinstance(leaving, m.WorkerLeaving), leaving
    assert proc.wait(timeout=30) == 1


@pytest.mark.slow
def test_followers_exit_when_rank_0_is_killed(tp_worker):
    scheduler, proc, follower, _ = tp_worker
    assert _one_step(scheduler, 1, "a").error is None
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    follower.wait(timeout=10)  # psutil.TimeoutExpired if it lingers


@pytest.mark.slow
def test_sigterm_stops_every_rank(tp_worker):
    scheduler, proc, follower, _ = tp_worker
    proc.send_signal(signal.SIGTERM)
    leaving = scheduler.recv(timeout_s=30)
    assert isinstance(leaving, m.WorkerLeaving) and leaving.reason == "shutdown"
    assert proc.wait(timeout=30) == 0
    follower.wait(
        timeout=10
    )  # rank 0 reaped it: its exit status is rank 0's to read (it checks 0 in-process)
    assert not follower.is_running()
