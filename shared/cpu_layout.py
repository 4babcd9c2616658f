"""Which cores a worker computes on and with how many torch threads.

On a small machine the worker's OpenMP threads otherwise fight the gateway, the scheduler
and Redis for the same cores (a full run's steps were 40-60% slower than alone). So, as
vLLM's CPU build does, the default leaves the first core(s) to the serving processes and
binds the worker's threads, one per core, to the rest. The launcher and the worker share it.
"""

from __future__ import annotations

import os

AUTO, NONE = "auto", "none"


def allowed_cores() -> list[int]:
    """The cores this process may run on (a container's cpuset, taskset), in order."""
    return sorted(os.sched_getaffinity(0))


def reserved_count(n: int) -> int:
    """Cores left to the gateway, the scheduler and Redis: one up to 8 cores, then two;
    none when there is a single core."""
    return 0 if n <= 1 else 1 if n <= 8 else 2


def compute_cores(allowed: list[int]) -> list[int]:
    """The default cores of the workers on this machine: all but the first reserved ones."""
    return allowed[reserved_count(len(allowed)) :]


def split_cores(allowed: list[int], workers: int) -> list[list[int]]:
    """The default cores of each of `workers` local workers: the compute cores in contiguous
    shares; with more workers than compute cores, one core each, counted from the last."""
    assert workers >= 1 and allowed
    cores = compute_cores(allowed)
    if workers > len(cores):
        return [[allowed[-1 - (i % len(allowed))]] for i in range(workers)]
    share, extra = divmod(len(cores), workers)
    out, start = [], 0
    for i in range(workers):
        end = start + share + (1 if i < extra else 0)
        out.append(cores[start:end])
        start = end
    return out


def parse_cores(spec: str) -> list[int]:
    """'3', '0,2' or '2-5,7' -> sorted core ids; ValueError naming the spec when malformed."""
    cores: set[int] = set()
    try:
        for part in spec.split(","):
            lo, dash, hi = part.strip().partition("-")
            first, last = int(lo), int(hi if dash else lo)
            if first < 0 or last < first:
                raise ValueError
            cores.update(range(first, last + 1))
    except ValueError:
        raise ValueError(
            f"cpu_affinity must be 'auto', 'none' or a core list such as '1' or '0,2-3' (got {spec!r})"
        ) from None
    return sorted(cores)


def format_cores(cores: list[int]) -> str:
    return ",".join(map(str, cores))


def resolve(
    num_threads: int | None, cpu_affinity: str, allowed: list[int], omp_num_threads: str | None
) -> tuple[int | None, list[int] | None]:
    """(threads, cores to bind to or None) for the settings given.

    auto: the compute cores, one thread each (all cores for more threads); unless
    OMP_NUM_THREADS is set and num_threads is not, when the environment has already chosen
    (tests, a user's shell): its thread count, no binding. none: no binding, num_threads or
    OMP/torch's default (None).
    """
    if cpu_affinity == NONE:
        return num_threads, None
    if cpu_affinity == AUTO:
        if num_threads is None and omp_num_threads:
            return None, None
        cores = compute_cores(allowed)
        if num_threads is not None and num_threads > len(cores):
            cores = allowed  # more threads than the compute cores: none can be left free
    else:
        cores = parse_cores(cpu_affinity)
        outside = sorted(set(cores) - set(allowed))
        if outside:
            raise ValueError(
                f"cpu_affinity {cpu_affinity!r} names cores {outside} this process may not use "
                f"(allowed: {format_cores(allowed)})"
            )
    return num_threads or len(cores), cores


def apply(
    num_threads: int | None, cpu_affinity: str, omp_num_threads: str | None
) -> tuple[int, list[int] | None]:
    """Binds this process and sets torch's threads (the worker's settings, as `resolve` takes
    them); returns what is now in force. Call it before torch starts its thread pool (before
    the first op), so that the OpenMP threads inherit the binding."""
    import torch

    threads, cores = resolve(num_threads, cpu_affinity, allowed_cores(), omp_num_threads)
    if cores is not None:
        os.sched_setaffinity(0, cores)
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads(), cores
