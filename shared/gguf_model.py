"""GGUF files served as they are: CONVEYOR_MODEL=/path/model.gguf (what Ollama and llama.cpp
users already have). The file's metadata gives the config, the tokenizer and the chat
template; its weights, in any quant type llama.cpp writes, are dequantized by the `gguf`
package (through transformers, which reads GGUF that way). The result is written once as a
Hugging Face directory (fp32 safetensors) in the cache, keyed by the file's path, size and
modification time; every process then serves that directory, and the worker casts the fp32
weights to its serving dtype as it loads them. fp32 on disk because dequantized values
(scale × quant + min) are exact in fp32 and not in bf16; the cost is disk, 4 bytes a weight.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from shared.architectures import SUPPORTED_ARCHITECTURES, ModelLoadError
from shared.model_cache import cache_root, save_model_dir

# The GGUF `general.architecture` of each served family. llama.cpp writes Mistral (without
# a sliding window) and SmolLM as "llama".
GGUF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
}
assert set(GGUF_ARCHITECTURES.values()) <= set(SUPPORTED_ARCHITECTURES)

# A converted directory is moved into place whole: one that has these files is complete.
CONVERTED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)


def is_gguf(model: str | Path) -> bool:
    return Path(model).suffix.lower() == ".gguf"


def gguf_architecture(path: Path) -> str:
    """`general.architecture` from the file's header, or ModelLoadError saying what is wrong."""
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {str(path)!r} does not exist (CONVEYOR_MODEL / --model)")
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ModelLoadError(
            "serving a .gguf file needs the `gguf` package (a dependency of conveyor: reinstall with `make`)"
        ) from None
    try:
        field = GGUFReader(path).get_field("general.architecture")
    except Exception as e:  # noqa: BLE001 — a truncated or foreign file: the reader has no single error type
        raise ModelLoadError(f"{str(path)!r} is not a readable GGUF file: {e}") from None
    if field is None:
        raise ModelLoadError(f"{str(path)!r} has no general.architecture in its metadata")
    return str(field.contents())


def check_gguf(path: Path) -> str:
    """The Hugging Face architecture the file holds, once we can serve it, else ModelLoadError."""
    arch = gguf_architecture(path)
    if arch not in GGUF_ARCHITECTURES:
        raise ModelLoadError(
            f"unsupported GGUF architecture {arch!r} in {str(path)!r}; "
            f"supported: {', '.join(GGUF_ARCHITECTURES)}"
        )
    return GGUF_ARCHITECTURES[arch]


def converted_dir(path: Path) -> Path:
    """Where the file's Hugging Face directory lives in the cache: a new file, or the same
    path rewritten, gets a new one. Its last part is the file's name without .gguf, which
    is the name clients send (the served model name defaults to the directory's name)."""
    path = path.resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "models" / "gguf" / key / path.stem


def ensure_converted(path: str | Path) -> Path:
    """The Hugging Face directory serving the GGUF file `path`, converted on first use."""
    path = Path(path).expanduser()
    check_gguf(path)
    out = converted_dir(path)
    if not all((out / f).is_file() for f in CONVERTED_FILES):
        convert_gguf(path, out)
    return out


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """A Hugging Face directory (fp32 safetensors, tokenizer, chat template) from a GGUF file.
    transformers' save_pretrained refuses a model loaded from GGUF, so the dequantized
    weights are copied into a plain model built from the same config and saved from there."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    kw = dict(gguf_file=gguf.name, local_files_only=True)
    try:
        config = AutoConfig.from_pretrained(gguf.parent, **kw)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    except (OSError, ValueError, KeyError, NotImplementedError) as e:
        raise ModelLoadError(f"cannot read {str(gguf)!r} as a model: {e}") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the saved weights are plain fp32
    config.dtype = torch.float32
    # transformers leaves from_config unannotated: a call mypy cannot check.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    # A tied LM head has no tensor of its own; anything else missing is a conversion bug.
    if unexpected or not set(missing) <= {"lm_head.weight"}:
        raise ModelLoadError(
            f"{str(gguf)!r}: tensors that do not fit its config (missing {sorted(missing)}, "
            f"unexpected {sorted(unexpected)})"
        )
    model.tie_weights()
    eos = config.eos_token_id
    model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]  # transformers: unannotated
        bos_token_id=config.bos_token_id,
        eos_token_id=eos,
        pad_token_id=getattr(config, "pad_token_id", None) or eos,
    )
    return save_model_dir(model, tokenizer, out_dir)
