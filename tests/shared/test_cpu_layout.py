"""The worker's thread layout: which cores it computes on by default, what the settings
accept, and that a real worker process ends up bound where they say."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from pydantic import ValidationError

from conveyor.tiny_model import make_model
from shared import cpu_layout
from shared.config import RunSettings, WorkerSettings
from tests.stack import REPO, service_env


def test_the_first_core_is_left_to_the_serving_processes():
    assert cpu_layout.compute_cores([0]) == [0]
    assert cpu_layout.compute_cores([0, 1]) == [1]
    assert cpu_layout.compute_cores([0, 1, 2, 3]) == [1, 2, 3]
    assert cpu_layout.compute_cores(list(range(16))) == list(range(2, 16))
    assert cpu_layout.compute_cores([4, 6, 9]) == [6, 9], "a cpuset: the cores allowed, not 0..n"


def test_local_workers_share_the_compute_cores_without_overlap():
    assert cpu_layout.split_cores(list(range(8)), 2) == [[1, 2, 3, 4], [5, 6, 7]]
    assert cpu_layout.split_cores(list(range(16)), 3) == [
        [2, 3, 4, 5, 6],
        [7, 8, 9, 10, 11],
        [12, 13, 14, 15],
    ]
    # More workers than compute cores: one core each, from the last, before any doubles up.
    assert cpu_layout.split_cores([0, 1], 2) == [[1], [0]]
    assert cpu_layout.split_cores([0, 1], 3) == [[1], [0], [1]]


def test_resolve_auto_none_and_lists():
    allowed = [0, 1, 2, 3]
    assert cpu_layout.resolve(None, "auto", allowed, None) == (3, [1, 2, 3])
    assert cpu_layout.resolve(2, "auto", allowed, None) == (2, [1, 2, 3])
    assert cpu_layout.resolve(4, "auto", allowed, None) == (4, [0, 1, 2, 3]), "no core can be spared"
    assert cpu_layout.resolve(None, "auto", allowed, "1") == (None, None), "OMP_NUM_THREADS already chose"
    assert cpu_layout.resolve(2, "auto", allowed, "1") == (2, [1, 2, 3])
    assert cpu_layout.resolve(None, "none", allowed, None) == (None, None)
    assert cpu_layout.resolve(3, "none", allowed, None) == (3, None)
    assert cpu_layout.resolve(None, "0,2-3", allowed, None) == (3, [0, 2, 3])
    with pytest.raises(ValueError, match=r"cores \[7\] this process may not use \(allowed: 0,1,2,3\)"):
        cpu_layout.resolve(None, "2,7", allowed, None)


@pytest.mark.parametrize("bad", ["", "x", "1-", "3-1", "-2", "1,,2"])
def test_a_malformed_core_list_is_refused_naming_the_setting(bad):
    with pytest.raises(ValidationError, match="cpu_affinity"):
        WorkerSettings(cpu_affinity=bad)
    with pytest.raises(ValidationError, match="cpu_affinity"):
        RunSettings(cpu_affinity=bad)
    with pytest.raises(ValidationError, match="num_threads"):
        WorkerSettings(num_threads=0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("model"), preset="tiny", num_hidden_layers=1, seed=3)


def _worker(model_dir, *flags: str) -> subprocess.Popen:
    env = service_env(CONVEYOR_MODEL=str(model_dir), CONVEYOR_SCHEDULER_ADDRESS="tcp://127.0.0.1:9")
    env.pop("OMP_NUM_THREADS")
    return subprocess.Popen(
        [sys.executable, "-m", "services.gpu_worker", *flags],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_a_worker_binds_its_compute_threads_before_loading_the_model(model_dir):
    core = cpu_layout.allowed_cores()[-1]
    proc = _worker(model_dir, "--cpu-affinity", str(core), "--num-threads", "1")
    try:
        deadline = time.monotonic() + 120
        for line in proc.stdout:
            if "compute threads" in line:
                break
            assert time.monotonic() < deadline and proc.poll() is None
        assert f"1 compute threads, bound to cores {core}" in line
        assert sorted(os.sched_getaffinity(proc.pid)) == [core]
    finally:
        proc.kill()
        proc.wait()


def test_a_worker_refuses_cores_it_may_not_use(model_dir):
    proc = _worker(model_dir, "--cpu-affinity", "4096")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "cannot start: cpu_affinity '4096' names cores [4096] this process may not use" in out
