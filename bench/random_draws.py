"""The random draws workloads are made of: lengths from a distribution, prompts of token
ids, Poisson arrivals. Each purpose draws from its own seeded stream (stream_rng), so the
same seed always gives the same requests and changing one draw never changes another.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

FIRST_ORDINARY_ID = 3  # 0-2 are <|endoftext|>, <|im_start|>, <|im_end|> in the tiny models


# ---- length distributions ------------------------------------------------------------------


@dataclass(frozen=True)
class LengthDist:
    """`fixed:N`, `uniform:LO:HI` (inclusive) or `lognormal:MEDIAN:SIGMA:LO:HI` (clipped)."""

    kind: str
    args: tuple[float, ...]

    @classmethod
    def parse(cls, spec: str) -> LengthDist:
        kind, *raw = spec.split(":")
        want = {"fixed": 1, "uniform": 2, "lognormal": 4}
        if kind not in want or len(raw) != want[kind]:
            raise ValueError(
                f"length distribution {spec!r}: expected fixed:N, uniform:LO:HI "
                "or lognormal:MEDIAN:SIGMA:LO:HI"
            )
        try:
            args = tuple(float(a) for a in raw)
        except ValueError:
            raise ValueError(
                f"length distribution {spec!r}: every field after the kind must be a number"
            ) from None
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


# ---- building blocks ---------------------------------------------------------------------


def stream_rng(seed: int, stream: str) -> np.random.Generator:
    """One independent generator per purpose, so changing arrivals never changes prompts."""
    return np.random.default_rng([seed, sum(ord(c) << (8 * i) for i, c in enumerate(stream))])


def random_prompts(rng: np.random.Generator, lengths: list[int], vocab_size: int) -> list[list[int]]:
    if vocab_size <= FIRST_ORDINARY_ID:
        raise ValueError(f"vocab_size must exceed {FIRST_ORDINARY_ID} (got {vocab_size})")
    return [rng.integers(FIRST_ORDINARY_ID, vocab_size, n).tolist() for n in lengths]


def poisson_arrivals(rng: np.random.Generator, n: int, rate: float | None) -> list[float]:
    """Offsets of a Poisson process at `rate` requests/s, the first at 0; all 0 if rate is None."""
    if rate is None or n == 0:
        return [0.0] * n
    if not rate > 0:
        raise ValueError(f"rate must be > 0 requests/s (got {rate})")
    gaps = rng.exponential(1.0 / rate, n)
    return (np.cumsum(gaps) - gaps[0]).tolist()
