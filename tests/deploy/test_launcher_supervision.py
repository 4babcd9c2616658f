"""How `python -m conveyor run` (what `make run` runs) treats a service that exits: one that
cannot start as configured (exit code 2) stops everything within seconds with its message
and exit code 2; one that crashes is restarted, as compose would."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared.embedded_redis import free_port
from shared.redis_protocol import read_status
from shared.tiny_model import make_model
from tests.stack import REPO, service_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("model"), preset="tiny", num_hidden_layers=1, seed=3)


def _run(tmp_path: Path, model: Path, redis_url: str, prefix: str) -> tuple[subprocess.Popen, Path]:
    env = service_env(CONVEYOR_MODEL=str(model), CONVEYOR_PORT=str(free_port()), REDIS_URL=redis_url,
                      CONVEYOR_REDIS_PREFIX=prefix, CONVEYOR_CACHE_DIR=str(tmp_path / "cache"),
                      CONVEYOR_SCHEDULER_ADDRESS=f"tcp://127.0.0.1:{free_port()}", CONVEYOR_WORKERS="1")
    log_path = tmp_path / "run.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "conveyor", "run"], cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log_path


def _pids(text: str, name: str) -> list[int]:
    return [int(pid) for pid in re.findall(rf"started {name} \(pid (\d+)\)", text)]


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"  # a zombie has exited
    except FileNotFoundError:
        return True


def test_a_worker_that_cannot_start_stops_run_with_its_message(tmp_path, tiny_model, redis_server, redis_client,
                                                              redis_keys):
    model = tmp_path / "mamba"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["MambaForCausalLM"]
    (model / "config.json").write_text(json.dumps(config))
    start = time.monotonic()
    proc, log_path = _run(tmp_path, model, redis_server.url, redis_keys.prefix)
    try:
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    took = time.monotonic() - start
    text = log_path.read_text()
    assert code == 2 and took < 30, (code, took, text[-3000:])
    # The launcher quotes the worker's message last, after its own log has scrolled past.
    said = text.split("worker-0 cannot start as configured (exit code 2):\n", 1)[1]
    assert "unsupported architecture ['MambaForCausalLM']" in said.splitlines()[0], text[-3000:]
    assert "restarting" not in text and "all processes stopped" in text
    assert all(_gone(pid) for name in ("scheduler", "worker-0", "gateway") for pid in _pids(text, name))
    # Also recorded where the gateway and `conveyor status` read (what compose relies on).
    assert "unsupported architecture" in read_status(redis_client, redis_keys).startup_failures["worker-0"].error


def test_a_crashed_worker_is_restarted(tmp_path, tiny_model, redis_server, redis_keys):
    proc, log_path = _run(tmp_path, tiny_model, redis_server.url, redis_keys.prefix)
    try:
        deadline = time.monotonic() + 60
        while not _pids(log_path.read_text(), "worker-0"):
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.1)
        first = _pids(log_path.read_text(), "worker-0")[0]
        os.kill(first, signal.SIGKILL)  # a crash, whatever it was doing
        deadline = time.monotonic() + 30
        while len(_pids(log_path.read_text(), "worker-0")) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.1)
        text = log_path.read_text()
        assert "worker-0 exited with code -9; restarting in 0.5 s" in text
        assert _pids(text, "worker-0")[1] != first and proc.poll() is None
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal
        code = proc.wait(timeout=90)
    assert code == 0, log_path.read_text()[-3000:]
