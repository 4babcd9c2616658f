"""What one request's timeline was, and the figures `vllm bench serve` reports from many.

Every system under test (Conveyor over HTTP, the Hugging Face baselines) fills one
`RequestRecord` per request, with times in seconds on one clock whose 0 is the start of
the run; `summarize` turns a list of them into throughputs and latency percentiles.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, field

import numpy as np

PERCENTILES = (50, 90, 99)
LATENCIES = ("ttft", "tpot", "itl", "e2e")


@dataclass
class RequestRecord:
    index: int  # position in the workload
    prompt_tokens: int
    max_tokens: int
    arrival: float  # when the workload says it arrives
    start: float = math.nan  # when it was sent (HTTP) or became eligible to run (baselines)
    first_token: float | None = None
    chunk_times: list[float] = field(default_factory=list)  # one per streamed chunk with output
    end: float | None = None
    output_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    tag: str = ""
    text: str = ""  # the streamed output (HTTP), to compare what two systems generated

    @property
    def ok(self) -> bool:
        return self.error is None and self.end is not None and self.first_token is not None

    @property
    def ttft(self) -> float:
        return self.first_token - self.start

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first; None for one-token outputs."""
        if self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        return np.diff(self.chunk_times).tolist() if len(self.chunk_times) > 1 else []

    def to_json(self) -> dict:
        return asdict(self)


def latency_values(records: list[RequestRecord]) -> dict[str, np.ndarray]:
    """Seconds, from the successful requests: one value per request (ITL: per gap)."""
    ok = [r for r in records if r.ok]
    return {
        "ttft": np.array([r.ttft for r in ok]),
        "tpot": np.array([t for r in ok if (t := r.tpot) is not None]),
        "itl": np.array([g for r in ok for g in r.itls]),
        "e2e": np.array([r.e2e for r in ok]),
    }


def stats_ms(values: np.ndarray) -> dict[str, float | None]:
    """mean/median/p90/p99 in milliseconds (linear interpolation, as numpy and vLLM do)."""
    if len(values) == 0:
        return {"mean": None, "median": None, **{f"p{p}": None for p in PERCENTILES}}
    ms = np.asarray(values) * 1000.0
    return {
        "mean": float(ms.mean()),
        "median": float(np.median(ms)),
        **{f"p{p}": float(np.percentile(ms, p)) for p in PERCENTILES},
    }


def summarize(records: list[RequestRecord], duration: float | None = None) -> dict:
    """The figures of one run. `duration` defaults to first start → last end."""
    ok = [r for r in records if r.ok]
    if duration is None:
        starts = [r.start for r in records if not math.isnan(r.start)]
        ends = [r.end for r in records if r.end is not None]
        duration = (max(ends) - min(starts)) if starts and ends else 0.0
    in_tok = sum(r.prompt_tokens for r in ok)
    out_tok = sum(r.output_tokens for r in ok)
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: 0.0)
    values = latency_values(records)
    return {
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "duration_s": duration,
        "total_input_tokens": in_tok,
        "total_output_tokens": out_tok,
        "request_throughput": per_s(len(ok)),
        "output_throughput": per_s(out_tok),
        "total_token_throughput": per_s(in_tok + out_tok),
        **{f"{name}_ms": stats_ms(values[name]) for name in LATENCIES},
        "errors": sorted({r.error for r in records if r.error})[:10],
    }


def short_table_row(name: str, s: dict) -> str:
    def ms(key: str, p: str) -> str:
        v = s[f"{key}_ms"][p]
        return "—" if v is None else f"{v:.0f}"

    return (
        f"| {name} | {s['completed']}/{s['completed'] + s['failed']} | {s['request_throughput']:.2f} | "
        f"{s['total_output_tokens']:,} | {s['output_throughput']:.0f} | {ms('ttft', 'median')} | "
        f"{ms('ttft', 'p99')} | {ms('tpot', 'median')} | {ms('tpot', 'p99')} | {ms('e2e', 'median')} | "
        f"{ms('e2e', 'p99')} |"
    )


TABLE_HEADER = (
    "| system | ok | req/s | out tokens | out tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms "
    "| TPOT p99 ms | E2E p50 ms | E2E p99 ms |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def progress_bar(total: int, desc: str):
    """A tqdm bar on stderr; plain (no redraw spam) when stderr is not a terminal."""
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="req",
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.5 if sys.stderr.isatty() else 10.0,
        leave=True,
    )
