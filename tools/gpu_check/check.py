"""One command that validates and measures the whole GPU path within a time budget: the
parts of parts.py run one after another (the model build beside them), each under its own
timeout; one that fails or runs out of time is reported and the rest still run. Writes one
results folder (under $OUT when set) and prints a one-screen summary.

    python -m tools.gpu_check.check            # on a CUDA machine (make gpu-check)
    python -m tools.gpu_check.check --dry-run  # here, CPU versions on tiny shapes (make gpu-check DRY_RUN=1)
    python -m tools.gpu_check.check --update-docs RESULTS_JSON  # docs/gpu.md's table from a fetched run

Standard library only in this file: it must run, and report, on the bare image.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from tools.gpu_check.parts import Part, parts
from tools.gpu_check.report import render_table, summary_screen, update_docs

REPO = Path(__file__).resolve().parents[2]
# The device tool allows 600 s a command; the rest is the summary, the tarball and slack.
BUDGET_S = 560
STOP_GRACE_S = 15  # SIGINT lets a part stop what it started (bench.run's servers) before SIGKILL
MIN_TIMEOUT_S = 5  # below this a part is skipped: it could not do anything useful


@dataclass
class Outcome:
    name: str
    what: str
    status: str  # passed, failed, timed out, skipped
    wall_s: float
    estimate_s: float
    timeout_s: float
    rc: int | None = None
    figures: dict = field(default_factory=dict)
    log: str = ""


class Runner:
    """Runs the parts in order, in `cwd`; `deadline` (monotonic) bounds the whole run. A
    part's limit is its own, cut to what the budget leaves after the estimates of the parts
    still to come, so one that overruns cannot take the time of the rest."""

    def __init__(self, plan: list[Part], work: Path, env: dict[str, str], budget_s: float, cwd: Path = REPO):
        self.plan, self.work, self.env, self.cwd = plan, work, env, cwd
        self.deadline = time.monotonic() + budget_s
        self.background: dict[str, tuple[Part, subprocess.Popen, float]] = {}
        self.outcomes: dict[str, Outcome] = {}
        self.ended: dict[str, float] = {}  # when each background part's process exited

    def run(self) -> list[Outcome]:
        for i, part in enumerate(self.plan):
            if part.needs in self.background:
                self._finish_background(part.needs)
            reserve = sum(p.estimate_s for p in self.plan[i + 1 :] if not p.background)
            timeout = min(part.timeout_s, self.deadline - time.monotonic() - reserve)
            if part.background:
                self.background[part.name] = (part, self._start(part), time.monotonic())
                self._note_end(part.name)
            elif timeout < MIN_TIMEOUT_S:
                self.outcomes[part.name] = Outcome(
                    part.name,
                    part.what,
                    "skipped",
                    0.0,
                    part.estimate_s,
                    0.0,
                    figures={"headline": "no time left in the budget"},
                )
            else:
                start = time.monotonic()
                self.outcomes[part.name] = self._wait(part, self._start(part), start, timeout)
            print(self._line(self.outcomes.get(part.name), part), flush=True)
        for name in list(self.background):
            self._finish_background(name)
        return [self.outcomes[p.name] for p in self.plan]

    def _start(self, part: Part) -> subprocess.Popen:
        with open(self.work / f"{part.name}.log", "wb") as log:  # the child holds its own descriptor
            # Its own process group, so a timeout stops everything the part started.
            return subprocess.Popen(
                part.argv,
                cwd=self.cwd,
                env={**self.env, **part.env},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def _note_end(self, name: str) -> None:
        """A watcher of the background part, so its wall time is its own, not the wait for it."""
        part, proc, _ = self.background[name]
        watcher = threading.Thread(
            target=lambda: (proc.wait(), self.ended.setdefault(name, time.monotonic())), daemon=True
        )
        watcher.start()

    def _finish_background(self, name: str) -> None:
        part, proc, start = self.background.pop(name)
        left = max(
            MIN_TIMEOUT_S, min(part.timeout_s - (time.monotonic() - start), self.deadline - time.monotonic())
        )
        outcome = self._wait(part, proc, start, left)
        outcome.wall_s = self.ended.get(name, time.monotonic()) - start
        self.outcomes[name] = outcome
        print(self._line(outcome, part), flush=True)

    def _wait(self, part: Part, proc: subprocess.Popen, start: float, timeout: float) -> Outcome:
        try:
            rc = proc.wait(timeout=max(0.0, timeout - (time.monotonic() - start)))
            status = "passed" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            rc, status = stop(proc), "timed out"
        outcome = Outcome(
            part.name,
            part.what,
            status,
            time.monotonic() - start,
            part.estimate_s,
            timeout,
            rc,
            log=str(self.work / f"{part.name}.log"),
        )
        outcome.figures = self._figures(part)
        return outcome

    def _figures(self, part: Part) -> dict:
        if part.figures is None:
            return {"headline": last_line(self.work / f"{part.name}.log")}
        try:
            return part.figures(self.work)
        except (OSError, ValueError, KeyError, TypeError, ET.ParseError) as e:
            # No result file, or half of one: the log's last line usually says why.
            log = last_line(self.work / f"{part.name}.log")
            return {"headline": f"no figures ({type(e).__name__}); log: {log}", "error": str(e)}

    def _line(self, outcome: Outcome | None, part: Part) -> str:
        if outcome is None:
            return f"[gpu-check] {part.name}: started in the background"
        return (
            f"[gpu-check] {part.name}: {outcome.status} in {outcome.wall_s:.0f} s "
            f"(limit {outcome.timeout_s:.0f} s) - {outcome.figures.get('headline', '')}"
        )


def stop(proc: subprocess.Popen) -> int | None:
    """SIGINT to the part's group (Python runs its finally blocks), then SIGKILL."""
    for sig, grace in ((signal.SIGINT, STOP_GRACE_S), (signal.SIGKILL, STOP_GRACE_S)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            return proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
    return proc.poll()


def last_line(path: Path) -> str:
    lines = (
        [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()] if path.exists() else []
    )
    return lines[-1][:120] if lines else "(no output)"


def device_name(dry: bool) -> str:
    if dry or shutil.which("nvidia-smi") is None:
        return "CPU (dry run)" if dry else "no nvidia-smi"
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
        capture_output=True,
        text=True,
    )
    return out.stdout.strip().replace("\n", "; ") or f"nvidia-smi failed: {out.stderr.strip()}"


def git_commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def folders(args: argparse.Namespace) -> tuple[Path, Path]:
    """(results, work): results under $OUT when set (few files: the device tool brings back
    8 at most), else bench/results/; the parts' own files go to work, then into a tarball."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = os.environ.get("OUT")
    results = args.results or (
        Path(out) / "gpu-check"
        if out
        else REPO / "bench" / "results" / f"gpu-check{'-dry' if args.dry_run else ''}-{stamp}"
    )
    work = Path(tempfile.mkdtemp(prefix="gpu-check-")) if out and not args.results else results / "raw"
    results.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    return results, work


def write_results(results: Path, work: Path, record: dict, dry: bool) -> None:
    (results / "results.json").write_text(json.dumps(record, indent=2, default=str))
    table = render_table(record)
    (results / "gpu_table.md").write_text(table)
    (results / "summary.md").write_text(summary_screen(record) + "\n")
    if not work.is_relative_to(results):  # a scratch folder: its files travel as one tarball
        with tarfile.open(results / "gpu-check-files.tar.gz", "w:gz") as tar:
            tar.add(work, arcname="gpu-check-files")
        shutil.rmtree(work)
    if not dry:  # a dry run must not rewrite the committed doc
        update_docs(REPO / "docs" / "gpu.md", table)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU / TRITON_INTERPRET=1 versions on tiny shapes")
    ap.add_argument(
        "--results", type=Path, help="results folder (default: $OUT/gpu-check, else bench/results/)"
    )
    ap.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all parts together")
    ap.add_argument("--only", nargs="+", help="run only these parts (names as in the summary)")
    ap.add_argument("--site", type=Path, default=Path("/tmp/site"), help="where the wheels are installed")
    ap.add_argument(
        "--update-docs", type=Path, metavar="RESULTS_JSON", help="only rewrite docs/gpu.md's table"
    )
    args = ap.parse_args(argv)
    if args.update_docs:
        update_docs(REPO / "docs" / "gpu.md", render_table(json.loads(args.update_docs.read_text())))
        return 0
    results, work = folders(args)
    plan = parts(args.dry_run, sys.executable, work, args.site)
    if args.only:
        unknown = set(args.only) - {p.name for p in plan}
        if unknown:
            ap.error(f"--only: no part named {sorted(unknown)}; the parts are {[p.name for p in plan]}")
        plan = [p for p in plan if p.name in args.only]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    if not args.dry_run:  # what the install part puts there comes first, before the image's
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(args.site), os.environ.get("PYTHONPATH")]))
    started = time.monotonic()
    outcomes = Runner(plan, work, env, args.budget).run()
    record = {
        "dry_run": args.dry_run,
        "device": device_name(args.dry_run),
        "commit": git_commit(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "wall_s": time.monotonic() - started,
        "budget_s": args.budget,
        "parts": [asdict(o) for o in outcomes],
    }
    write_results(results, work, record, args.dry_run)
    print("\n" + summary_screen(record) + f"\nresults: {results}")
    return 0 if all(o.status == "passed" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
