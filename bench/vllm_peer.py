"""The benchmark's peer: vLLM's CPU build serving the same model directory, with its own
defaults (thread binding, scheduler limits) except what BENCH.md fixes: fp32 and the same
context length as Conveyor. Installed on first use into its own venv (bench/vllm_install.py).

Its fastest configuration (BENCH.md): tcmalloc preloaded always; Intel's OpenMP (libiomp5)
preloaded too or not (`iomp`). vLLM's CPU guide preloads both, but on this project's
machines tcmalloc alone ran `mixed` on tiny at 2,010-2,200 output tok/s against about
1,600 with libiomp5 as well, so the default is off; `--peer-iomp on` measures the other.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.client import run_workload
from bench.metrics import RequestRecord
from bench.server import LocalServer, warm_up
from bench.vllm_install import ensure_installed, tcmalloc_path
from bench.workloads import Workload

# The first start compiles the model with torch.compile (~80 s on 2 cores; cached after).
VLLM_START_TIMEOUT_S = 900.0
KV_CACHE_GIB = 1  # as Conveyor's default kv_cache_memory
IOMP_CHOICES = ("off", "on", "auto")  # auto: when the venv has it
DEFAULT_IOMP = "off"  # the faster here (BENCH.md)


def model_max_len(model_dir: Path) -> int:
    """Conveyor's default max_model_len: the model's max_position_embeddings."""
    return int(json.loads((model_dir / "config.json").read_text())["max_position_embeddings"])


class LocalVLLM(LocalServer):
    """`python -m vllm.entrypoints.openai.api_server` (the `vllm` script cannot find its own
    package metadata in this venv) on a free port, serving `model_dir` under `served_name`."""

    name = "vLLM"

    def __init__(
        self,
        model_dir: Path,
        log_path: Path,
        venv: Path | None = None,
        dtype: str = "float32",
        max_model_len: int | None = None,
        iomp: str = DEFAULT_IOMP,
        extra_env: dict[str, str] | None = None,
        extra_args: list[str] | None = None,
    ):
        if iomp not in IOMP_CHOICES:
            raise ValueError(f"iomp must be one of {', '.join(IOMP_CHOICES)} (got {iomp!r})")
        super().__init__(log_path, VLLM_START_TIMEOUT_S)
        self.python = ensure_installed(venv)
        self.venv, self.iomp = self.python.parent.parent, iomp
        self.model_dir, self.dtype = model_dir, dtype
        self.max_model_len = max_model_len or model_max_len(model_dir)
        self.served_name = model_dir.name
        # Other configurations to try (thread binding, data parallelism): recorded in settings().
        self.extra_env, self.extra_args = dict(extra_env or {}), list(extra_args or [])

    def command(self) -> list[str]:
        return [
            str(self.python),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--model",
            str(self.model_dir),
            "--served-model-name",
            self.served_name,
            "--dtype",
            self.dtype,
            "--max-model-len",
            str(self.max_model_len),
            *self.extra_args,
        ]

    def env(self) -> dict[str, str]:
        env = {
            **super().env(),
            "VLLM_HOST_IP": "127.0.0.1",
            "VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GIB),
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
        }
        # Our shell's thread settings are Conveyor's business, not vLLM's: it binds its own.
        for name in ("OMP_NUM_THREADS", "CONVEYOR_NUM_THREADS", "CONVEYOR_CPU_AFFINITY"):
            env.pop(name, None)
        env["LD_PRELOAD"] = ":".join(filter(None, [*map(str, self.preload()), env.get("LD_PRELOAD", "")]))
        return {**env, **self.extra_env}

    def preload(self) -> list[Path]:
        """What vLLM's CPU install guide preloads ("for best performance", it warns without):
        tcmalloc, and (with `iomp` on, or auto and present) Intel's OpenMP runtime, which
        vllm-cpu installs into its venv."""
        return preloads(self.venv, self.iomp)

    def settings(self) -> dict:
        """What results.json records of the peer's set-up."""
        return {
            "command": self.command(),
            "LD_PRELOAD": self.env()["LD_PRELOAD"],
            "iomp": self.iomp,
            "preloaded": [p.name for p in self.preload()],
            "extra_env": self.extra_env,
            "extra_args": self.extra_args,
        }


def preloads(venv: Path, iomp: str = DEFAULT_IOMP) -> list[Path]:
    """The libraries to preload into vLLM: tcmalloc, then libiomp5 as `iomp` says."""
    found = tcmalloc_path(venv)
    if found is None:
        raise RuntimeError(
            f"no tcmalloc in {venv}/tcmalloc: BENCH.md's peer runs with it preloaded "
            "(python -m bench.vllm_install unpacks it)"
        )
    out = [found]
    lib = venv / "lib" / "libiomp5.so"
    if iomp == "on" and not lib.is_file():
        raise RuntimeError(f"--peer-iomp on: {lib} is missing (vllm-cpu installs it)")
    if iomp == "on" or (iomp == "auto" and lib.is_file()):
        out.append(lib)
    return out


class VLLMPeer:
    """The peer as bench.series runs it: the same client and warm-up as Conveyor's."""

    def __init__(self, server: LocalVLLM, progress: bool = True):
        self.server, self.progress = server, progress

    def run(self, workload: Workload, desc: str = "") -> tuple[list[RequestRecord], dict]:
        warm_up(self.server.url, self.server.served_name, workload.uses_chat_api)
        return run_workload(
            self.server.url,
            workload,
            self.server.served_name,
            progress=self.progress,
            desc=desc or f"vLLM {workload.name}",
        ), {}

    def cpu_seconds(self) -> dict[str, float]:
        return self.server.cpu_seconds()
