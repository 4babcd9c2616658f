"""Conveyor's own forward pass for Llama-family decoders (Llama, Qwen2, Qwen3).

It runs one flat batch of tokens from many requests: each layer writes the new tokens'
K/V into the paged cache, then attends over each request's pages. Decode tokens (one per
request) come first in the batch and go to the decode kernel; prefill chunks follow.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from services.gpu_worker.batch import AttentionMetadata
from services.gpu_worker.layer_ops import get_layer_ops
from services.gpu_worker.linear import Linear
from services.gpu_worker.moe import SparseMoE
from services.gpu_worker.parallel_layers import RowParallelLinear, VocabParallelEmbedding
from services.gpu_worker.rope import RotaryEmbedding


@dataclass
class ModelShape:
    """On a tensor-parallel rank num_heads and num_kv_heads are that rank's; the rest is global."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: Linear  # q, k and v projections fused into one matrix: one matmul instead of three
    o: Linear | RowParallelLinear
    q_norm: torch.Tensor | None  # Qwen3: RMSNorm over head_dim of each head
    k_norm: torch.Tensor | None
    post_attention_norm: torch.Tensor
    gate_up: Linear | None  # gate and up fused, gate first (None in a mixture-of-experts layer)
    down: Linear | RowParallelLinear | None
    moe: SparseMoE | None = None  # Qwen3-MoE's sparse layers: experts instead of the dense MLP
    # Sliding-window attention: the layer's queries see only the last `window` positions
    # (kernels/reference.py); None: all of them. Set by the loader from the config.
    window: int | None = None


class DecoderModel:
    def __init__(
        self,
        shape: ModelShape,
        embed: VocabParallelEmbedding,
        layers: Sequence[LayerWeights],
        final_norm: torch.Tensor,
        lm_head: Linear | None,
        rotary: RotaryEmbedding,
        act: Callable[[torch.Tensor], torch.Tensor],
        attention_backend,
        layer_ops: str = "auto",
    ):
        """`lm_head`: None on a tensor-parallel rank other than 0, which never samples.
        `layer_ops`: the name get_layer_ops resolves (the worker's setting)."""
        self.shape = shape
        self.embed = embed
        self.layers = layers
        self.final_norm = final_norm
        self.lm_head = lm_head
        self.rotary = rotary
        self.act = act
        # NOTE: a shape the backend's kernels cannot serve runs on the reference, and
        # backends() names it as a slow path: served, never silently.
        self.attn = attention_backend.for_shape(shape.num_heads, shape.num_kv_heads, shape.head_dim)
        self.scale = shape.head_dim**-0.5
        self.dtype = embed.weight.dtype
        self.device = embed.weight.device
        self.ops = get_layer_ops(self.device, act, layer_ops)  # norms, residual adds, rope, activation

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """input_ids, positions: [T] -> hidden states [T, hidden] after the final norm."""
        h = self.embed(input_ids)
        rope = self.rotary.for_positions(positions, self.dtype)
        ops, eps = self.ops, self.shape.rms_norm_eps
        # A sublayer's output joins the residual stream h in the op that norms h for the next
        # sublayer: the next layer's input norm, or the final norm after the last layer.
        next_norms = [layer.input_norm for layer in self.layers[1:]] + [self.final_norm]
        x = ops.rms_norm(h, self.layers[0].input_norm, eps)
        for layer, next_norm, (k_cache, v_cache) in zip(self.layers, next_norms, kv_caches):
            attn = self._attention(layer, x, rope, meta, k_cache, v_cache)
            h, x = ops.add_rms_norm(h, attn, layer.post_attention_norm, eps)
            h, x = ops.add_rms_norm(h, self._mlp(layer, x), next_norm, eps)
        return x

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        assert self.lm_head is not None, "only rank 0 of a tensor-parallel model holds the LM head"
        return self.lm_head(hidden).float()

    def backends(self) -> tuple[dict[str, str], list[str]]:
        """The kernels each part of a step runs on, and the parts that run a slower path than
        their backend's fast one (which op, which shape, why): for the start-up log and figures."""
        linear = self.layers[0].qkv.backend if self.layers else "torch"
        names = {
            "attention": self.attn.name,
            "layer_ops": self.ops.name,
            "linear": linear,
            "dtype": str(self.dtype).removeprefix("torch."),
        }
        slow = self.attn.slow_paths() + list(self.ops.slow_paths)
        moe = next((layer.moe for layer in self.layers if layer.moe is not None), None)
        if moe is not None and linear != "torch":
            slow.append(
                f"moe experts: torch F.linear per expert ({moe.num_experts} experts, top {moe.top_k}), "
                f"not {linear}: the expert weights are not prepacked"
            )
        return names, slow

    def watch_ranks(self, on_failure: Callable[[str], None]) -> None:
        """Calls on_failure(reason) if a rank of a tensor-parallel model dies: none here."""

    def close(self) -> None:
        """Releases what the model holds beyond its tensors: nothing, unless it is tensor-parallel."""

    def _attention(self, layer: LayerWeights, x, rope, meta: AttentionMetadata, k_cache, v_cache):
        s = self.shape
        num_tokens = x.shape[0]
        q_size, kv_size = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        q, k, v = layer.qkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(num_tokens, s.num_heads, s.head_dim)
        k = k.view(num_tokens, s.num_kv_heads, s.head_dim)
        v = v.view(num_tokens, s.num_kv_heads, s.head_dim)
        if layer.q_norm is not None:
            q = self.ops.rms_norm(q, layer.q_norm, s.rms_norm_eps)
            k = self.ops.rms_norm(k, layer.k_norm, s.rms_norm_eps)
        q, k = self.ops.rotary(q, k, *rope)

        self.attn.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        d = meta.num_decode_tokens
        if d:
            self.attn.decode_attention(
                q[:d],
                k_cache,
                v_cache,
                meta.decode_block_tables,
                meta.decode_seq_lens,
                self.scale,
                out=out[:d],
                window=layer.window,
            )
        if num_tokens > d:
            self.attn.prefill_attention(
                q[d:],
                k_cache,
                v_cache,
                meta.prefill_block_tables,
                meta.prefill_cu_seqlens_q,
                meta.prefill_seq_lens,
                self.scale,
                out=out[d:],
                window=layer.window,
            )
        return layer.o(out.view(num_tokens, q_size))

    def _mlp(self, layer: LayerWeights, x):
        gate_up, down = layer.gate_up, layer.down
        if gate_up is None or down is None:  # a mixture-of-experts layer: the loader sets moe instead
            assert layer.moe is not None
            return layer.moe(x)
        return down(self.ops.act_and_mul(gate_up(x)))
