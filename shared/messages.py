"""Every message that crosses a process boundary, as typed msgpack structs (no pickle):
msgspec checks each field while decoding, so a malformed message fails at the socket with
a `DecodeError` naming the field. One name means one thing everywhere (`request_id`,
`block_ids`, `num_computed_tokens`, `token_ids`).
"""

from __future__ import annotations

import enum
from typing import TypeAlias

import msgspec


class _StrEnum(str, enum.Enum):
    """A str enum whose str() is its value (Python 3.11's str() of a mixed-in enum is
    'Class.MEMBER'), so labels, f-strings and JSON all see the wire spelling."""

    _value_: str

    def __str__(self) -> str:
        return self.value


class FinishReason(_StrEnum):
    """Why a request ended, as OpenAI's `finish_reason` spells it."""

    STOP = "stop"  # EOS or a stop token id (a stop string is the gateway's)
    LENGTH = "length"  # max_tokens or the longest sequence the worker can hold
    ABORT = "abort"  # client gone, stop string matched in the gateway, deadline
    ERROR = "error"  # see RequestOutput.error_code


class ErrorCode(_StrEnum):
    """Why a request ended with an error. The gateway maps each to an HTTP status in one
    table (services/gateway/errors.py); the free-text `error` is for people only."""

    TOO_LONG = "too_long"  # more tokens than any worker can hold: the client's fault (400)
    INVALID_REQUEST = "invalid_request"  # refused by the scheduler (empty prompt, duplicate id): 400
    QUEUE_TIMEOUT = "queue_timeout"  # not scheduled within its queue timeout: overloaded (503)
    REQUEST_TIMEOUT = "request_timeout"  # not finished within the request timeout (504)
    GATEWAY_GONE = "gateway_gone"  # the gateway that accepted it went away
    WORKER_FAILED = "worker_failed"  # the worker failed it repeatedly (500)
    INTERNAL = "internal"  # anything else (500)


class RequestStatus(_StrEnum):
    """A request's state as the scheduler publishes it in Redis (`status` field)."""

    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"
    ERROR = "error"

    @property
    def is_final(self) -> bool:
        return self in (RequestStatus.FINISHED, RequestStatus.ERROR)


class StructuredOutput(msgspec.Struct, frozen=True, omit_defaults=True):
    """A constraint on a request's output, enforced in the worker's sampler by a per-request
    token mask (xgrammar). `kind` and what `spec` holds:
      json_schema: the schema as JSON text       json_object: any JSON object ("")
      regex: the pattern (the whole output matches it)
      choice: a JSON list of strings (the output is one of them)
      grammar: an EBNF grammar, as xgrammar and vLLM read it (root rule `root`)
    The gateway checks it compiles (a 400 otherwise); the worker compiles it again, cached."""

    kind: str
    spec: str = ""
    any_whitespace: bool = False  # JSON kinds: allow any whitespace between tokens, else compact JSON
    # A model that thinks first (the gateway's reasoning parser): the grammar applies from the
    # token after `think_end` (</think>'s id) on; before it the output is free. `think_open`
    # (<think>'s id), where the output may or may not open with the thinking: the first token
    # may be it (and the grammar then waits for think_end) or the grammar's. -1: neither.
    think_end: int = -1
    think_open: int = -1


class SamplingParams(msgspec.Struct, frozen=True, omit_defaults=True):
    """How one request picks its next token; defaults are the OpenAI API's. `temperature == 0`
    is greedy; `top_k <= 0` and `top_p == 1` disable those filters. `logprobs` N: the sampled
    token's logprob and the N most likely alternatives (None: no logprobs). The masks apply
    before any of that, in this order: logit_bias (added to the raw logits), allowed_token_ids
    (every other id -inf), bad_words (a sequence's last id -inf wherever the output ends
    with the rest of it), structured (the grammar's mask). `prompt_logprobs` N: each prompt
    token's logprob (from the first token on; the first has none) and N alternatives."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    logprobs: int | None = None
    logit_bias: dict[int, float] = {}
    allowed_token_ids: list[int] | None = None
    bad_words: list[list[int]] = []  # token id sequences, as vLLM's bad_words tokenized
    structured: StructuredOutput | None = None
    prompt_logprobs: int | None = None


# ---- scheduler -> worker: one step ------------------------------------------------------
class NewRequest(msgspec.Struct, frozen=True):
    """A request the worker has no row for yet (first schedule, or resumed after a
    preemption or a migration). `token_ids`: the prompt (the first `num_prompt_tokens`),
    then the tokens generated so far; `num_computed_tokens` of them sit in the cache already
    (a prefix-cache hit). Presence and frequency penalties count only generated tokens."""

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    sampling: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int = 0


class CachedRequest(msgspec.Struct, frozen=True):
    """A request the worker already holds: blocks appended since the last step, and how
    many of its tokens are in the cache before this step (the worker checks it agrees)."""

    request_id: str
    new_block_ids: list[int]
    num_computed_tokens: int


class StepPlan(msgspec.Struct, frozen=True, tag="step_plan"):
    """One iteration for one worker, as deltas against the rows it keeps. `finished_ids` rows
    (finished, aborted, preempted, migrated) are dropped first. `num_scheduled_tokens` is a
    prefill chunk or 1 for a decode; a request that reaches the end of its tokens samples."""

    step_id: int
    new_requests: list[NewRequest] = []
    cached_requests: list[CachedRequest] = []
    num_scheduled_tokens: dict[str, int] = {}
    finished_ids: list[str] = []
    # Speculative decoding: tokens proposed to follow a decoding request's last one. Its
    # num_scheduled_tokens counts them (1 + len): the worker verifies them all in this one
    # forward pass and answers with those it accepts (StepResult.accepted_token_ids).
    draft_token_ids: dict[str, list[int]] = {}
    # With the worker's draft model (RegisterWorker.draft_model): how many tokens it drafts
    # after a decoding request's last one, then verifies as above; num_scheduled_tokens
    # counts them too, and StepResult.draft_token_ids says which they were.
    num_draft_tokens: dict[str, int] = {}


# ---- worker -> scheduler ----------------------------------------------------------------
class TokenLogprobs(msgspec.Struct, frozen=True, array_like=True):
    """The sampled token's log-probability and the top alternatives (id, logprob)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = []


class PromptLogprobs(msgspec.Struct, frozen=True, array_like=True):
    """Prompt tokens' logprobs computed in one step (a prefill chunk): `entries[k]` is for
    the prompt token at position `start + k` (start >= 1: the first prompt token has none)."""

    start: int
    entries: list[TokenLogprobs]


class StepTimings(msgspec.Struct, frozen=True):
    """Where a step's time went, worker-side, in wall time with the device's work included
    (a CUDA device is synchronized before each reading: gpu_worker/device_clock.py); the
    scheduler publishes the means per worker."""

    prepare_ms: float = 0.0
    forward_ms: float = 0.0
    sample_ms: float = 0.0
    total_ms: float = 0.0
    draft_ms: float = 0.0  # of total_ms: the draft model's passes (speculative decoding)
    draft_passes: int = 0


class StepResult(msgspec.Struct, frozen=True, tag="step_result"):
    """What one step produced: a sampled token per request that reached the end of its
    tokens (those mid-way through a chunked prefill are absent), or an error: nothing of an
    invalid plan was applied; after a failed forward pass the plan's rows were dropped and
    must come again as new requests. Either way the worker keeps serving."""

    step_id: int
    worker_id: str
    sampled_token_ids: dict[str, int] = {}
    logprobs: dict[str, TokenLogprobs] = {}
    # Rows verified with drafts: the accepted leading drafts, which come before the row's
    # sampled token (the one the model chose where a draft was rejected, or after them all),
    # and their logprobs where asked. Its cache then holds 1 + len(accepted) more tokens.
    accepted_token_ids: dict[str, list[int]] = {}
    accepted_logprobs: dict[str, list[TokenLogprobs]] = {}
    draft_token_ids: dict[str, list[int]] = {}  # what its draft model proposed (StepPlan.num_draft_tokens)
    prompt_logprobs: dict[str, PromptLogprobs] = {}  # rows whose sampling asks for them
    timings: StepTimings = StepTimings()
    error: str | None = None


class RegisterWorker(msgspec.Struct, frozen=True, tag="register_worker"):
    """A worker's first message: what it serves and how much KV cache it has."""

    worker_id: str
    model: str
    max_model_len: int
    block_size: int
    num_blocks: int
    vocab_size: int
    eos_token_ids: list[int]
    device: str
    pid: int
    # The kernels its steps run on, by part ({"attention": "cpu", "layer_ops": "cpu", "linear":
    # "onednn", "dtype": "float32"}), and each part of a step that runs a slower path than its
    # backend's fast one, saying which op, which shape and why: never a silent fallback.
    backends: dict[str, str] = {}
    slow_paths: list[str] = []
    draft_model: str = ""  # the draft model it proposes tokens with (speculative decoding), "" for none


class Heartbeat(msgspec.Struct, frozen=True, tag="heartbeat"):
    worker_id: str
    sent_at: float


class WorkerLeaving(msgspec.Struct, frozen=True, tag="worker_leaving"):
    """Sent on SIGTERM after the last step: the scheduler requeues anything left."""

    worker_id: str
    reason: str = "shutdown"


class Reregister(msgspec.Struct, frozen=True, tag="reregister"):
    """Scheduler -> worker it does not know (e.g. after a scheduler restart): drop every
    row and register again."""

    reason: str = ""


# ---- gateway -> scheduler, through the Redis request stream --------------------------------
class SubmitRequest(msgspec.Struct, frozen=True, tag="submit"):
    """A validated, tokenized request. `reply_to` is the ZMQ address where the gateway
    that accepted it listens for its outputs. Lower `priority` runs first (as in vLLM)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    reply_to: str
    arrival_time: float
    priority: int = 0
    cache_salt: str | None = None
    queue_timeout_s: float | None = None  # not scheduled by then: it ends with an error
    traceparent: str = ""  # W3C trace context when the gateway traces it (shared/tracing.py)


class AbortRequest(msgspec.Struct, frozen=True, tag="abort"):
    """Stop a request at the next step and free its blocks (client gone, stop string hit)."""

    request_id: str
    reason: str = "abort"


# ---- scheduler -> gateway ----------------------------------------------------------------
class Usage(msgspec.Struct, frozen=True):
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


class RequestOutput(msgspec.Struct, frozen=True):
    """New tokens of one request since its last output. A final output carries
    `finish_reason` and `usage`; an error carries `error_code` (what the gateway acts on)
    and `error` (what a person reads)."""

    request_id: str
    token_ids: list[int] = []
    logprobs: list[TokenLogprobs] = []
    # Position of token_ids[0] among the request's generated tokens. A restarted scheduler
    # replays a request from its prompt; the gateway drops what it already forwarded.
    index: int = 0
    finish_reason: FinishReason | None = None
    stop_token_id: int | None = None
    usage: Usage | None = None
    error_code: ErrorCode | None = None
    error: str | None = None
    queue_time_s: float | None = None  # on the first output: arrival -> first scheduled
    # With sampling.prompt_logprobs, on the first output: one entry per prompt token from
    # the second on (positions 1 .. P-1), computed over the whole prompt (no prefix-cache hit).
    prompt_logprobs: list[TokenLogprobs] = []


class GatewayOutputs(msgspec.Struct, frozen=True, tag="outputs"):
    """All outputs for one gateway from one pass of the scheduler's loop, in one message: the
    tokens of every step whose result the pass took (several workers' steps, or none), and
    the finishes of requests aborted, expired or refused since the pass before."""

    outputs: list[RequestOutput]


Message: TypeAlias = (
    StepPlan
    | StepResult
    | RegisterWorker
    | Heartbeat
    | WorkerLeaving
    | Reregister
    | SubmitRequest
    | AbortRequest
    | GatewayOutputs
)

_encoder = msgspec.msgpack.Encoder()
# Typed by hand: mypy cannot infer a Decoder's type from a union (it would be Decoder[Any]).
_decoder: msgspec.msgpack.Decoder[Message] = msgspec.msgpack.Decoder(Message)


def encode(message: Message) -> bytes:
    return _encoder.encode(message)


def decode(data: bytes) -> Message:
    """Decode one message; raises `msgspec.DecodeError` (a `ValueError`) naming the
    offending field when `data` is not a well-formed Conveyor message."""
    return _decoder.decode(data)


DecodeError = msgspec.DecodeError
