"""The GPU check's record as text: the one-screen summary, the Markdown table docs/gpu.md
holds between its markers, and the rewrite of that section. Standard library only."""

from __future__ import annotations

from pathlib import Path

BEGIN, END = "<!-- gpu-check:begin -->", "<!-- gpu-check:end -->"


def summary_screen(record: dict) -> str:
    lines = [
        f"GPU check{' (dry run)' if record['dry_run'] else ''}: {record['device']}, "
        f"commit {record['commit']}, {record['wall_s']:.0f} s of a {record['budget_s']:.0f} s budget"
    ]
    for p in record["parts"]:
        lines.append(
            f"  {p['name']:<12}{p['status']:<10}{p['wall_s']:>5.0f} s  {p['figures'].get('headline', '')}"[
                :160
            ]
        )
    bad = [p["name"] for p in record["parts"] if p["status"] != "passed"]
    lines.append(
        f"NOT PASSED: {', '.join(bad)} (logs in the results)"
        if bad
        else f"all {len(record['parts'])} parts passed"
    )
    return "\n".join(lines)


def render_table(record: dict) -> str:
    out = [
        f"Run of {record['date']} on {record['device']}, commit `{record['commit']}`"
        f"{' (dry run: CPU versions on tiny shapes)' if record['dry_run'] else ''}: "
        f"{record['wall_s']:.0f} s in all, budget {record['budget_s']:.0f} s.",
        "",
        "| part | what | status | wall (s) | estimate (s) | result |",
        "|---|---|---|---:|---:|---|",
    ]
    for p in record["parts"]:
        headline = p["figures"].get("headline", "").replace("|", "\\|")  # a log line may hold one
        out.append(
            f"| {p['name']} | {p['what']} | {p['status']} | {p['wall_s']:.0f} | {p['estimate_s']:.0f} "
            f"| {headline} |"
        )
    by_name = {p["name"]: p["figures"] for p in record["parts"]}
    for name, (key, render) in DETAILS.items():
        if by_name.get(name, {}).get(key):  # absent when the part wrote no results
            out += ["", *render(by_name[name])]
    return "\n".join(out) + "\n"


def _bandwidth(f: dict) -> list[str]:
    rows = [
        f"Decode attention ({f['dtype']}, {f['num_heads']} heads over {f['num_kv_heads']} KV heads, head_dim "
        f"{f['head_dim']}, block {f['block_size']}); copy {f['copy_bandwidth_gbs']:.0f} GB/s (read + write):",
        "",
        "| batch | context | splits | time (us) | GB/s | of copy |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    return rows + [
        f"| {r['batch']} | {r['context']} | {r['num_splits']} | {r['time_us']:.1f} "
        f"| {r['bandwidth_gbs']:.0f} | {r['fraction_of_copy']:.0%} |"
        for r in f["rows"]
    ]


def _worker_step(f: dict) -> list[str]:
    rows = [
        "Worker decode step vs HF's forward with its KV cache (same model, dtype and batch):",
        "",
        "| model | batch | Conveyor tok/s | HF tok/s | ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    return rows + [
        f"| {r['model']} | {r['batch']} | {r['conveyor_tok_s']:.0f} | {r['hf_tok_s']:.0f} "
        f"| {r['ratio']:.2f} |"
        for r in f["rows"]
    ]


def _bf16(f: dict) -> list[str]:
    rows = [
        f"bf16 engine vs fp32 transformers, greedy, "
        f"first {f['tokens']} tokens of {f['prompts']} prompts per model:",
        "",
        "| model | tokens equal before the first difference | prompts equal throughout |",
        "|---|---:|---:|",
    ]
    return rows + [
        f"| {arch} | {m['prefix_agreement']:.0%} | {m['exact']}/{f['prompts']} |"
        for arch, m in f["models"].items()
    ]


def _mixed(f: dict) -> list[str]:
    rows = [
        "`mixed` end to end (output tok/s, p99 TTFT in ms):",
        "",
        "| system | done | output tok/s | p99 TTFT |",
        "|---|---:|---:|---:|",
    ]
    for name, s in (("Conveyor", f.get("conveyor")), ("HF static batching", f.get("static"))):
        if s:
            rows.append(
                f"| {name} | {s['completed']}/{s['completed'] + s['failed']} | {s['output_throughput']:.0f} "
                f"| {_ms(s['ttft_ms']['p99'])} |"
            )
    return rows


def _ms(value) -> str:
    return "—" if value is None else f"{value:.0f}"


# part -> (the figure that must be there, its detail table)
DETAILS = {
    "bf16": ("models", _bf16),
    "bandwidth": ("rows", _bandwidth),
    "worker-step": ("rows", _worker_step),
    "mixed": ("conveyor", _mixed),
}


def update_docs(doc: Path, table: str) -> None:
    """Replaces what lies between the markers in `doc` with `table`."""
    text = doc.read_text()
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"{doc}: the markers {BEGIN} ... {END} are missing; the table goes between them")
    doc.write_text(text[: start + len(BEGIN)] + "\n" + table + text[end:])
