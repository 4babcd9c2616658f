"""The compose files validate offline against the compose spec, each service runs the very
command the local launcher runs, and the `monitoring` profile's Prometheus and Grafana are
provisioned from the repo's files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from conveyor.commands import SERVICE_MODULES, service_command
from shared.config import WorkerSettings, parse_settings

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
GPU = REPO / "docker-compose.gpu.yml"


def _compose(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_compose_files_validate_against_the_compose_spec():
    checker = Path(sys.executable).with_name("check-jsonschema")
    proc = subprocess.run(
        [str(checker), "--builtin-schema", "vendor.compose-spec", str(COMPOSE), str(GPU)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_each_service_runs_the_launchers_command():
    services = {name: s for name, s in _compose(COMPOSE)["services"].items() if "profiles" not in s}
    assert set(SERVICE_MODULES) | {"redis"} == set(services)
    for name in SERVICE_MODULES:
        assert services[name]["command"] == service_command(name, "python"), name


def test_workers_scale_and_redis_persists():
    services = _compose(COMPOSE)["services"]
    worker = services["gpu_worker"]
    assert "container_name" not in worker and "ports" not in worker, "--scale gpu_worker=N needs neither"
    assert worker["environment"]["CONVEYOR_SCHEDULER_ADDRESS"] == "tcp://scheduler:5555"
    command = services["redis"]["command"]
    # Every accepted request on disk before the gateway answers (docs/durability.md).
    for flag, value in (
        ("--appendonly", "yes"),
        ("--appendfsync", "always"),
        ("--maxmemory-policy", "noeviction"),
    ):
        assert command[command.index(flag) + 1] == value, command
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"])
    for name in ("redis", "scheduler", "gateway"):
        assert "healthcheck" in services[name], name
    assert services["gateway"]["environment"]["CONVEYOR_OUTPUT_ADVERTISE"] == "tcp://{hostname}:5556"


def test_workers_take_the_thread_layout_from_the_environment(monkeypatch):
    env = _compose(COMPOSE)["services"]["gpu_worker"]["environment"]
    assert env["CONVEYOR_CPU_AFFINITY"] == "${CONVEYOR_CPU_AFFINITY:-auto}"
    assert env["CONVEYOR_NUM_THREADS"] == "${CONVEYOR_NUM_THREADS:-}"  # empty: unset (env_ignore_empty)
    # Compose passes an unset variable as "": the worker must take its own default then.
    monkeypatch.setenv("CONVEYOR_NUM_THREADS", "")
    monkeypatch.setenv("CONVEYOR_CPU_AFFINITY", "auto")
    settings = parse_settings(WorkerSettings, [])
    assert settings.cpu_affinity == "auto" and settings.num_threads is None


def test_gpu_override_gives_workers_the_nvidia_device():
    worker = _compose(GPU)["services"]["gpu_worker"]
    device = worker["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert worker["environment"]["CONVEYOR_DEVICE"] == "cuda"
    # One GPU per tensor-parallel rank, the same variable the worker reads its size from.
    tp = "${CONVEYOR_TENSOR_PARALLEL_SIZE:-1}"
    assert device["count"] == tp
    assert _compose(COMPOSE)["services"]["gpu_worker"]["environment"]["CONVEYOR_TENSOR_PARALLEL_SIZE"] == tp
    assert worker["shm_size"] == "1gb"  # NCCL's shared-memory transport


def test_dockerfile_installs_the_project_and_ships_every_package():
    text = (REPO / "Dockerfile").read_text()
    for package in ("shared", "services", "kernels", "conveyor"):
        assert f"COPY {package} ./{package}" in text
    assert "pip install" in text


def test_the_monitoring_profile_scrapes_the_gateways_and_provisions_grafana():
    services = _compose(COMPOSE)["services"]
    prometheus, grafana = services["prometheus"], services["grafana"]
    assert prometheus["profiles"] == ["monitoring"] and grafana["profiles"] == ["monitoring"], (
        "a plain `docker compose up` starts neither"
    )
    mounts = {}
    for service in (prometheus, grafana):
        for volume in service["volumes"]:
            source, target = volume.split(":")[:2]
            if source.startswith("./"):
                assert (REPO / source).exists(), volume
                mounts[target] = REPO / source
    config = yaml.safe_load(mounts["/etc/prometheus/prometheus.yml"].read_text())
    target = config["scrape_configs"][0]["dns_sd_configs"][0]
    assert target["names"] == ["gateway"] and target["port"] == 8000, "every gateway replica, on its port"
    assert services["gateway"]["environment"]["CONVEYOR_PORT"] == "8000"

    provisioning = mounts["/etc/grafana/provisioning"]
    source = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert source["url"] == "http://prometheus:9090" and source["isDefault"]
    provider = yaml.safe_load((provisioning / "dashboards" / "conveyor.yml").read_text())["providers"][0]
    dashboards = mounts[provider["options"]["path"]]
    assert (dashboards / "conveyor.json").exists(), (
        "the provider reads the folder the dashboards are mounted at"
    )
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == provider["options"]["path"] + "/conveyor.json"
