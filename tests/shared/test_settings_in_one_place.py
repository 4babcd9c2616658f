"""Every setting is read in shared/config.py, typed and documented (STYLE.md: "one place for
settings"): no production module reads the environment itself, except the few lines below,
which read no setting."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("services", "shared", "kernels", "conveyor")
SETTINGS = "shared/config.py"
_ENV = {"environ", "environb", "getenv", "getenvb"}

# (file, the line as written): why it is not a setting read outside shared/config.py.
ALLOWED = {
    # `make run` hands each child the launcher's own environment plus the CONVEYOR_* it plans:
    # passed on whole, not read.
    ("conveyor/launcher.py", "env = dict(os.environ)"),
    # The C++ build finds the venv's ninja on this process's PATH (torch runs it from there):
    # the tool search path, set for the build, not a Conveyor setting.
    ("kernels/cpu_build.py", 'os.environ["PATH"] = venv_bin + os.pathsep + os.environ.get("PATH", "")'),
}


def environment_reads(path: Path, root: Path = REPO) -> set[tuple[str, str]]:
    """(file from `root`, line) of each use of os.environ / os.getenv in `path`, however imported."""
    source = path.read_text()
    lines = source.splitlines()
    name = str(path.relative_to(root))
    found = set()
    for node in ast.walk(ast.parse(source, name)):
        uses = (
            isinstance(node, ast.Attribute)
            and node.attr in _ENV
            and isinstance(node.value, ast.Name)
            and node.value.id == "os"
        )
        imports = (
            isinstance(node, ast.ImportFrom)
            and node.module == "os"
            and any(alias.name in _ENV for alias in node.names)
        )
        if uses or imports:
            found.add((name, lines[node.lineno - 1].strip()))
    return found


def test_settings_are_read_in_shared_config_only():
    found = set()
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            if str(path.relative_to(REPO)) != SETTINGS:
                found |= environment_reads(path)
    unexplained = sorted(found - ALLOWED)
    assert not unexplained, (
        "environment read outside shared/config.py: make it a field of its settings class "
        f"there (CONVEYOR_<FIELD> and --flag), or explain it in ALLOWED: {unexplained}"
    )
    assert found >= ALLOWED, f"stale ALLOWED entries (keep the list short): {sorted(ALLOWED - found)}"


def test_the_check_sees_every_way_of_reading(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import os\nfrom os import getenv\na = os.environ.get('A')\nb = os.getenv('B')\nc = 1\n"
    )
    assert {line for _, line in environment_reads(sample, tmp_path)} == {
        "from os import getenv",
        "a = os.environ.get('A')",
        "b = os.getenv('B')",
    }
