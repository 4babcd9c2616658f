"""Cheap checks of a model directory, run before torch and transformers are imported, so a
wrong path or an unsupported model fails in a fraction of a second with a clear message."""

from __future__ import annotations

import json
from pathlib import Path

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


class ModelLoadError(Exception):
    """The model directory cannot be served; the message tells the user what to fix."""


def check_model_dir(model_dir: str | Path) -> dict:
    """Returns config.json's contents, or raises ModelLoadError saying what is wrong."""
    path = Path(model_dir)
    if not path.is_dir():
        raise ModelLoadError(f"model directory {str(path)!r} does not exist (CONVEYOR_MODEL / --model)")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{str(path)!r} has no config.json: expected a Hugging Face model directory")
    try:
        config = json.loads((path / "config.json").read_text())
    except ValueError as e:
        raise ModelLoadError(f"{str(path / 'config.json')!r} is not valid JSON: {e}") from None
    archs = config.get("architectures") or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise ModelLoadError(
            f"unsupported architecture {archs or 'unknown'} in {str(path)!r}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if config.get("use_sliding_window"):
        raise ModelLoadError("sliding-window attention is not supported (use_sliding_window=true)")
    if config.get("mlp_bias"):
        raise ModelLoadError("MLP biases are not supported (mlp_bias=true)")
    if not any(path.glob("*.safetensors")):
        raise ModelLoadError(f"no *.safetensors files in {str(path)!r}")
    return config
