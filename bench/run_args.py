"""bench.run's command line: its options, added in the order --help lists them, and the checks
that turn a wrong value or combination into a usage error before anything starts.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.vllm_peer import DEFAULT_IOMP, IOMP_CHOICES
from bench.workloads import NAMES, LengthDist


def parse_args(argv: list[str] | None, description: str | None) -> argparse.Namespace:
    """The options of `python -m bench.run`, checked; `description` heads its --help."""
    ap = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_run_options(ap)
    _add_peer_options(ap)
    _add_sampling_options(ap)
    _add_server_options(ap)
    _add_shape_options(ap)
    args = ap.parse_args(argv)
    _check(ap, args)
    return args


def _add_run_options(ap: argparse.ArgumentParser) -> None:
    """What runs, on which model, against which server, and where its results go."""
    ap.add_argument("--workload", choices=[*NAMES, "custom"], default="mixed")
    ap.add_argument(
        "--model",
        default="tiny",
        help="a preset (tiny, small, gpu-0.5b), a real model (smollm2) or a model directory",
    )
    ap.add_argument("--url", help="benchmark a running Conveyor here instead of starting one")
    ap.add_argument(
        "--redis-url", help="with --url: its Redis, to read the scheduler's figures (prefix-cache hits)"
    )
    ap.add_argument("--requests", type=int, help="number of requests (default: BENCH.md's)")
    ap.add_argument("--rate", type=float, help="arrivals per second for mixed-online, long-short and custom")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--out", type=Path, help="results folder (default: bench/results/<workload>-<model>-<time>)"
    )
    ap.add_argument("--no-baselines", action="store_true", help="only Conveyor")
    ap.add_argument(
        "--no-prefix-caching",
        action="store_true",
        help="run Conveyor with prefix caching off (shared-prefix: skip the on/off comparison)",
    )
    ap.add_argument("--no-batching-requests", type=int, default=20, help="size of the one-at-a-time subset")
    ap.add_argument(
        "--threads",
        type=int,
        help="torch threads of the worker and the baselines (default: "
        "Conveyor's thread layout; torch's for the baselines)",
    )


def _add_peer_options(ap: argparse.ArgumentParser) -> None:
    """The peer run beside Conveyor, rounds interleaved: vLLM-CPU or a second Conveyor."""
    ap.add_argument(
        "--peer",
        choices=["vllm", "conveyor"],
        help="also run vLLM-CPU (or a second Conveyor with "
        "--peer-env's settings) on the workload, rounds interleaved",
    )
    ap.add_argument(
        "--rounds", type=int, help="rounds of each system on the workload (default: 3 with --peer, else 1)"
    )
    ap.add_argument(
        "--vllm-venv", type=Path, help="vLLM's venv (default: $CONVEYOR_VLLM_VENV or <repo>/.venv-vllm)"
    )
    ap.add_argument(
        "--peer-iomp",
        choices=IOMP_CHOICES,
        default=DEFAULT_IOMP,
        help="preload Intel's OpenMP into vLLM besides tcmalloc (default: off, the faster here; "
        "auto: when its venv has it)",
    )
    ap.add_argument(
        "--peer-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable for vLLM (repeatable), e.g. VLLM_CPU_OMP_THREADS_BIND=0-1; with "
        "--peer conveyor, a setting of the second Conveyor (NAME= turns it off)",
    )
    ap.add_argument(
        "--peer-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="an extra argument for vLLM's server (repeatable), e.g. --peer-arg=--data-parallel-size=2",
    )


def _add_sampling_options(ap: argparse.ArgumentParser) -> None:
    """Chat's sampling (the other workloads are greedy over token ids)."""
    ap.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="chat: 0 is greedy; above, sampled with a "
        "seed per request (BENCH.md's sampled row: 0.7 with --top-p 0.9)",
    )
    ap.add_argument("--top-p", type=float, default=1.0, help="chat: nucleus sampling")
    ap.add_argument(
        "--unseeded",
        action="store_true",
        help="chat, sampled: send no per-request seeds (vLLM-CPU "
        "0.32's worker dies on one: 'CPU Generator does not use offset')",
    )


def _add_server_options(ap: argparse.ArgumentParser) -> None:
    """The Conveyor started here, and the device and dtype it and the baselines run on."""
    ap.add_argument("--workers", type=int, default=1, help="Conveyor workers, when it is started here")
    ap.add_argument(
        "--conveyor-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for the Conveyor started here, e.g. CONVEYOR_MAX_NUM_SEQS=128 (repeatable)",
    )
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda (the worker's and the baselines')")
    ap.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="default: float32 on CPU, bfloat16 on CUDA",
    )


def _add_shape_options(ap: argparse.ArgumentParser) -> None:
    """custom's lengths and copy's concurrency; and whether progress bars show."""
    ap.add_argument(
        "--prompt-len",
        default="uniform:16:256",
        help="custom: fixed:N, uniform:LO:HI or lognormal:MEDIAN:SIGMA:LO:HI",
    )
    ap.add_argument("--output-len", default="lognormal:64:1.0:8:1024", help="custom: as --prompt-len")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument(
        "--concurrency",
        type=int,
        help="copy: requests in flight at a time (BENCH.md: 1, 2 or 8; default: all at once)",
    )


def _check(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors for values out of range or options that do not go together; fills in
    the defaults that depend on other options and the parsed NAME=VALUE settings."""
    if args.requests is not None and args.requests < 1:
        ap.error(f"--requests must be >= 1 (got {args.requests})")
    if args.rounds is None:
        args.rounds = 3 if args.peer else 1
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1 (got {args.rounds})")
    if args.rate is not None and not args.rate > 0:
        ap.error(f"--rate must be > 0 (got {args.rate})")
    for flag in ("conveyor_env", "peer_env"):
        try:
            setattr(args, f"{flag}_dict", dict(kv.split("=", 1) for kv in getattr(args, flag)))
        except ValueError:
            ap.error(f"--{flag.replace('_', '-')} takes NAME=VALUE (got {getattr(args, flag)})")
    args.extra_env = args.conveyor_env_dict
    if (args.temperature, args.top_p) != (0.0, 1.0) and args.workload != "chat":
        ap.error("--temperature and --top-p are for --workload chat (the others are greedy over token ids)")
    if not 0 <= args.temperature <= 2 or not 0 < args.top_p <= 1:
        ap.error(
            f"--temperature must be in [0, 2] and --top-p in (0, 1] (got {args.temperature}, {args.top_p})"
        )
    if args.peer == "conveyor" and (args.url or args.peer_arg or args.peer_iomp != DEFAULT_IOMP):
        ap.error(
            "--peer conveyor starts a second Conveyor here with --peer-env's settings: not with --url, "
            "--peer-arg or --peer-iomp (vLLM's)"
        )
    if args.concurrency is not None and (args.workload != "copy" or args.concurrency < 1):
        ap.error(f"--concurrency is for --workload copy, and at least 1 (got {args.concurrency})")
    if args.workload == "custom":
        try:
            args.prompt_dist, args.output_dist = (
                LengthDist.parse(args.prompt_len),
                LengthDist.parse(args.output_len),
            )
        except ValueError as e:
            ap.error(str(e))
