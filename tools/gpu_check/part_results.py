"""The headline figures of each GPU-check part, read from the files the part wrote: pytest's
JUnit XML, and the JSON of the benchmarks. Standard library only: the check must report
even when the install of everything else failed."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

DTYPES = ("float32", "float16", "bfloat16")


def junit(path: Path) -> dict:
    """Passed / failed / skipped counts, in all and per dtype named in the test ids."""
    cases = ET.parse(path).getroot().iter("testcase")
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    by_dtype: dict[str, dict[str, int]] = {}
    failures = []
    for case in cases:
        outcome = _outcome(case)
        counts[outcome] += 1
        dtype = next((d for d in DTYPES if re.search(rf"\b{d}\b", case.get("name", ""))), None)
        if dtype:
            by_dtype.setdefault(dtype, {"passed": 0, "failed": 0, "skipped": 0})[outcome] += 1
        if outcome == "failed":
            failures.append(case.get("name"))
    dtypes = ", ".join(f"{d} {c['passed']}/{c['passed'] + c['failed']}" for d, c in by_dtype.items())
    headline = f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"
    return {
        **counts,
        "by_dtype": by_dtype,
        "failures": failures[:20],
        "headline": headline + (f" ({dtypes})" if dtypes else ""),
    }


def _outcome(case: ET.Element) -> str:
    if case.find("failure") is not None or case.find("error") is not None:
        return "failed"
    return "skipped" if case.find("skipped") is not None else "passed"


def bf16(path: Path) -> dict:
    data = json.loads(path.read_text())
    rates = ", ".join(f"{arch} {row['prefix_agreement']:.0%}" for arch, row in data["models"].items())
    return {
        **data,
        "headline": f"first {data['tokens']} tokens equal fp32 HF's: {rates} (mean share of prompts' tokens)",
    }


def bandwidth(path: Path) -> dict:
    data = json.loads(path.read_text())
    shares = [r["fraction_of_copy"] for r in data["rows"]]
    return {
        **data,
        "headline": f"copy {data['copy_bandwidth_gbs']:.0f} GB/s; decode {min(shares):.0%}-{max(shares):.0%} "
        f"of it over {len(shares)} shapes",
    }


def worker_step(path: Path) -> dict:
    data = json.loads(path.read_text())
    best = max(data["rows"], key=lambda r: r["batch"])
    return {
        **data,
        "headline": f"{best['model']} batch {best['batch']}: {best['conveyor_tok_s']:.0f} tok/s, "
        f"{best['ratio']:.2f}x HF",
    }


def mixed(path: Path) -> dict:
    """bench.run's results.json; it writes one before its baselines, so a part cut short
    still reports Conveyor's side."""
    data = json.loads(path.read_text())
    systems = data["systems"]
    conveyor, static = systems.get("Conveyor"), systems.get("static batching (HF)")
    out = {
        "workload": data.get("workload"),
        "conveyor": conveyor,
        "static": static,
        "ratios": data.get("ratios"),
        "machine": data.get("machine"),
    }
    parts = (
        [f"Conveyor {conveyor['output_throughput']:.0f} tok/s ({conveyor['completed']} done)"]
        if conveyor
        else []
    )
    if static and conveyor:
        parts.append(
            f"static {static['output_throughput']:.0f} tok/s: "
            f"{conveyor['output_throughput'] / static['output_throughput']:.2f}x"
        )
    elif not static:
        parts.append("static batching did not finish")
    return {**out, "headline": "; ".join(parts)}
