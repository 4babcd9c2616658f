"""How the C++ CPU kernels are built: torch's JIT extension loader compiles an extension's
sources on first use (~30 s) and caches it in the torch extensions dir (~/.cache/torch_extensions).
The attention kernels (cpu.py) and the fused elementwise ops (cpu_elementwise.py) both build here.
"""

import logging
import os
import shutil
import sys
import time
from pathlib import Path

from torch.utils import cpp_extension

# A lock this old in the build directory belongs to no running build (one takes ~30 s here).
STALE_LOCK_S = 600.0
log = logging.getLogger(__name__)
# Built where it runs, so -march=native is safe and gives the loops AVX2/AVX-512. Reassociation
# turns each dot product's horizontal sum into a tree instead of a chain of 16 scalar adds;
# infinities and NaN keep their meaning (no -ffast-math: the online softmax starts at -inf).
CFLAGS = [
    "-O3",
    "-march=native",
    "-fopenmp",
    "-fno-math-errno",
    "-fassociative-math",
    "-fno-signed-zeros",
    "-fno-trapping-math",
]


def build(name: str, sources: list[Path], extra_cflags: tuple[str, ...] = ()) -> None:
    """Build (first time, ~30 s) or load the extension `name` from `sources`; it registers its ops.

    Raises RuntimeError naming what is missing when the machine cannot build it.
    """
    # NOTE: the compiler is the toolchain's convention, $CXX, read by torch itself, not a Conveyor
    # setting: asking torch which one it will run keeps the two from disagreeing.
    compiler = cpp_extension.get_cxx_compiler()
    if shutil.which(compiler) is None:
        raise RuntimeError(
            f"building the cpu kernels needs a C++ compiler ({compiler!r} not found; set $CXX)"
        )
    # torch runs `ninja` from $PATH; the pinned pip package puts it beside this python, which
    # is not on $PATH when the venv's python is run without activating the venv. (This process's
    # search path for the build's tools, not a setting: tests/shared/test_settings_in_one_place.py.)
    venv_bin = os.path.dirname(sys.executable)
    if shutil.which("ninja") is None and shutil.which("ninja", path=venv_bin):
        os.environ["PATH"] = venv_bin + os.pathsep + os.environ.get("PATH", "")
    cpp_extension.verify_ninja_availability()  # raises "Ninja is required ..." (pip install ninja)
    clear_stale_lock(Path(cpp_extension._get_build_directory(name, verbose=False)))
    cpp_extension.load(
        name=name,
        sources=[str(p) for p in sources],
        is_python_module=False,
        extra_cflags=CFLAGS + list(extra_cflags),
        extra_ldflags=["-fopenmp"],
    )


def clear_stale_lock(build_dir: Path, stale_after_s: float = STALE_LOCK_S) -> bool:
    """Removes a build lock left by a process killed mid-build (torch would wait on it forever,
    hanging the worker's start); True if it did. A live build holds it for well under a minute."""
    lock = build_dir / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age < stale_after_s:
        return False
    log.warning(
        "removing the stale build lock %s (%.0f s old): a build was killed before it finished", lock, age
    )
    lock.unlink(missing_ok=True)
    return True
