"""End-to-end benchmark of Conveyor on a BENCH.md workload, with its Hugging Face baselines
(static batching; no batching) run in the same invocation on the same model, dtype and
torch threads.

    python -m bench.run --workload mixed --model tiny [--url URL] [--requests N] [--out DIR]
                        [--no-baselines] [--no-prefix-caching] [--rate R] [--peer vllm] [--rounds N]
    python -m bench.run --workload chat --model smollm2 [--temperature 0.7 --top-p 0.9] [--peer vllm]
    python -m bench.run --workload copy --model smollm2 --concurrency 1
                        --conveyor-env CONVEYOR_SPECULATIVE_CONFIG=JSON
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
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench import run_args
from bench.metrics import RequestRecord, summarize
from bench.report import (
    CONVEYOR,
    SINGLE,
    STATIC,
    add_ratios,
    long_short_figures,
    output_agreement,
    summary_markdown,
    write_plots,
)
from bench.series import record_series, run_series
from bench.systems import Conveyor, peer_serving
from bench.workloads import (
    ONLINE_RATE_SHARE,
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
    """The command line (bench/run_args.py), with this module's docstring as its --help."""
    return run_args.parse_args(argv, __doc__)


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


# ---- the Conveyor phase ------------------------------------------------------------------------


def conveyor_phase(
    args, conveyor: Conveyor, vocab: int, n: int, results: dict, records: dict
) -> list[Workload]:
    """Runs Conveyor on the workload (and its variants); returns the workloads the
    baselines must run: the main one, then the short-only variant for long-short."""
    with conveyor.serving(not args.no_prefix_caching, "conveyor.log"):
        rate = args.rate
        if args.workload in POISSON and rate is None:
            rate = rate_from_offline(args, conveyor, vocab, n, results, records)
        wl = main_workload(args, vocab, n, rate)
        run_rounds(args, conveyor, wl, results, records)
        workloads = [wl]
        if args.workload == "long-short":
            short = wl.only("short")
            recs_short, _ = conveyor.run(short, "short requests alone")
            records[f"{CONVEYOR} short only"] = recs_short
            workloads.append(short)
    if args.workload == "shared-prefix":
        shared_prefix_figures(args, conveyor, wl, results, records)
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


def offline_variant(name: str, vocab: int, n: int, seed: int) -> Workload:
    """The requests of a Poisson workload, all at t=0: to measure the rate it then arrives at."""
    return mixed(vocab, n, seed) if name == "mixed-online" else long_short(vocab, None, n, seed)


def rate_from_offline(args, conveyor: Conveyor, vocab: int, n: int, results: dict, records: dict) -> float:
    """A Poisson workload's arrival rate when --rate is not given: a share of the request
    throughput Conveyor reaches on the same requests all at t=0."""
    offline = offline_variant(args.workload, vocab, n, args.seed)
    recs, _ = conveyor.run(offline, f"{args.workload} offline, to measure the rate")
    s = summarize(recs)
    rate = ONLINE_RATE_SHARE * s["request_throughput"]
    results["rate_from_offline"] = {"offline": s, "share": ONLINE_RATE_SHARE, "rate": rate}
    records["Conveyor offline"] = recs
    print(
        f"offline: {s['request_throughput']:.2f} req/s -> arrivals at {rate:.2f} req/s",
        file=sys.stderr,
    )
    return rate


def main_workload(args, vocab: int, n: int, rate: float | None) -> Workload:
    """The workload the command line names, at `rate` (the given or the measured one)."""
    name = args.workload
    if name == "custom":
        return custom(vocab, n, args.prompt_dist, args.output_dist, rate, args.seed)
    if name == "chat":
        return build(
            name,
            vocab,
            n,
            seed=args.seed,
            render=args.render,
            temperature=args.temperature,
            top_p=args.top_p,
            seeded=not args.unseeded,
        )
    if name == "copy":
        return build(name, vocab, n, seed=args.seed, render=args.render, max_concurrency=args.concurrency)
    return build(name, vocab, n, rate, args.seed)


def run_rounds(args, conveyor: Conveyor, wl: Workload, results: dict, records: dict) -> None:
    """The series of rounds on `wl`: Conveyor alone, or interleaved with the peer (and, on a
    workload that stops at EOS, whether their outputs agree)."""
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


def shared_prefix_figures(args, conveyor: Conveyor, wl: Workload, results: dict, records: dict) -> None:
    """The prefix cache's hit rate against the ideal one and, with a server started here
    and caching on, the same workload again with caching off."""
    delta = results["systems"][CONVEYOR].get("scheduler_counters", {})
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
    title = (
        f"{args.workload} on {results['model']['name']}, {len(workloads[0])} requests "
        f"({threads} threads, {device})"
    )
    write_report(args.out, results, records, title)
    return 0


def write_report(out: Path, results: dict, records: dict, title: str) -> None:
    """The plots, results.json, records.json and summary.md into `out`; the summary printed."""
    results["plots"] = write_plots(out, results, records, title)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "records.json").write_text(json.dumps({k: [r.to_json() for r in v] for k, v in records.items()}))
    summary = summary_markdown(results)
    (out / "summary.md").write_text(summary)
    print(
        "\n"
        + summary
        + f"\nwrote {out}/results.json, records.json, summary.md, {', '.join(results['plots'])}"
    )


if __name__ == "__main__":
    sys.exit(main())
