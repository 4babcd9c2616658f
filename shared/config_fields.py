"""Field types, aliases and help texts that several services' settings share (shared/config.py),
each checked as it is read: a bad value fails at start-up naming the field.
"""

from __future__ import annotations

import os
import socket
from typing import Annotated, Literal

from pydantic import AfterValidator, AliasChoices, Field

from shared.cpu_layout import AUTO, NONE, parse_cores


def check_cpu_affinity(v: str) -> str:
    """auto, none or a core list (ValueError naming the spec otherwise)."""
    v = v.strip().lower()
    if v not in (AUTO, NONE):
        parse_cores(v)
    return v


CpuAffinity = Annotated[str, AfterValidator(check_cpu_affinity)]


def check_speculative_config(v: str | None) -> str | None:
    """vLLM's --speculative-config JSON, unchanged (ValueError naming the key otherwise)."""
    from shared.speculative import parse_config

    parse_config(v)
    return v


SpeculativeConfigText = Annotated[str | None, AfterValidator(check_speculative_config)]
SPECULATIVE_CONFIG_HELP = (
    'speculative decoding, as vLLM\'s JSON: {"method": "ngram", "num_speculative_tokens": k, '
    '"prompt_lookup_max": n, "prompt_lookup_min": m} or {"method": "draft_model", "model": DIR, '
    '"num_speculative_tokens": k} (default: off; shared/speculative.py)'
)

OTLP_TRACES_HELP = (
    "OpenTelemetry: export request traces by OTLP to this endpoint, e.g. http://collector:4317 "
    "(vLLM's flag; otlp_traces_protocol http/protobuf for OTLP over HTTP; default: no tracing)"
)
# OpenTelemetry's own variable, as vLLM reads it (so not CONVEYOR_-prefixed), or the flag.
OTLP_PROTOCOL_ALIAS = AliasChoices("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "otlp_traces_protocol")
OtlpTracesProtocol = Annotated[
    Literal["grpc", "http/protobuf"],
    Field(
        default="grpc",
        validation_alias=OTLP_PROTOCOL_ALIAS,
        description="how traces go to otlp_traces_endpoint: grpc or http/protobuf "
        "(env: OTEL_EXPORTER_OTLP_TRACES_PROTOCOL, OpenTelemetry's own variable)",
    ),
]

# Redis's usual variable (not CONVEYOR_-prefixed), or the flag.
REDIS_URL_ALIAS = AliasChoices("REDIS_URL", "redis_url")


def default_worker_id() -> str:
    """A worker's name when none is given: host-pid."""
    return f"{socket.gethostname()}-{os.getpid()}"
