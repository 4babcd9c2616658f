"""Gemma 3 (text: Gemma3ForCausalLM), on the same paged attention, kernels and layer ops
as the Llama family. What differs, each as transformers' Gemma3 does it:

- four RMSNorms a layer (input, post-attention, pre- and post-feedforward), the attention
  and MLP outputs normed before they join the residual stream; q/k norm per head;
- every RMSNorm multiplies by (1 + w): the loader stores 1 + w, computed in fp32, so the
  shared norm kernels apply it unchanged (exact in fp32);
- embeddings scaled by sqrt(hidden_size), in the weights' dtype;
- layers of two kinds by `layer_types`: sliding-window ("sliding_attention", the kernels
  apply the window) and global ("full_attention"), each kind with its own rope table;
- attention scaled by query_pre_attn_scalar ** -0.5, not head_dim's;
- a gelu-tanh gated MLP (the layer ops' eager path: the fused CPU kernel is SiLU's, and
  the worker names that slow path); logit soft-capping where final_logit_softcapping is set.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from types import SimpleNamespace

import torch
from transformers.activations import ACT2FN

from services.gpu_worker.model import AttentionMetadata, DecoderModel, LayerWeights
from services.gpu_worker.rope import RotaryEmbedding
from shared.models import ModelLoadError

SLIDING, GLOBAL = "sliding_attention", "full_attention"


@dataclasses.dataclass
class Gemma3Layer(LayerWeights):
    pre_feedforward_norm: torch.Tensor | None = None
    post_feedforward_norm: torch.Tensor | None = None
    layer_type: str = GLOBAL


class Gemma3Model(DecoderModel):
    layers: Sequence[Gemma3Layer]  # build() gives it only those

    def __init__(
        self,
        *args,
        rotaries: dict[str, RotaryEmbedding],
        query_pre_attn_scalar: float,
        final_logit_softcapping: float | None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.rotaries = rotaries
        self.scale = query_pre_attn_scalar**-0.5
        self.softcap = final_logit_softcapping
        hidden = self.shape.hidden_size
        self.embed_scale = torch.tensor(hidden**0.5).to(
            self.dtype
        )  # as transformers: the scalar in the weights' dtype

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        h = self.embed(input_ids) * self.embed_scale
        ropes = {kind: table.for_positions(positions, self.dtype) for kind, table in self.rotaries.items()}
        norm, eps = self.ops.rms_norm, self.shape.rms_norm_eps
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            x = self._attention(
                layer, norm(h, layer.input_norm, eps), ropes[layer.layer_type], meta, k_cache, v_cache
            )
            h = h + norm(x, layer.post_attention_norm, eps)
            x = self._mlp(layer, norm(h, layer.pre_feedforward_norm, eps))
            h = h + norm(x, layer.post_feedforward_norm, eps)
        return norm(h, self.final_norm, eps)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def _one_plus(w: torch.Tensor | None) -> torch.Tensor | None:
    return None if w is None else (1.0 + w.float()).to(w.dtype)


def rotaries(config, head_dim: int, max_positions: int, device: torch.device) -> dict[str, RotaryEmbedding]:
    """One rope table per kind of layer, from that kind's rope_parameters (default or linear)."""
    out = {}
    for kind in sorted(set(config.layer_types)):
        params = dict(config.rope_parameters[kind])
        rope_type = params.get("rope_type", "default")
        if rope_type not in ("default", "linear"):
            raise ModelLoadError(
                f"Gemma 3: rope type {rope_type!r} for {kind} layers is not supported "
                f"(supported: default, linear)"
            )
        table = RotaryEmbedding(
            SimpleNamespace(rope_parameters={"rope_type": "default", "rope_theta": params["rope_theta"]}),
            head_dim,
            max_positions,
            device,
        )
        if rope_type == "linear":  # positions divided by the factor: the same as frequencies divided by it
            table = RotaryEmbedding.__new__(RotaryEmbedding)
            base = params["rope_theta"]
            inv_freq = (
                1.0
                / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
                / params["factor"]
            )
            angles = torch.arange(max_positions, dtype=torch.float)[:, None] * inv_freq[None, :]
            emb = torch.cat((angles, angles), dim=-1)
            table.cos, table.sin = emb.cos().to(device), emb.sin().to(device)
        out[kind] = table
    return out


def check_config(config) -> None:
    if config.hidden_activation not in ACT2FN:
        raise ModelLoadError(f"unsupported activation {config.hidden_activation!r}")
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise ModelLoadError("Gemma: attention logit soft-capping (attn_logit_softcapping) is not supported")
    if getattr(config, "use_bidirectional_attention", False):
        raise ModelLoadError("Gemma: bidirectional attention (use_bidirectional_attention) is not supported")
    kinds = set(config.layer_types)
    if not kinds <= {SLIDING, GLOBAL} or len(config.layer_types) != config.num_hidden_layers:
        raise ModelLoadError(
            f"Gemma 3: layer_types must name {SLIDING} or {GLOBAL} for each layer (got {config.layer_types})"
        )


def gemma3_layers(layers: list[LayerWeights], ckpt, config) -> list[Gemma3Layer]:
    """The shared loader's layers, with Gemma's feedforward norms, its kinds of layer, and
    every norm stored as 1 + w."""
    out = []
    for i, layer in enumerate(layers):
        p = f"model.layers.{i}."
        fields = {f.name: getattr(layer, f.name) for f in dataclasses.fields(layer)}
        for name in ("input_norm", "post_attention_norm", "q_norm", "k_norm"):
            fields[name] = _one_plus(fields[name])
        # Each layer's window is set by the loader from layer_types, as for every family.
        out.append(
            Gemma3Layer(
                **fields,
                layer_type=config.layer_types[i],
                pre_feedforward_norm=_one_plus(ckpt.take(p + "pre_feedforward_layernorm.weight")),
                post_feedforward_norm=_one_plus(ckpt.take(p + "post_feedforward_layernorm.weight")),
            )
        )
    return out


def activation(config):
    return ACT2FN[config.hidden_activation]


def build(
    shape,
    embed,
    layers,
    final_norm,
    lm_head,
    config,
    device: torch.device,
    attention_backend,
    cls: type[DecoderModel] = DecoderModel,
    layer_ops: str = "auto",
) -> Gemma3Model:
    """`cls`: DecoderModel, or a subclass that wraps the forward pass (tensor parallelism's
    rank 0 hands each step's inputs to the other ranks first): combined with Gemma's."""
    klass = Gemma3Model if cls is DecoderModel else type(f"{cls.__name__}Gemma3", (cls, Gemma3Model), {})
    return klass(
        shape,
        embed,
        layers,
        _one_plus(final_norm),
        lm_head,
        None,
        activation(config),
        attention_backend,
        layer_ops,
        rotaries=rotaries(config, shape.head_dim, shape.max_position_embeddings, device),
        query_pre_attn_scalar=config.query_pre_attn_scalar,
        final_logit_softcapping=getattr(config, "final_logit_softcapping", None),
    )


def is_gemma3(config) -> bool:
    return getattr(config, "model_type", None) == "gemma3_text"
