"""The reference workloads of shared/BENCH.md, as lists of requests to replay.

Every request is a prompt of token ids (drawn from the model's vocabulary, special ids
0-2 excluded), an exact output length (`ignore_eos`) and an arrival offset in seconds.
The same name, size, rate and seed always give the same requests: `mixed` and
`mixed-online` share their prompts and lengths and differ only in arrivals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

FIRST_ORDINARY_ID = 3  # 0-2 are <|endoftext|>, <|im_start|>, <|im_end|> in the tiny models
NAMES = ("mixed", "mixed-online", "shared-prefix", "long-short")
# BENCH.md's sizes; `mixed` has 100 requests on the `small` model.
DEFAULT_REQUESTS = {"mixed": 400, "mixed-online": 400, "shared-prefix": 200, "long-short": 320}
SMALL_MODEL_REQUESTS = {"mixed": 100, "mixed-online": 100}
ONLINE_RATE_SHARE = 0.7  # mixed-online arrives at 70% of the measured offline request throughput


@dataclass(frozen=True)
class Request:
    prompt: list[int]
    max_tokens: int
    arrival: float  # seconds after the start of the run
    tag: str = ""  # "long" / "short" in long-short; empty elsewhere


@dataclass
class Workload:
    name: str
    requests: list[Request]
    params: dict = field(default_factory=dict)  # how it was drawn, for results.json

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(r.prompt) for r in self.requests)

    @property
    def output_tokens(self) -> int:
        return sum(r.max_tokens for r in self.requests)

    def only(self, tag: str) -> "Workload":
        """The requests tagged `tag`, at their original arrival times."""
        return Workload(f"{self.name}[{tag}]", [r for r in self.requests if r.tag == tag],
                        {**self.params, "only": tag})


# ---- length distributions ------------------------------------------------------------------

@dataclass(frozen=True)
class LengthDist:
    """`fixed:N`, `uniform:LO:HI` (inclusive) or `lognormal:MEDIAN:SIGMA:LO:HI` (clipped)."""

    kind: str
    args: tuple[float, ...]

    @classmethod
    def parse(cls, spec: str) -> "LengthDist":
        kind, *raw = spec.split(":")
        want = {"fixed": 1, "uniform": 2, "lognormal": 4}
        if kind not in want or len(raw) != want[kind]:
            raise ValueError(f"length distribution {spec!r}: expected fixed:N, uniform:LO:HI "
                             "or lognormal:MEDIAN:SIGMA:LO:HI")
        try:
            args = tuple(float(a) for a in raw)
        except ValueError:
            raise ValueError(f"length distribution {spec!r}: every field after the kind must be a number") from None
        lo = args[0] if kind != "lognormal" else args[2]
        hi = args[-1]
        if lo < 1 or hi < lo:
            raise ValueError(f"length distribution {spec!r}: lengths must satisfy 1 <= LO <= HI")
        return cls(kind, args)

    def sample(self, rng: np.random.Generator, n: int) -> list[int]:
        if self.kind == "fixed":
            return [int(self.args[0])] * n
        if self.kind == "uniform":
            lo, hi = int(self.args[0]), int(self.args[1])
            return rng.integers(lo, hi + 1, n).tolist()
        median, sigma, lo, hi = self.args
        draws = rng.lognormal(math.log(median), sigma, n)
        return np.clip(np.rint(draws), lo, hi).astype(int).tolist()

    def __str__(self) -> str:
        return ":".join([self.kind, *(f"{a:g}" for a in self.args)])


MIXED_PROMPT = LengthDist("uniform", (16, 256))
MIXED_OUTPUT = LengthDist("lognormal", (64, 1.0, 8, 1024))


# ---- building blocks ---------------------------------------------------------------------

def _rng(seed: int, stream: str) -> np.random.Generator:
    """One independent generator per purpose, so changing arrivals never changes prompts."""
    return np.random.default_rng([seed, sum(ord(c) << (8 * i) for i, c in enumerate(stream))])


def random_prompts(rng: np.random.Generator, lengths: list[int], vocab_size: int) -> list[list[int]]:
    if vocab_size <= FIRST_ORDINARY_ID:
        raise ValueError(f"vocab_size must exceed {FIRST_ORDINARY_ID} (got {vocab_size})")
    return [rng.integers(FIRST_ORDINARY_ID, vocab_size, n).tolist() for n in lengths]


def poisson_arrivals(rng: np.random.Generator, n: int, rate: Optional[float]) -> list[float]:
    """Offsets of a Poisson process at `rate` requests/s, the first at 0; all 0 if rate is None."""
    if rate is None or n == 0:
        return [0.0] * n
    if not rate > 0:
        raise ValueError(f"rate must be > 0 requests/s (got {rate})")
    gaps = rng.exponential(1.0 / rate, n)
    return (np.cumsum(gaps) - gaps[0]).tolist()


# ---- the workloads -------------------------------------------------------------------------

def custom(vocab_size: int, n: int, prompt_len: LengthDist, output_len: LengthDist,
           rate: Optional[float] = None, seed: int = 0, name: str = "custom") -> Workload:
    """`n` requests with independent prompt and output lengths; Poisson at `rate`, or all at t=0."""
    if n < 1:
        raise ValueError(f"requests must be >= 1 (got {n})")
    plens = prompt_len.sample(_rng(seed, "prompt-len"), n)
    olens = output_len.sample(_rng(seed, "output-len"), n)
    prompts = random_prompts(_rng(seed, "tokens"), plens, vocab_size)
    arrivals = poisson_arrivals(_rng(seed, "arrivals"), n, rate)
    reqs = [Request(p, o, a) for p, o, a in zip(prompts, olens, arrivals)]
    return Workload(name, reqs, dict(requests=n, prompt_len=str(prompt_len), output_len=str(output_len),
                                     rate=rate, seed=seed, vocab_size=vocab_size))


def mixed(vocab_size: int, n: int = 400, seed: int = 0) -> Workload:
    return custom(vocab_size, n, MIXED_PROMPT, MIXED_OUTPUT, None, seed, "mixed")


def mixed_online(vocab_size: int, rate: float, n: int = 400, seed: int = 0) -> Workload:
    if rate is None:
        raise ValueError("mixed-online needs a rate (about 70% of the measured offline request throughput)")
    return custom(vocab_size, n, MIXED_PROMPT, MIXED_OUTPUT, rate, seed, "mixed-online")


def shared_prefix(vocab_size: int, n: int = 200, prefix_len: int = 512, suffix_len: int = 32,
                  output_len: int = 32, seed: int = 0) -> Workload:
    """One system prefix shared by all, each with a unique suffix; all at t=0."""
    rng = _rng(seed, "tokens")
    prefix = random_prompts(rng, [prefix_len], vocab_size)[0]
    suffixes = random_prompts(rng, [suffix_len] * n, vocab_size)
    reqs = [Request(prefix + s, output_len, 0.0) for s in suffixes]
    return Workload("shared-prefix", reqs, dict(requests=n, prefix_len=prefix_len, suffix_len=suffix_len,
                                                output_len=output_len, seed=seed, vocab_size=vocab_size))


def ideal_prefix_hit_rate(workload: Workload, block_size: int = 16) -> float:
    """Share of prompt tokens a perfect prefix cache serves: every request but the first
    reuses the shared prefix's full blocks."""
    prefix_len = workload.params["prefix_len"]
    n = len(workload)
    return (n - 1) * (prefix_len // block_size) * block_size / workload.prompt_tokens


def long_short(vocab_size: int, rate: Optional[float], n: int = 320, seed: int = 0,
               long_io: tuple[int, int] = (2048, 512), short_io: tuple[int, int] = (64, 32)) -> Workload:
    """BENCH.md's 20 long among 300 short (the same 1:15 share when `n` scales it), in a
    random order, arriving as one Poisson stream (all at t=0 when `rate` is None)."""
    n_long = max(1, round(n * 20 / 320)) if n >= 2 else 0
    n_short = n - n_long
    order = _rng(seed, "order").permutation(n)
    is_long = np.zeros(n, dtype=bool)
    is_long[order[:n_long]] = True
    plens = [long_io[0] if lg else short_io[0] for lg in is_long]
    prompts = random_prompts(_rng(seed, "tokens"), plens, vocab_size)
    arrivals = poisson_arrivals(_rng(seed, "arrivals"), n, rate)
    reqs = [Request(p, long_io[1] if lg else short_io[1], a, "long" if lg else "short")
            for p, lg, a in zip(prompts, is_long, arrivals)]
    return Workload("long-short", reqs, dict(requests=n, long=n_long, short=n_short, long_io=list(long_io),
                                             short_io=list(short_io), rate=rate, seed=seed,
                                             vocab_size=vocab_size))


def build(name: str, vocab_size: int, n: Optional[int] = None, rate: Optional[float] = None,
          seed: int = 0, preset: str = "") -> Workload:
    """A BENCH.md workload by name; `n` scales it down (or up) for quick runs."""
    if name not in NAMES:
        raise ValueError(f"workload must be one of {', '.join(NAMES)} (got {name!r})")
    n = n or default_requests(name, preset)
    if n < 1:
        raise ValueError(f"requests must be >= 1 (got {n})")
    if name == "mixed":
        return mixed(vocab_size, n, seed)
    if name == "mixed-online":
        return mixed_online(vocab_size, rate, n, seed)
    if name == "shared-prefix":
        return shared_prefix(vocab_size, n, seed=seed)
    if rate is None:
        raise ValueError("long-short needs an arrival rate (requests/s)")
    return long_short(vocab_size, rate, n, seed)


def default_requests(name: str, preset: str = "") -> int:
    if preset == "small" and name in SMALL_MODEL_REQUESTS:
        return SMALL_MODEL_REQUESTS[name]
    return DEFAULT_REQUESTS[name]
