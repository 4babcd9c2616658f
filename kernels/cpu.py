"""The CPU attention backend: C++ paged decode and prefill kernels (kernels/csrc/*_attention.cpp)
that read K/V in place from the cache blocks, and the cache writer (store_kv.cpp), built on first
use with torch's JIT extension loader and cached in the torch extensions dir (~/.cache/torch_extensions).
"""

import functools
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from torch import Tensor
from torch.utils import cpp_extension

from kernels import reference

CSRC = Path(__file__).parent / "csrc"
# A lock this old in the build directory belongs to no running build (one takes ~30 s here).
STALE_LOCK_S = 600.0
log = logging.getLogger(__name__)
SOURCES = [CSRC / "decode_attention.cpp", CSRC / "prefill_attention.cpp", CSRC / "store_kv.cpp"]
# The head dims the kernels are compiled for (CONVEYOR_HEAD_DIMS in csrc/softmax_math.h); any
# GQA group is served. Other shapes go to the reference, and unserved() says so at start-up.
HEAD_DIMS, MAX_BLOCK_SIZE = (32, 64, 80, 96, 112, 128, 160, 192, 256), 128
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


@functools.cache
def load() -> torch._ops.OpOverload:
    """Build or load the attention extension (decode, prefill, store_kv) and return its decode op."""
    build("conveyor_cpu_attention", SOURCES)
    return torch.ops.conveyor_cpu.decode_attention.default


def unserved(head_dim: int, block_size: int = MAX_BLOCK_SIZE) -> str | None:
    """Why the kernels cannot serve this shape (the reference then does), or None."""
    if head_dim not in HEAD_DIMS:
        return f"head_dim {head_dim} has no compiled kernel (compiled: {', '.join(map(str, HEAD_DIMS))})"
    if block_size > MAX_BLOCK_SIZE:
        return f"block_size {block_size} exceeds the kernels' {MAX_BLOCK_SIZE}"
    return None


def _compiled_for(q: Tensor, k_cache: Tensor) -> bool:
    _, block_size, _, head_dim = k_cache.shape
    return head_dim in HEAD_DIMS and block_size <= MAX_BLOCK_SIZE


def decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    scale: float,
    out: Tensor | None = None,
    num_splits: int | None = None,
    window: int | None = None,
) -> Tensor:
    """Same contract as kernels.reference.decode_attention; num_splits (a Triton knob) is ignored."""
    out = torch.empty_like(q, memory_format=torch.contiguous_format) if out is None else out
    if q.shape[0] == 0:
        return out
    if not _compiled_for(q, k_cache):
        return reference.decode_attention(
            q, k_cache, v_cache, block_tables, seq_lens, scale, out, window=window
        )
    # The kernel walks rows by stride but needs head_dim contiguous and int32 metadata;
    # the engine already passes exactly that, so these are no-ops on the serving path.
    if q.stride(-1) != 1:
        q = q.contiguous()
    load()(q, k_cache, v_cache, block_tables.int(), seq_lens.int(), scale, window or 0, out)
    return out


def store_kv(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """Same contract as kernels.reference.store_kv."""
    load()
    # The kernel copies each token's row whole; the engine's k and v already are such rows.
    key, value = (
        x if x.stride(-1) == 1 and x.stride(-2) == x.shape[-1] else x.contiguous() for x in (key, value)
    )
    torch.ops.conveyor_cpu.store_kv(key, value, k_cache, v_cache, slot_mapping.long())


def prefill_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    cu_seqlens_q: Tensor,
    seq_lens: Tensor,
    scale: float,
    out: Tensor | None = None,
    window: int | None = None,
) -> Tensor:
    """Same contract as kernels.reference.prefill_attention."""
    out = torch.empty_like(q, memory_format=torch.contiguous_format) if out is None else out
    if q.shape[0] == 0:
        return out
    if not _compiled_for(q, k_cache):
        return reference.prefill_attention(
            q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale, out, window=window
        )
    if q.stride(-1) != 1:
        q = q.contiguous()
    load()
    torch.ops.conveyor_cpu.prefill_attention(
        q, k_cache, v_cache, block_tables.int(), cu_seqlens_q.int(), seq_lens.int(), scale, window or 0, out
    )
    return out


if (
    __name__ == "__main__"
):  # `python -m kernels.cpu`: build now (make does, after install), not at first start
    from kernels import cpu_elementwise

    load()
    cpu_elementwise.load()
    print(f"cpu kernels built: {torch.ops.conveyor_cpu.decode_attention}, {cpu_elementwise.OPS}")
