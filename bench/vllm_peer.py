"""The benchmark's peer: vLLM's CPU build serving the same model directory, with its own
defaults (thread binding, scheduler limits) except what BENCH.md fixes: fp32 and the same
context length as Conveyor. Installed on first use into its own venv (bench/vllm_install.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from bench.client import run_workload
from bench.metrics import RequestRecord
from bench.server import LocalServer, warm_up
from bench.workloads import Workload
from bench.vllm_install import ensure_installed, tcmalloc_path

# The first start compiles the model with torch.compile (~80 s on 2 cores; cached after).
VLLM_START_TIMEOUT_S = 900.0
KV_CACHE_GIB = 1  # as Conveyor's default kv_cache_memory


def model_max_len(model_dir: Path) -> int:
    """Conveyor's default max_model_len: the model's max_position_embeddings."""
    return int(json.loads((model_dir / "config.json").read_text())["max_position_embeddings"])


class LocalVLLM(LocalServer):
    """`python -m vllm.entrypoints.openai.api_server` (the `vllm` script cannot find its own
    package metadata in this venv) on a free port, serving `model_dir` under `served_name`."""

    name = "vLLM"

    def __init__(self, model_dir: Path, log_path: Path, venv: Optional[Path] = None,
                 dtype: str = "float32", max_model_len: Optional[int] = None):
        super().__init__(log_path, VLLM_START_TIMEOUT_S)
        self.python = ensure_installed(venv)
        self.venv = self.python.parent.parent
        self.model_dir, self.dtype = model_dir, dtype
        self.max_model_len = max_model_len or model_max_len(model_dir)
        self.served_name = model_dir.name

    def command(self) -> list[str]:
        return [str(self.python), "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1",
                "--port", str(self.port), "--model", str(self.model_dir), "--served-model-name", self.served_name,
                "--dtype", self.dtype, "--max-model-len", str(self.max_model_len)]

    def env(self) -> dict[str, str]:
        env = {**super().env(), "VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GIB),
               "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
        # Our shell's thread settings are Conveyor's business, not vLLM's: it binds its own.
        for name in ("OMP_NUM_THREADS", "CONVEYOR_NUM_THREADS", "CONVEYOR_CPU_AFFINITY"):
            env.pop(name, None)
        env["LD_PRELOAD"] = ":".join(filter(None, [*map(str, self.preload()), env.get("LD_PRELOAD", "")]))
        return env

    def preload(self) -> list[Path]:
        """What vLLM's CPU install guide preloads ("for best performance", it warns without):
        tcmalloc, and Intel's OpenMP runtime, which vllm-cpu installs into its venv."""
        iomp = self.venv / "lib" / "libiomp5.so"
        return [p for p in (tcmalloc_path(self.venv), iomp if iomp.is_file() else None) if p is not None]


class VLLMPeer:
    """The peer as bench.series runs it: the same client and warm-up as Conveyor's."""

    def __init__(self, server: LocalVLLM, progress: bool = True):
        self.server, self.progress = server, progress

    def run(self, workload: Workload, desc: str = "") -> tuple[list[RequestRecord], dict]:
        warm_up(self.server.url, self.server.served_name)
        return run_workload(self.server.url, workload, self.server.served_name, progress=self.progress,
                            desc=desc or f"vLLM {workload.name}"), {}

    def cpu_seconds(self) -> dict[str, float]:
        return self.server.cpu_seconds()
