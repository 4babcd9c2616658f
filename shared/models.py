"""Which model directory a process serves (none named: the generated tiny model, in the
cache), and the cheap checks of its config.json that every process makes the same way:
before torch is imported, so a wrong path fails at once with a message saying what to fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Re-exported: every process imports them from here with the checks below.
from shared.architectures import SUPPORTED_ARCHITECTURES as SUPPORTED_ARCHITECTURES
from shared.architectures import ModelLoadError as ModelLoadError
from shared.gguf_model import check_gguf, ensure_converted


def model_dir(model: str | None) -> Path:
    """The directory a process serves: `model` (CONVEYOR_MODEL / --model) when given (a
    .gguf file: its converted directory), else the generated tiny model, built into the
    cache on first use."""
    if model:
        path = Path(model).expanduser()
        if path.suffix.lower() == ".gguf":
            return ensure_converted(path)  # converted once, into the cache
        return path
    # NOTE: shared/'s one import of conveyor/, where the generator lives beside the launcher
    # that serves its model: a gateway or worker started alone (compose) builds it the same
    # way. Here, not at the top: it imports torch, and conveyor.tiny_model imports only
    # shared.model_cache from shared/, so no import circle.
    from conveyor.tiny_model import ensure_tiny_model

    return ensure_tiny_model()


def read_config(path: Path) -> dict[str, Any]:  # config.json: JSON values of any kind
    """config.json of a model directory, or ModelLoadError saying what is wrong."""
    if not path.is_dir():
        raise ModelLoadError(f"model directory {str(path)!r} does not exist (CONVEYOR_MODEL / --model)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{str(path)!r} has no config.json: expected a Hugging Face model directory")
    try:
        config: dict[str, Any] = json.loads(config_file.read_text())
        return config
    except OSError as e:  # unreadable: permissions
        raise ModelLoadError(f"cannot read {str(config_file)!r}: {e.strerror or e}") from None
    except ValueError as e:
        raise ModelLoadError(f"{str(config_file)!r} is not valid JSON: {e}") from None


def check_model_dir(model_dir: str | Path) -> dict[str, Any]:
    """config.json's contents once the worker can run the model, else ModelLoadError. A
    .gguf file (before its conversion): its architecture only, and an empty dict."""
    path = Path(model_dir)
    if path.suffix.lower() == ".gguf":
        check_gguf(path.expanduser())
        return {}
    config = read_config(path)
    archs = config.get("architectures") or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise ModelLoadError(
            f"unsupported architecture {archs or 'unknown'} in {str(path)!r}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if config.get("mlp_bias"):
        raise ModelLoadError("MLP biases are not supported (mlp_bias=true)")
    if not any(path.glob("*.safetensors")):
        raise ModelLoadError(f"no *.safetensors files in {str(path)!r}")
    return config


def config_int(config: dict[str, Any], name: str, path: Path) -> int:
    """A positive integer field of config.json (vocab_size, max_position_embeddings)."""
    value = config.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ModelLoadError(f"{str(path / 'config.json')!r} has no valid {name} (got {value!r})")
    return value


def max_model_len(config: dict[str, Any], path: Path, asked: int | None) -> int:
    """The longest prompt + output: `asked` (--max-model-len), at most the model's
    max_position_embeddings, which is the default. A model with a sliding window (Mistral,
    Phi-3) gets the same: the attention kernels apply the window (the loader's layer_windows)."""
    limit = config_int(config, "max_position_embeddings", path)
    if asked is not None and asked > limit:
        raise ModelLoadError(f"max_model_len {asked} exceeds the model's max_position_embeddings {limit}")
    return asked or limit
