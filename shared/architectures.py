"""What Conveyor serves: the model architectures its worker runs, and the error a process
raises for a model it cannot serve (a directory, a config or a .gguf file), naming what to fix."""

from __future__ import annotations

from shared.config import ConfigError

SUPPORTED_ARCHITECTURES = (
    "Gemma3ForCausalLM",
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Phi3ForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
)


class ModelLoadError(ConfigError):
    """The model directory cannot be served; the message tells the user what to fix."""
