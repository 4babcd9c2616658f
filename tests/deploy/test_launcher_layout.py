"""What `make run` hands each service: every worker its own cores, and the tensor-parallel
size to the workers alone (a unit test of the launcher's plan; nothing is started)."""

from __future__ import annotations

from conveyor.launcher import Launcher
from shared import cpu_layout
from shared.config import RunSettings, WorkerSettings


def _plan(**settings) -> dict[str, dict[str, str]]:
    children = Launcher(RunSettings(**settings))._children({"PATH": "/bin"})
    return {c.name: c.env for c in children}


def test_the_tensor_parallel_size_goes_to_every_worker_and_nowhere_else(monkeypatch):
    plan = _plan(workers=2, tensor_parallel_size=2)
    assert list(plan) == ["scheduler", "worker-0", "worker-1", "gateway"]
    for name in ("worker-0", "worker-1"):
        assert plan[name]["CONVEYOR_TENSOR_PARALLEL_SIZE"] == "2"
        assert plan[name]["CONVEYOR_WORKER_ID"] == name
    assert "CONVEYOR_TENSOR_PARALLEL_SIZE" not in plan["scheduler"] | plan["gateway"]
    # The worker reads it as its own setting.
    monkeypatch.setenv("CONVEYOR_TENSOR_PARALLEL_SIZE", plan["worker-0"]["CONVEYOR_TENSOR_PARALLEL_SIZE"])
    assert WorkerSettings().tensor_parallel_size == 2


def test_unset_the_workers_keep_their_default_and_split_the_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    plan = _plan(workers=2)
    assert all("CONVEYOR_TENSOR_PARALLEL_SIZE" not in env for env in plan.values())
    expected = [cpu_layout.format_cores(c) for c in cpu_layout.split_cores(cpu_layout.allowed_cores(), 2)]
    assert [plan[f"worker-{i}"]["CONVEYOR_CPU_AFFINITY"] for i in range(2)] == expected


def test_the_tokenizer_and_reasoning_parser_reach_the_services(monkeypatch):
    """`make run RUN_ARGS="--tokenizer DIR --reasoning-parser qwen3"`: the services read them
    as their own settings."""
    from shared.config import GatewaySettings

    spec = '{"method": "ngram", "num_speculative_tokens": 3}'
    passed = Launcher(
        RunSettings(tokenizer="/models/tok", reasoning_parser="qwen3", speculative_config=spec)
    )._passed_on()
    assert passed == {
        "CONVEYOR_TOKENIZER": "/models/tok",
        "CONVEYOR_REASONING_PARSER": "qwen3",
        "CONVEYOR_SPECULATIVE_CONFIG": spec,
    }
    assert Launcher(RunSettings())._passed_on() == {}
    for name, value in passed.items():
        monkeypatch.setenv(name, value)
    gateway, worker = GatewaySettings(), WorkerSettings()
    assert (gateway.tokenizer, gateway.reasoning_parser, worker.tokenizer) == (
        "/models/tok",
        "qwen3",
        "/models/tok",
    )
