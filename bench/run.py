"""End-to-end benchmark of Conveyor on a BENCH.md workload, with its Hugging Face baselines
(static batching; no batching) run in the same invocation on the same model, dtype and
torch threads.

    python -m bench.run --workload mixed --model tiny [--url URL] [--requests N] [--out DIR]
                        [--no-baselines] [--no-prefix-caching] [--rate R]

Without --url it starts Conveyor itself (`python -m conveyor run` on a free port, with a
Redis of its own) and stops it at the end. Conveyor is stopped before the baselines run,
so nothing else competes with them for the CPU. Writes DIR/results.json (figures, ratios,
machine, command), DIR/records.json (every request's timeline), DIR/summary.md and PNG
plots, and prints the summary.

`mixed-online` and `long-short` arrive as Poisson streams at --rate requests/s; without
it the same requests are first run offline (all at t=0) and the rate is 70% of that
offline request throughput.
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
from typing import Iterator, Optional

import torch

from bench import plots
from bench.client import run_workload
from bench.metrics import TABLE_HEADER, RequestRecord, latency_values, short_table_row, stats_ms, summarize
from bench.workloads import (NAMES, ONLINE_RATE_SHARE, LengthDist, Workload, build, custom, default_requests,
                             ideal_prefix_hit_rate, long_short, mixed)
from shared.config import WorkerSettings

CONVEYOR, STATIC, SINGLE = "Conveyor", "static batching (HF)", "no batching (HF)"
POISSON = ("mixed-online", "long-short")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=[*NAMES, "custom"], default="mixed")
    ap.add_argument("--model", default="tiny", help="a preset (tiny, small, gpu-0.5b) or a model directory")
    ap.add_argument("--url", help="benchmark a running Conveyor here instead of starting one")
    ap.add_argument("--redis-url", help="with --url: its Redis, to read the scheduler's figures (prefix-cache hits)")
    ap.add_argument("--requests", type=int, help="number of requests (default: BENCH.md's)")
    ap.add_argument("--rate", type=float, help="arrivals per second for mixed-online, long-short and custom")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="results folder (default: bench/results/<workload>-<model>-<time>)")
    ap.add_argument("--no-baselines", action="store_true", help="only Conveyor")
    ap.add_argument("--no-prefix-caching", action="store_true",
                    help="run Conveyor with prefix caching off (shared-prefix: skip the on/off comparison)")
    ap.add_argument("--no-batching-requests", type=int, default=20, help="size of the one-at-a-time subset")
    ap.add_argument("--threads", type=int, help="torch threads of the worker and the baselines (default: torch's)")
    ap.add_argument("--workers", type=int, default=1, help="Conveyor workers, when it is started here")
    ap.add_argument("--conveyor-env", action="append", default=[], metavar="NAME=VALUE",
                    help="a setting for the Conveyor started here, e.g. CONVEYOR_MAX_NUM_SEQS=128 (repeatable)")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda (the worker's and the baselines')")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                    help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--prompt-len", default="uniform:16:256", help="custom: fixed:N, uniform:LO:HI or "
                    "lognormal:MEDIAN:SIGMA:LO:HI")
    ap.add_argument("--output-len", default="lognormal:64:1.0:8:1024", help="custom: as --prompt-len")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    if args.requests is not None and args.requests < 1:
        ap.error(f"--requests must be >= 1 (got {args.requests})")
    if args.rate is not None and not args.rate > 0:
        ap.error(f"--rate must be > 0 (got {args.rate})")
    try:
        args.extra_env = dict(kv.split("=", 1) for kv in args.conveyor_env)
    except ValueError:
        ap.error(f"--conveyor-env takes NAME=VALUE (got {args.conveyor_env})")
    if args.workload == "custom":
        try:
            args.prompt_dist, args.output_dist = LengthDist.parse(args.prompt_len), LengthDist.parse(args.output_len)
        except ValueError as e:
            ap.error(str(e))
    return args


# ---- set-up ----------------------------------------------------------------------------------

def resolve_model(spec: str) -> tuple[Path, str]:
    from shared.tiny_model import PRESETS, ensure_model

    if spec in PRESETS:
        return ensure_model(spec), spec
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise SystemExit(f"--model: {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a model directory")
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
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": threads,
            "device": device, "python": platform.python_version(), "platform": platform.platform(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                            check=True, cwd=Path(__file__).parent).stdout.strip()
    return info


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


# ---- the Conveyor side -----------------------------------------------------------------------

class Conveyor:
    """Where the workloads are sent: a server given by --url, or one started here."""

    def __init__(self, args: argparse.Namespace, model_dir: Path, threads: int, device: str, dtype: str):
        self.args, self.model_dir, self.threads, self.device, self.dtype = args, model_dir, threads, device, dtype
        self.url: str = args.url or ""
        self.redis_url: Optional[str] = args.redis_url

    @contextlib.contextmanager
    def serving(self, prefix_caching: bool, log_name: str) -> Iterator["Conveyor"]:
        if self.args.url:
            yield self
            return
        from bench.server import LocalConveyor

        env = {"CONVEYOR_ENABLE_PREFIX_CACHING": str(prefix_caching).lower(), "CONVEYOR_DEVICE": self.device,
               "CONVEYOR_DTYPE": self.dtype, "CONVEYOR_MAX_QUEUE_LEN": str(max(1000, 2 * (self.args.requests or 0))),
               **self.args.extra_env}
        print(f"starting Conveyor (prefix caching {'on' if prefix_caching else 'off'}; log {log_name})...",
              file=sys.stderr, flush=True)
        with LocalConveyor(self.model_dir, self.threads, self.args.out / log_name, self.args.workers, env) as server:
            self.url, self.redis_url = server.url, server.redis_url
            try:
                yield self
            finally:
                self.url, self.redis_url = "", None

    def run(self, workload: Workload, desc: str = "") -> tuple[list[RequestRecord], dict]:
        """Replays `workload`; returns its records and the scheduler's counters over the run."""
        from bench.server import fresh_stats, stats_delta, warm_up

        warm_up(self.url)
        before = fresh_stats(self.redis_url) if self.redis_url else {}
        records = run_workload(self.url, workload, progress=not self.args.quiet,
                               desc=f"Conveyor {desc or workload.name}")
        delta = stats_delta(before, fresh_stats(self.redis_url)) if self.redis_url else {}
        return records, delta


def offline_variant(name: str, vocab: int, n: int, seed: int) -> Workload:
    """The requests of a Poisson workload, all at t=0: to measure the rate it then arrives at."""
    return mixed(vocab, n, seed) if name == "mixed-online" else long_short(vocab, None, n, seed)


def conveyor_phase(args, conveyor: Conveyor, vocab: int, n: int, results: dict, records: dict) -> list[Workload]:
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
            print(f"offline: {s['request_throughput']:.2f} req/s -> arrivals at {rate:.2f} req/s", file=sys.stderr)
        if name == "custom":
            wl = custom(vocab, n, args.prompt_dist, args.output_dist, rate, args.seed)
        else:
            wl = build(name, vocab, n, rate, args.seed)
        results["load_average"]["conveyor_start"] = os.getloadavg()
        recs, delta = conveyor.run(wl)
        results["load_average"]["conveyor_end"] = os.getloadavg()
        results["systems"][CONVEYOR] = {**summarize(recs), "scheduler_counters": delta}
        records[CONVEYOR] = recs
        workloads = [wl]
        if name == "long-short":
            short = wl.only("short")
            recs_short, _ = conveyor.run(short, "short requests alone")
            records[f"{CONVEYOR} short only"] = recs_short
            workloads.append(short)
    if name == "shared-prefix":
        results["shared_prefix"] = {"hit_rate": _hit_rate(delta), "ideal_hit_rate": ideal_prefix_hit_rate(
            wl, WorkerSettings().block_size), "prefix_caching_on": not args.no_prefix_caching}
        if not (args.no_prefix_caching or args.url):
            with conveyor.serving(False, "conveyor-no-prefix-caching.log"):
                recs_off, _ = conveyor.run(wl, "prefix caching off")
            records[f"{CONVEYOR} prefix caching off"] = recs_off
            results["shared_prefix"]["prefix_caching_off"] = summarize(recs_off)
    results["workload"] = {"name": wl.name, "params": wl.params, "requests": len(wl),
                           "prompt_tokens": wl.prompt_tokens, "output_tokens": wl.output_tokens}
    return workloads


def _hit_rate(delta: dict) -> Optional[float]:
    return delta["prefix_hits"] / delta["prefix_queries"] if delta.get("prefix_queries") else None


# ---- the baselines -----------------------------------------------------------------------------

def baseline_phase(args, model_dir: Path, workloads: list[Workload], device: str, dtype: str,
                   results: dict, records: dict) -> None:
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
    single["subset"] = {**baselines.subset_note(wl, subset), "extrapolated_workload_duration_s":
                        len(wl) / single["request_throughput"] if single["request_throughput"] else None}
    results["systems"][SINGLE] = single
    results["load_average"]["baselines_end"] = os.getloadavg()
    records[SINGLE] = recs


# ---- results ----------------------------------------------------------------------------------

def add_ratios(results: dict) -> None:
    sys_ = results["systems"]
    c, s, o = sys_.get(CONVEYOR), sys_.get(STATIC), sys_.get(SINGLE)
    get = lambda d, k: d[k] if d else None  # noqa: E731
    p99 = lambda d: d["ttft_ms"]["p99"] if d else None  # noqa: E731
    results["ratios"] = {
        key: {"conveyor_over_static": ratio(get(c, key), get(s, key)),
              "conveyor_over_no_batching": ratio(get(c, key), get(o, key))}
        for key in ("output_throughput", "request_throughput")
    }
    results["ratios"]["ttft_p99_ms"] = {
        "conveyor": p99(c), "static": p99(s), "no_batching_unqueued": p99(o),
        "static_over_conveyor": ratio(p99(s), p99(c)),
    }


def long_short_figures(records: dict, results: dict) -> dict[str, dict]:
    """p50/p99 TTFT of the short requests, with the long ones and alone, per system."""
    rows = {}
    for system in (CONVEYOR, STATIC):
        if system not in records:
            continue
        with_long = [r for r in records[system] if r.tag == "short"]
        for label, recs in ((f"{system} — with long", with_long), (f"{system} — short only",
                                                                   records[f"{system} short only"])):
            rows[label] = stats_ms(latency_values(recs)["ttft"])
    results["long_short"] = {"short_ttft_ms": rows, "p99_with_over_without": {
        system: ratio(rows[f"{system} — with long"]["p99"], rows[f"{system} — short only"]["p99"])
        for system in (CONVEYOR, STATIC) if f"{system} — with long" in rows}}
    return rows


def write_plots(out: Path, results: dict, records: dict, title: str) -> list[str]:
    systems = results["systems"]
    names = {CONVEYOR: CONVEYOR, STATIC: STATIC, SINGLE: f"{SINGLE} — subset, unqueued"}
    names = {k: v + (f" ({systems[k]['failed']} failed)" if systems.get(k, {}).get("failed") else "")
             for k, v in names.items()}
    plots.throughput({names[k]: v for k, v in systems.items()}, title, out / "throughput.png")
    plots.latency_cdfs({names[k]: latency_values(records[k]) for k in systems}, title, out / "latency_cdf.png")
    files = ["throughput.png", "latency_cdf.png"]
    if "long_short" in results:
        rows = {k: v for k, v in results["long_short"]["short_ttft_ms"].items() if v["p99"] is not None}
        plots.short_ttft(rows, f"{title}\nTTFT of the short requests, with the long ones and without",
                         out / "short_ttft.png")
        files.append("short_ttft.png")
    sp = results.get("shared_prefix")
    if sp and sp.get("hit_rate") is not None:
        tput = {"prefix caching on": systems[CONVEYOR]["output_throughput"]}
        if "prefix_caching_off" in sp:
            tput["prefix caching off"] = sp["prefix_caching_off"]["output_throughput"]
        plots.prefix_cache(sp["hit_rate"], sp["ideal_hit_rate"], tput, title, out / "prefix_cache.png")
        files.append("prefix_cache.png")
    return files


def summary_markdown(results: dict) -> str:
    m, w = results["machine"], results["workload"]
    lines = [f"## {w['name']} on {results['model']['name']} — {w['requests']} requests, "
             f"{w['prompt_tokens']} prompt / {w['output_tokens']} output tokens",
             f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['threads']} threads, {results['model']['dtype']} "
             f"on {m['device']}; {m['date']}; 1-min load average "
             + ", ".join(f"{k.replace('_', ' ')} {v[0]:.1f}" for k, v in results["load_average"].items()),
             f"`{results['command']}`", "", TABLE_HEADER]
    lines += [short_table_row(name, s) for name, s in results["systems"].items()]
    for name, s in results["systems"].items():
        if s["failed"]:
            lines.append(f"\n**{name}: {s['failed']} requests failed** (figures are of the completed ones only): "
                         + "; ".join(s["errors"][:3]))
    fmt = lambda x, d=2: "—" if x is None else f"{x:.{d}f}"  # noqa: E731
    if SINGLE in results["systems"]:
        sub = results["systems"][SINGLE]["subset"]
        lines.append(f"\n{SINGLE}: {sub['requests']} of {sub['of']} requests, one at a time; its latencies "
                     "include no queueing, its throughput is what a one-at-a-time server sustains (extrapolated: "
                     f"the whole workload would take about {fmt(sub['extrapolated_workload_duration_s'], 0)} s).")
    r = results.get("ratios", {})
    if r:
        out, req = r["output_throughput"], r["request_throughput"]
        lines.append(f"\nConveyor / static batching: output tok/s {fmt(out['conveyor_over_static'])}×, "
                     f"req/s {fmt(req['conveyor_over_static'])}×; "
                     f"Conveyor / no batching: output tok/s {fmt(out['conveyor_over_no_batching'])}×, "
                     f"req/s {fmt(req['conveyor_over_no_batching'])}×. "
                     f"p99 TTFT: Conveyor {fmt(r['ttft_p99_ms']['conveyor'], 0)} ms, static "
                     f"{fmt(r['ttft_p99_ms']['static'], 0)} ms.")
    if "rate_from_offline" in results:
        ro = results["rate_from_offline"]
        lines.append(f"Arrival rate {ro['rate']:.2f} req/s = {ro['share']:.0%} of Conveyor's offline "
                     f"{ro['offline']['request_throughput']:.2f} req/s on the same requests.")
    if "long_short" in results:
        lines += ["", "| short requests' TTFT | p50 ms | p99 ms |", "|---|---:|---:|"]
        lines += [f"| {k} | {fmt(v['median'], 0)} | {fmt(v['p99'], 0)} |"
                  for k, v in results["long_short"]["short_ttft_ms"].items()]
    sp = results.get("shared_prefix")
    if sp:
        lines.append(f"\nPrefix cache: hit rate {fmt(sp['hit_rate'] and 100 * sp['hit_rate'], 1)}% of prompt tokens "
                     f"(ideal {100 * sp['ideal_hit_rate']:.1f}%).")
        if "prefix_caching_off" in sp:
            on, off = results["systems"][CONVEYOR]["output_throughput"], sp["prefix_caching_off"]["output_throughput"]
            lines.append(f"Output tok/s with prefix caching on {on:.0f}, off {off:.0f} ({fmt(ratio(on, off))}×).")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("float32" if device == "cpu" else "bfloat16")
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    model_dir, preset = resolve_model(args.model)
    vocab = model_vocab_size(model_dir)
    args.requests = args.requests or (default_requests(args.workload, preset) if args.workload != "custom" else 100)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    args.out = args.out or Path("bench/results") / f"{args.workload}-{preset or model_dir.name}-{stamp}"
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python -m bench.run " + shlex.join(sys.argv[1:] if argv is None else argv)
    results: dict = {"command": command, "machine": machine_info(threads, device),
                     "model": {"name": preset or model_dir.name, "dir": str(model_dir), "dtype": dtype},
                     "conveyor": {"url": args.url or "started here", "prefix_caching": not args.no_prefix_caching,
                                  "env": args.extra_env},
                     "systems": {}, "load_average": {}}
    records: dict[str, list[RequestRecord]] = {}

    conveyor = Conveyor(args, model_dir, threads, device, dtype)
    workloads = conveyor_phase(args, conveyor, vocab, args.requests, results, records)
    if not args.no_baselines:
        baseline_phase(args, model_dir, workloads, device, dtype, results, records)
    add_ratios(results)
    if args.workload == "long-short":
        long_short_figures(records, results)
    title = f"{args.workload} on {results['model']['name']}, {len(workloads[0])} requests ({threads} threads, {device})"
    results["plots"] = write_plots(args.out, results, records, title)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "records.json").write_text(json.dumps({k: [r.to_json() for r in v] for k, v in records.items()}))
    summary = summary_markdown(results)
    (args.out / "summary.md").write_text(summary)
    print("\n" + summary + f"\nwrote {args.out}/results.json, records.json, summary.md, {', '.join(results['plots'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
