"""`make test` lints, format-checks and type-checks before any test runs (`make lint`), and each
of those fails on a violation: shown here on planted ones, with the project's own settings."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CLEAN = '"""A clean module."""\n\n\ndef double(x: int) -> int:\n    return 2 * x\n'


def run(tmp_path: Path, *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / cmd[0]), *cmd[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False
    )


def project(tmp_path: Path, module: str) -> Path:
    """A copy of the project's settings with one module at shared/probe.py: the strict types
    apply to shared/ there as here."""
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "__init__.py").write_text("")
    (tmp_path / "shared" / "probe.py").write_text(module)
    return tmp_path / "shared" / "probe.py"


def test_make_test_runs_lint_format_and_types_first():
    plan = subprocess.run(
        ["make", "-n", "test"], cwd=REPO, capture_output=True, text=True, timeout=60, check=True
    ).stdout.splitlines()
    steps = [
        next(i for i, line in enumerate(plan) if word in line)
        for word in ("ruff check", "ruff format --check", "mypy", "pytest")
    ]
    assert steps == sorted(steps), plan


def test_the_clean_probe_passes(tmp_path):
    project(tmp_path, CLEAN)
    for cmd in (("ruff", "check", "shared"), ("ruff", "format", "--check", "shared"), ("mypy", "shared")):
        result = run(tmp_path, *cmd)
        assert result.returncode == 0, (cmd, result.stdout, result.stderr)


def test_ruff_fails_on_a_lint_violation(tmp_path):
    project(tmp_path, "import os\n" + CLEAN)
    result = run(tmp_path, "ruff", "check", "shared")
    assert result.returncode == 1 and "F401" in result.stdout, result.stdout


def test_ruff_fails_on_unformatted_code(tmp_path):
    project(tmp_path, CLEAN.replace("return 2 * x", "return 2*x"))
    result = run(tmp_path, "ruff", "format", "--check", "shared")
    assert result.returncode == 1 and "probe.py" in result.stdout, result.stdout


def test_mypy_fails_on_an_untyped_function_in_shared(tmp_path):
    project(tmp_path, CLEAN + "\n\ndef untyped(x):\n    return x\n")
    result = run(tmp_path, "mypy", "shared")
    assert result.returncode == 1 and "no-untyped-def" in result.stdout, result.stdout


def test_mypy_fails_on_a_type_error(tmp_path):
    project(tmp_path, CLEAN + '\n\nWRONG: int = double("2")\n')
    result = run(tmp_path, "mypy", "shared")
    assert result.returncode == 1 and "arg-type" in result.stdout, result.stdout
