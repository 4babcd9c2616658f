"""Loads a Llama-family model from a Hugging Face directory into a `DecoderModel`.

transformers reads the config (and is the reference we test against); the weights are
read straight from the safetensors files and fused where one matmul can do two's work.
Anything we cannot serve correctly fails here, at start-up, with a message saying why.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig
from transformers.activations import ACT2FN

from services.gpu_worker.linear import Linear, use_onednn
from services.gpu_worker.model import DecoderModel, LayerWeights, ModelShape
from services.gpu_worker.rope import RotaryEmbedding
from shared.models import ModelLoadError, check_model_dir


def load_config(model_dir: str | Path):
    check_model_dir(model_dir)
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    if config.hidden_act not in ACT2FN:
        raise ModelLoadError(f"unsupported activation {config.hidden_act!r}")
    return config


def model_shape(config) -> ModelShape:
    heads = config.num_attention_heads
    return ModelShape(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_layers=config.num_hidden_layers,
        num_heads=heads, num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        rms_norm_eps=config.rms_norm_eps, max_position_embeddings=config.max_position_embeddings)


def load_model(model_dir: str | Path, device: torch.device, dtype: torch.dtype, attention_backend,
               linear_backend: str = "auto") -> DecoderModel:
    config = load_config(model_dir)
    onednn = use_onednn(linear_backend, device, dtype)
    shape = model_shape(config)
    weights = _read_safetensors(Path(model_dir), device, dtype)

    def take(name: str, required: bool = True):
        if name in weights:
            return weights.pop(name)
        if required:
            raise ModelLoadError(f"weight {name!r} is missing from the safetensors files in {str(model_dir)!r}")
        return None

    layers = []
    for i in range(shape.num_layers):
        p = f"model.layers.{i}."
        qkv = [take(p + f"self_attn.{n}_proj.weight") for n in "qkv"]
        biases = [take(p + f"self_attn.{n}_proj.bias", required=False) for n in "qkv"]
        layers.append(LayerWeights(
            input_norm=take(p + "input_layernorm.weight"),
            qkv=Linear(torch.cat(qkv), torch.cat(biases) if all(b is not None for b in biases) else None, onednn),
            o=Linear(take(p + "self_attn.o_proj.weight"), take(p + "self_attn.o_proj.bias", required=False), onednn),
            q_norm=take(p + "self_attn.q_norm.weight", required=False),
            k_norm=take(p + "self_attn.k_norm.weight", required=False),
            post_attention_norm=take(p + "post_attention_layernorm.weight"),
            gate_up=Linear(torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]), None, onednn),
            down=Linear(take(p + "mlp.down_proj.weight"), None, onednn),
        ))
    embed = take("model.embed_tokens.weight")
    tied = getattr(config, "tie_word_embeddings", False)
    lm_head = take("lm_head.weight", required=not tied)
    return DecoderModel(
        shape=shape, embed_tokens=embed, layers=layers, final_norm=take("model.norm.weight"),
        lm_head=Linear(embed if lm_head is None else lm_head, None, onednn),
        rotary=RotaryEmbedding(config, shape.head_dim, shape.max_position_embeddings, device),
        act=ACT2FN[config.hidden_act], attention_backend=attention_backend)


def _read_safetensors(model_dir: Path, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    weights = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(f, framework="pt", device="cpu") as st:
            for name in st.keys():
                weights[name] = st.get_tensor(name).to(device=device, dtype=dtype)
    return weights
