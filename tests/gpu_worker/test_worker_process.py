"""The real worker process, driven over ZeroMQ by a test-side stand-in for the scheduler:
same tokens as the in-process engine, errors answered without dying, clean SIGTERM, and
clear start-up failures."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from shared import messages as m
from shared.figure_records import STARTUP_FAILURE_TTL_S
from shared.redis_protocol import read_status
from tests.gpu_worker.conftest import make_engine
from tests.gpu_worker.fake_scheduler import FakeScheduler, start_worker
from tests.gpu_worker.plan_driver import PlanDriver
from tests.gpu_worker.test_engine_vs_hf import random_prompts
from tests.stack import REPO


@pytest.fixture
def scheduler():
    s = FakeScheduler()
    yield s
    s.close()


@pytest.mark.slow
def test_worker_process_matches_in_process_engine(model_dirs, scheduler):
    model_dir = model_dirs["llama"]
    proc = start_worker(
        "--model",
        str(model_dir),
        "--scheduler-address",
        scheduler.address,
        "--device",
        "cpu",
        "--kv-cache-memory",
        "64MiB",
        "--worker-id",
        "w1",
    )
    try:
        reg = scheduler.recv()
        assert isinstance(reg, m.RegisterWorker)
        assert (reg.worker_id, reg.block_size, reg.model) == ("w1", 16, str(model_dir))
        assert reg.num_blocks > 0 and reg.max_model_len == 4096 and reg.pid == proc.pid

        # Garbage, then a plan naming an unknown request and one with an out-of-range
        # block: each gets an error result, and the worker keeps serving.
        scheduler.send_raw(b"\xc1 not msgpack")
        bad = scheduler.recv()
        assert isinstance(bad, m.StepResult) and "undecodable" in bad.error
        unknown = scheduler.execute(m.StepPlan(step_id=900, num_scheduled_tokens={"ghost": 1}))
        assert unknown.step_id == 900 and "ghost" in unknown.error
        out_of_range = scheduler.execute(
            m.StepPlan(
                step_id=901,
                new_requests=[
                    m.NewRequest("x", [5, 6, 7], 3, m.SamplingParams(temperature=0), [reg.num_blocks + 3])
                ],
                num_scheduled_tokens={"x": 3},
            )
        )
        assert "out of range" in out_of_range.error

        prompts = random_prompts(seed=11, vocab=reg.vocab_size, lengths=[3, 20, 47, 90])
        remote = PlanDriver(
            scheduler.execute, reg.block_size, reg.num_blocks, reg.eos_token_ids, chunk_size=17
        )
        engine, info = make_engine(model_dir)
        local = PlanDriver(
            engine.execute, info.block_size, info.num_blocks, info.eos_token_ids, chunk_size=17
        )
        for driver in (remote, local):
            for i, p in enumerate(prompts):
                driver.add(str(i), p, 8)
        assert remote.run() == local.run()
        assert all(r.timings.total_ms > 0 for r in remote.results if r.sampled_token_ids)

        proc.send_signal(signal.SIGTERM)
        leaving = scheduler.recv()
        assert isinstance(leaving, m.WorkerLeaving) and leaving.worker_id == "w1"
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_a_lost_plan_fails_the_wait_within_its_deadline(model_dirs, scheduler):
    """The helper's own guarantee, tested because it once hung a run: a plan the worker
    never receives (here sent to its heartbeat socket, which reads nothing) makes the wait
    raise TimeoutError at its deadline, although heartbeats keep arriving all along."""
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
        "w1",
        log=subprocess.DEVNULL,
    )
    try:
        assert isinstance(scheduler.recv(), m.RegisterWorker)
        assert isinstance(scheduler.recv(skip_heartbeats=False), m.Heartbeat)  # its socket is known now
        plan = m.StepPlan(
            1,
            [m.NewRequest("a", [5, 6, 7], 3, m.SamplingParams(temperature=0), [0])],
            num_scheduled_tokens={"a": 3},
        )
        scheduler.send_raw(m.encode(plan), identity=b"w1/heartbeat")
        beats, start = scheduler.heartbeats, time.monotonic()
        with pytest.raises(TimeoutError):
            scheduler.recv_until(lambda msg: isinstance(msg, m.StepResult), timeout_s=4)
        assert 4 <= time.monotonic() - start < 6
        assert scheduler.heartbeats > beats, "heartbeats were skipped, and the deadline still held"
        assert scheduler.execute(plan).error is None, "sent to the worker's own socket, the plan runs"
    finally:
        proc.kill()
        proc.wait()


def test_missing_model_directory_fails_clearly(tmp_path):
    proc = start_worker("--model", str(tmp_path / "nope"), "--device", "cpu")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "does not exist" in out and "nope" in out


def test_unsupported_architecture_fails_clearly(model_dirs, tmp_path):
    model_dir = tmp_path / "gpt2ish"
    shutil.copytree(model_dirs["llama"], model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (model_dir / "config.json").write_text(json.dumps(config))
    proc = start_worker("--model", str(model_dir), "--device", "cpu")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "unsupported architecture" in out and "GPT2LMHeadModel" in out and "LlamaForCausalLM" in out


def test_bad_flag_value_fails_clearly(model_dirs):
    proc = start_worker("--model", str(model_dirs["llama"]), "--block-size", "12")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "block_size" in out


def test_a_failure_to_start_is_one_line_and_recorded_in_redis(
    redis_server, redis_client, redis_keys, tmp_path
):
    """Compose restarts a worker that exits 2, so it also says why where the gateway and
    `conveyor status` read: for a model it cannot serve, and for settings that do not
    validate (then the environment alone says who it is and where Redis is)."""
    mamba = tmp_path / "mamba"
    mamba.mkdir()
    (mamba / "config.json").write_text(json.dumps({"architectures": ["MambaForCausalLM"]}))
    unreadable = tmp_path / "unreadable"
    shutil.copytree(mamba, unreadable)
    (unreadable / "config.json").chmod(0)
    cases = {
        "w-model": (["--model", str(mamba)], {}, "unsupported architecture ['MambaForCausalLM']"),
        "w-setting": ([], {"CONVEYOR_BLOCK_SIZE": "12"}, "block_size: "),
        "w-affinity": ([], {"CONVEYOR_CPU_AFFINITY": "4096"}, "cpu_affinity '4096' names cores"),
    }
    if os.geteuid() != 0:  # root reads any file
        cases["w-unreadable"] = (["--model", str(unreadable)], {}, "cannot read")
    for worker_id, (flags, env, words) in cases.items():
        proc = subprocess.run(
            [sys.executable, "-m", "services.gpu_worker", *flags],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            env=dict(
                os.environ,
                HF_HUB_OFFLINE="1",
                OMP_NUM_THREADS="1",
                REDIS_URL=redis_server.url,
                CONVEYOR_REDIS_PREFIX=redis_keys.prefix,
                CONVEYOR_WORKER_ID=worker_id,
                **env,
            ),
        )
        errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
        assert proc.returncode == 2 and len(errors) == 1 and words in errors[0], proc.stderr
    failures = read_status(redis_client, redis_keys).startup_failures
    assert set(failures) == set(cases)
    assert failures["w-model"].error.startswith(
        f"unsupported architecture ['MambaForCausalLM'] in {str(mamba)!r}"
    )
    assert 0 < redis_client.ttl(redis_keys.startup_failures) <= STARTUP_FAILURE_TTL_S
