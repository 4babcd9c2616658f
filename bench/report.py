"""What a run reports: the ratios between systems, the plots, and summary.md."""

from __future__ import annotations

from pathlib import Path

from bench import plots, rounds
from bench.metrics import TABLE_HEADER, latency_values, short_table_row, stats_ms

CONVEYOR, STATIC, SINGLE, VLLM = "Conveyor", "static batching (HF)", "no batching (HF)", "vLLM-CPU"


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def add_ratios(results: dict) -> None:
    sys_ = results["systems"]
    c, s, o = sys_.get(CONVEYOR), sys_.get(STATIC), sys_.get(SINGLE)
    results["ratios"] = {
        key: {
            "conveyor_over_static": ratio(_figure(c, key), _figure(s, key)),
            "conveyor_over_no_batching": ratio(_figure(c, key), _figure(o, key)),
        }
        for key in ("output_throughput", "request_throughput")
    }
    results["ratios"]["ttft_p99_ms"] = {
        "conveyor": _ttft_p99(c),
        "static": _ttft_p99(s),
        "no_batching_unqueued": _ttft_p99(o),
        "static_over_conveyor": ratio(_ttft_p99(s), _ttft_p99(c)),
    }


def _figure(system: dict | None, key: str) -> float | None:
    """A system's figure; None for a system that did not run."""
    return system[key] if system else None


def _ttft_p99(system: dict | None) -> float | None:
    return system["ttft_ms"]["p99"] if system else None


def output_agreement(ours: list, peer: list) -> dict:
    """Whether two systems did comparable work on a workload that stops at EOS: of the
    requests both completed, how many have the same text (greedy: the same model should
    mostly agree), and the tokens each produced for them."""
    pairs = [(a, b) for a, b in zip(ours, peer) if a.ok and b.ok]
    return {
        "both_completed": len(pairs),
        "identical_text": sum(a.text == b.text for a, b in pairs),
        "output_tokens": [sum(a.output_tokens for a, _ in pairs), sum(b.output_tokens for _, b in pairs)],
    }


def long_short_figures(records: dict, results: dict) -> dict[str, dict]:
    """p50/p99 TTFT of the short requests, with the long ones and alone, per system."""
    rows = {}
    for system in (CONVEYOR, STATIC):
        if system not in records:
            continue
        with_long = [r for r in records[system] if r.tag == "short"]
        for label, recs in (
            (f"{system} — with long", with_long),
            (f"{system} — short only", records[f"{system} short only"]),
        ):
            rows[label] = stats_ms(latency_values(recs)["ttft"])
    results["long_short"] = {
        "short_ttft_ms": rows,
        "p99_with_over_without": {
            system: ratio(rows[f"{system} — with long"]["p99"], rows[f"{system} — short only"]["p99"])
            for system in (CONVEYOR, STATIC)
            if f"{system} — with long" in rows
        },
    }
    return rows


def write_plots(out: Path, results: dict, records: dict, title: str) -> list[str]:
    systems = results["systems"]
    names = {k: (f"{SINGLE} — subset, unqueued" if k == SINGLE else k) for k in systems}
    names = {
        k: v + (f" ({systems[k]['failed']} failed)" if systems[k]["failed"] else "") for k, v in names.items()
    }
    plots.throughput({names[k]: v for k, v in systems.items()}, title, out / "throughput.png")
    plots.latency_cdfs(
        {names[k]: latency_values(records[k]) for k in systems}, title, out / "latency_cdf.png"
    )
    files = ["throughput.png", "latency_cdf.png"]
    if "long_short" in results:
        rows = {k: v for k, v in results["long_short"]["short_ttft_ms"].items() if v["p99"] is not None}
        plots.short_ttft(
            rows,
            f"{title}\nTTFT of the short requests, with the long ones and without",
            out / "short_ttft.png",
        )
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
    """summary.md: the run's heading and table, then a paragraph or table per figure it has."""
    lines = _heading(results)
    for section in (
        _no_batching_note,
        _ratios_note,
        _peer_notes,
        _speculation_notes,
        _rounds_and_rate_notes,
        _long_short_table,
        _shared_prefix_notes,
    ):
        lines += section(results)
    return "\n".join(lines) + "\n"


def _fmt(x: float | None, d: int = 2) -> str:
    return "—" if x is None else f"{x:.{d}f}"


def _heading(results: dict) -> list[str]:
    """What ran on what, the command, and one row per system (with its failures, if any)."""
    m, w = results["machine"], results["workload"]
    out = (
        f"at most {w['max_output_tokens']} output tokens (stopping at EOS)"
        if w.get("stops_at_eos")
        else f"{w['output_tokens']} output tokens"
    )
    lines = [
        f"## {w['name']} on {results['model']['name']} — {w['requests']} requests, "
        f"{w['prompt_tokens']} prompt tokens, {out}",
        f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['threads']} threads, "
        f"{results['model']['dtype']} on {m['device']}; {m['date']}; 1-min load average "
        + ", ".join(f"{k.replace('_', ' ')} {v[0]:.1f}" for k, v in results["load_average"].items()),
        f"`{results['command']}`",
        "",
        TABLE_HEADER,
    ]
    lines += [short_table_row(name, s) for name, s in results["systems"].items()]
    for name, s in results["systems"].items():
        if s["failed"]:
            lines.append(
                f"\n**{name}: {s['failed']} requests failed** (figures are of the completed ones only): "
                + "; ".join(s["errors"][:3])
            )
    return lines


def _no_batching_note(results: dict) -> list[str]:
    if SINGLE not in results["systems"]:
        return []
    sub = results["systems"][SINGLE]["subset"]
    return [
        f"\n{SINGLE}: {sub['requests']} of {sub['of']} requests, one at a time; its latencies "
        "include no queueing, its throughput is what a one-at-a-time server sustains (extrapolated: "
        f"the whole workload would take about {_fmt(sub['extrapolated_workload_duration_s'], 0)} s)."
    ]


def _ratios_note(results: dict) -> list[str]:
    r = results.get("ratios", {})
    if not r:
        return []
    out, req = r["output_throughput"], r["request_throughput"]
    return [
        f"\nConveyor / static batching: output tok/s {_fmt(out['conveyor_over_static'])}×, "
        f"req/s {_fmt(req['conveyor_over_static'])}×; "
        f"Conveyor / no batching: output tok/s {_fmt(out['conveyor_over_no_batching'])}×, "
        f"req/s {_fmt(req['conveyor_over_no_batching'])}×. "
        f"p99 TTFT: Conveyor {_fmt(r['ttft_p99_ms']['conveyor'], 0)} ms, static "
        f"{_fmt(r['ttft_p99_ms']['static'], 0)} ms."
    ]


def _peer_notes(results: dict) -> list[str]:
    """The rounds against the peer, whether their outputs agree, and how the peer was set up."""
    lines: list[str] = []
    if "peer" in results:
        lines += rounds.markdown(results["peer"])
        agree = results["peer"].get("outputs")
        if agree:
            lines.append(
                f"Outputs of the median rounds: {agree['identical_text']} of {agree['both_completed']} "
                f"requests identical; their output tokens {agree['output_tokens'][0]:,} "
                f"({results['peer']['ours']}) and {agree['output_tokens'][1]:,} ({results['peer']['peer']})."
            )
    if "peer_server" in results:
        peer = results["peer_server"]
        lines.append(f"Peer preloads: {', '.join(peer['preloaded']) or 'none'}.")
        # Thread binding, data parallelism: what was tried beyond its defaults (bench.vllm_peer).
        extra = [f"{k}={v}" for k, v in peer.get("extra_env", {}).items()] + peer.get("extra_args", [])
        if extra:
            lines.append(f"Peer configuration beyond its defaults: {' '.join(extra)}.")
    return lines


def _speculation_notes(results: dict) -> list[str]:
    lines = []
    for name, figures in results.get("systems", {}).items():
        c = figures.get("scheduler_counters", {})
        if c.get("spec_drafts"):
            lines.append(
                f"Speculation ({name}, median round): {c['spec_accepted_tokens']:,} of "
                f"{c['spec_draft_tokens']:,} proposed tokens accepted "
                f"({c['spec_accepted_tokens'] / c['spec_draft_tokens']:.0%}) in {c['spec_drafts']:,} "
                "verified decodes, mean accepted length "
                f"{1 + c['spec_accepted_tokens'] / c['spec_drafts']:.2f} "
                f"(tokens a verified decode emitted); {c.get('steps', 0):,} steps for "
                f"{c.get('generation_tokens', 0):,} output tokens."
            )
    return lines


def _rounds_and_rate_notes(results: dict) -> list[str]:
    """The servers' CPU time per round, and where an online workload's arrival rate came from."""
    lines = []
    if "rounds" in results:
        lines.append(
            "CPU seconds of each server's processes per round: "
            + "; ".join(
                f"{name} " + ", ".join(f"{sum(f['cpu_s'].values()):.1f}" for f in figs)
                for name, figs in results["rounds"].items()
            )
        )
    if "rate_from_offline" in results:
        ro = results["rate_from_offline"]
        lines.append(
            f"Arrival rate {ro['rate']:.2f} req/s = {ro['share']:.0%} of Conveyor's offline "
            f"{ro['offline']['request_throughput']:.2f} req/s on the same requests."
        )
    return lines


def _long_short_table(results: dict) -> list[str]:
    if "long_short" not in results:
        return []
    return ["", "| short requests' TTFT | p50 ms | p99 ms |", "|---|---:|---:|"] + [
        f"| {k} | {_fmt(v['median'], 0)} | {_fmt(v['p99'], 0)} |"
        for k, v in results["long_short"]["short_ttft_ms"].items()
    ]


def _shared_prefix_notes(results: dict) -> list[str]:
    sp = results.get("shared_prefix")
    if not sp:
        return []
    lines = [
        f"\nPrefix cache: hit rate {_fmt(sp['hit_rate'] and 100 * sp['hit_rate'], 1)}% of prompt tokens "
        f"(ideal {100 * sp['ideal_hit_rate']:.1f}%)."
    ]
    if "prefix_caching_off" in sp:
        on, off = (
            results["systems"][CONVEYOR]["output_throughput"],
            sp["prefix_caching_off"]["output_throughput"],
        )
        lines.append(
            f"Output tok/s with prefix caching on {on:.0f}, off {off:.0f} ({_fmt(ratio(on, off))}×)."
        )
    return lines
