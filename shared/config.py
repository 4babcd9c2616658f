"""Configuration of every service, in one typed place.

Each field is read from an environment variable (`CONVEYOR_<FIELD>`, except `REDIS_URL`)
and can be overridden by the matching command-line flag (`--<field-with-dashes>`).
pydantic-settings does the parsing, so a bad value fails at start-up naming the field.
"""

from __future__ import annotations

import os
import socket
from typing import Literal, Optional, TypeVar

from pydantic import ByteSize, Field, field_validator
from pydantic_settings import BaseSettings, CliApp, SettingsConfigDict


class _Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CONVEYOR_", cli_kebab_case=True, cli_implicit_flags=True, extra="ignore"
    )


class WorkerSettings(_Settings):
    model: Optional[str] = Field(
        None, description="Hugging Face model directory (default: the generated tiny model)"
    )
    scheduler_address: str = Field(
        "tcp://127.0.0.1:5555", description="ZeroMQ address where the scheduler listens for workers"
    )
    worker_id: str = Field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}",
        description="unique name of this worker (default: host-pid)",
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="weights and KV cache dtype (auto: float32 on CPU, bfloat16 on CUDA)"
    )
    block_size: int = Field(16, description="tokens per KV cache block (8, 16, 32, 64 or 128)")
    kv_cache_memory: ByteSize = Field(
        ByteSize(1 << 30), description="KV cache size on CPU, e.g. 512MiB or 2GiB"
    )
    gpu_memory_fraction: float = Field(
        0.85, gt=0, le=0.98, description="on CUDA: share of the memory free after loading weights for the KV cache"
    )
    max_model_len: Optional[int] = Field(
        None, gt=0, description="longest prompt + output in tokens (default: the model's max_position_embeddings)"
    )
    heartbeat_interval: float = Field(1.0, gt=0, description="seconds between heartbeats while idle")

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v not in (8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be one of 8, 16, 32, 64, 128 (got {v})")
        return v


S = TypeVar("S", bound=_Settings)


def parse_settings(cls: type[S], args: Optional[list[str]] = None) -> S:
    """Environment first, then flags from `args` (default: sys.argv[1:])."""
    return CliApp.run(cls, cli_args=args)
