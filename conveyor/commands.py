"""The command of each service: the single definition used by the local launcher and
mirrored by docker-compose.yml (a test checks the two agree)."""

from __future__ import annotations

SERVICE_MODULES = {
    "scheduler": "services.scheduler",
    "gpu_worker": "services.gpu_worker",
    "gateway": "services.gateway",
}


def service_command(service: str, python: str = "python") -> list[str]:
    """How `service` is started; configuration travels in environment variables."""
    return [python, "-m", SERVICE_MODULES[service]]
