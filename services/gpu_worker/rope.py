"""Rotary position embeddings, computed once per model into a cos/sin table.

The inverse frequencies come from transformers' own rope functions (default, linear,
llama3, yarn, longrope), so scaled variants match the reference implementation exactly.

LongRoPE (Phi-3 128k, Phi-3.5, Phi-4-mini) has two sets of frequencies: short ones for the
original context (`original_max_position_embeddings`) and long ones beyond it. As vLLM, one
set serves every position: the long one when the served max_model_len exceeds the original
context, else the short one, so a key's rotation never depends on its request's length (a
cached block stays valid). transformers switches a sequence to the long set once it grows
past the original context, recomputing all of it: the two agree wherever a sequence stays
within the original context (served with max_model_len up to it) or starts beyond it (served
longer), and differ only for the tokens a longer-served sequence makes before it gets there.
"""

from __future__ import annotations

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

# Types whose frequencies change with the sequence length at run time; a fixed table
# cannot represent them.
UNSUPPORTED_ROPE = {"dynamic"}
SUPPORTED_ROPE = "default, linear, llama3, yarn, longrope"


class RotaryEmbedding:
    def __init__(
        self,
        config,
        head_dim: int,
        max_positions: int,
        device: torch.device,
        max_model_len: int | None = None,
    ):
        """`max_model_len`: the context served (None: max_positions); it picks LongRoPE's set."""
        params = dict(getattr(config, "rope_parameters", None) or {})
        rope_type = params.get("rope_type", "default")
        if rope_type in UNSUPPORTED_ROPE:
            raise ValueError(f"rope type {rope_type!r} is not supported (supported: {SUPPORTED_ROPE})")
        if rope_type == "default":
            base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
            inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
            scaling = 1.0
        else:
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
        if rope_type == "longrope":
            original = config.rope_parameters[
                "original_max_position_embeddings"
            ]  # filled in by the call above
            served = max_positions if max_model_len is None else max_model_len
            if served > original:  # the long set: what transformers computes past the original context
                inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](
                    config, torch.device("cpu"), seq_len=original + 1
                )
        # Same arithmetic as transformers: fp32 angles, cos/sin of the doubled frequencies.
        angles = torch.arange(max_positions, dtype=torch.float)[:, None] * inv_freq.float()[None, :]
        emb = torch.cat((angles, angles), dim=-1)
        self.cos = (emb.cos() * scaling).to(device)
        self.sin = (emb.sin() * scaling).to(device)

    def for_positions(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin rows for a batch's positions: looked up once per forward, used by every layer."""
        return self.cos[positions].to(dtype)[:, None, :], self.sin[positions].to(dtype)[:, None, :]


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q: [T, H, D], k: [T, Hkv, D], cos/sin from `for_positions` -> rotated (q, k)."""
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
