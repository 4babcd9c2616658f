"""Loads a Llama-family model from a Hugging Face directory into a `DecoderModel`.

transformers reads the config (and is the reference we test against); the weights are
read straight from the safetensors files (a tensor-parallel rank: only its slices) and
fused where one matmul can do two's work.
Anything we cannot serve correctly fails here, at start-up, with a message saying why.
"""

from __future__ import annotations

import dataclasses
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig
from transformers.activations import ACT2FN

from kernels import AttentionBackend
from services.gpu_worker import gemma3
from services.gpu_worker.linear import Linear, use_onednn
from services.gpu_worker.model import DecoderModel, LayerWeights, ModelShape
from services.gpu_worker.moe import SparseMoE, is_sparse_layer
from services.gpu_worker.parallel_layers import (
    AllReduce,
    RowParallelLinear,
    Sharding,
    VocabParallelEmbedding,
    plan_sharding,
)
from services.gpu_worker.rope import SUPPORTED_ROPE, UNSUPPORTED_ROPE, RotaryEmbedding
from shared.models import ModelLoadError, check_model_dir


def load_config(model_dir: str | Path):
    check_model_dir(model_dir)
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    if gemma3.is_gemma3(config):
        gemma3.check_config(config)
    elif config.hidden_act not in ACT2FN:
        raise ModelLoadError(f"unsupported activation {config.hidden_act!r}")
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) != 1.0:
        raise ModelLoadError("partial rotary embeddings are not supported (partial_rotary_factor != 1)")
    if rope.get("rope_type") in UNSUPPORTED_ROPE:
        raise ModelLoadError(
            f"rope type {rope['rope_type']!r} is not supported: its frequencies change with the "
            f"sequence length at run time (supported: {SUPPORTED_ROPE})"
        )
    return config


def model_shape(config) -> ModelShape:
    heads = config.num_attention_heads
    return ModelShape(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=config.max_position_embeddings,
    )


def layer_windows(config) -> list[int | None]:
    """Each layer's sliding attention window, None where it attends to the whole context: per
    layer_types where the config has them (Qwen2 and Qwen3 with use_sliding_window, from layer
    max_window_layers on; Gemma 3's 'sliding_attention' layers), else sliding_window on every
    layer (Mistral, Phi-3, Qwen3-MoE). transformers' configs already drop Qwen's window when
    use_sliding_window is off. A window as long as the context cuts nothing: None."""
    window = getattr(config, "sliding_window", None)
    if (
        not isinstance(window, int)
        or isinstance(window, bool)
        or not 0 < window < config.max_position_embeddings
    ):
        return [None] * config.num_hidden_layers
    types = getattr(config, "layer_types", None)
    if types is None:
        return [window] * config.num_hidden_layers
    return [window if kind == "sliding_attention" else None for kind in types]


def load_model(
    model_dir: str | Path,
    device: torch.device,
    dtype: torch.dtype,
    attention_backend: AttentionBackend,
    linear_backend: str = "auto",
    sharding: Sharding | None = None,
    all_reduce: AllReduce | None = None,
    cls: type[DecoderModel] = DecoderModel,
    max_model_len: int | None = None,
    layer_ops: str = "auto",
) -> DecoderModel:
    """The whole model, or with `sharding` and `all_reduce` one tensor-parallel rank's part
    of it, read from only that rank's slices of the safetensors files. `max_model_len`: the
    context served (None: the model's whole), which picks LongRoPE's frequencies (rope.py).
    `layer_ops`: the worker's setting (layer_ops.get_layer_ops)."""
    config = load_config(model_dir)
    shape = model_shape(config)
    if sharding is None:
        sharding = shard_model(config, shape, rank=0, world=1)
    assert (sharding.world > 1) == (all_reduce is not None), (
        "a sharded model needs its collective, a whole one none"
    )
    onednn = use_onednn(linear_backend, device, dtype)
    gemma_layers = None
    with Checkpoint(Path(model_dir), device, dtype) as ckpt:
        layers = _layers(ckpt, config, shape, sharding, onednn, all_reduce)
        embed, lm_head = _embedding_and_head(
            ckpt, getattr(config, "tie_word_embeddings", False), sharding, onednn, all_reduce
        )
        final_norm = ckpt.take("model.norm.weight")
        if gemma3.is_gemma3(config):
            gemma_layers = gemma3.gemma3_layers(layers, ckpt, config)
    rank_shape = dataclasses.replace(shape, num_heads=sharding.num_heads, num_kv_heads=sharding.num_kv_heads)
    if gemma_layers is not None:
        return gemma3.build(
            rank_shape,
            embed,
            gemma_layers,
            final_norm,
            lm_head,
            config,
            device,
            attention_backend,
            cls,
            layer_ops,
        )
    return cls(
        shape=rank_shape,
        embed=embed,
        layers=layers,
        final_norm=final_norm,
        lm_head=lm_head,
        rotary=RotaryEmbedding(config, shape.head_dim, shape.max_position_embeddings, device, max_model_len),
        act=ACT2FN[config.hidden_act],
        attention_backend=attention_backend,
        layer_ops=layer_ops,
    )


def shard_model(config, shape: ModelShape, rank: int, world: int) -> Sharding:
    """Rank `rank`'s slices, or the ModelLoadError saying why the model cannot be split."""
    return plan_sharding(
        shape.num_heads, shape.num_kv_heads, config.intermediate_size, shape.vocab_size, rank, world
    )


def _layers(
    ckpt: Checkpoint,
    config: PretrainedConfig,
    shape: ModelShape,
    s: Sharding,
    onednn: bool,
    all_reduce: AllReduce | None,
) -> list[LayerWeights]:
    """Every decoder layer's weights, each with its attention window."""
    layers = [
        load_layer(
            ckpt,
            f"model.layers.{i}.",
            shape,
            s,
            onednn,
            all_reduce,
            config if is_sparse_layer(config, i) else None,
        )
        for i in range(shape.num_layers)
    ]
    for layer, window in zip(layers, layer_windows(config)):
        layer.window = window
    return layers


def load_layer(
    ckpt: Checkpoint,
    p: str,
    shape: ModelShape,
    s: Sharding,
    onednn: bool,
    all_reduce: AllReduce | None,
    moe_config: PretrainedConfig | None = None,
) -> LayerWeights:
    """One decoder layer's weights; `moe_config` (Qwen3-MoE's config) for a sparse layer."""
    # Column-parallel q/k/v and gate/up (this rank's heads and MLP columns), row-parallel o
    # and down (the matching input columns, summed over the ranks); norms whole everywhere.
    hd = shape.head_dim
    q_rows, kv_rows = (s.heads[0] * hd, s.heads[1] * hd), (s.kv_heads[0] * hd, s.kv_heads[1] * hd)
    qkv_rows = (q_rows, kv_rows, kv_rows)
    # Phi-3: q, k and v in one tensor, gate and up in another.
    fused = ckpt.has(p + "self_attn.qkv_proj.weight")
    biases: list[torch.Tensor | None]
    if fused:
        q_total, kv_total = shape.num_heads * hd, shape.num_kv_heads * hd
        offsets = (0, q_total, q_total + kv_total)
        qkv = [
            ckpt.take(p + "self_attn.qkv_proj.weight", rows=(o + r[0], o + r[1]))
            for o, r in zip(offsets, qkv_rows)
        ]
        biases = [None]
    else:
        qkv = [ckpt.take(p + f"self_attn.{n}_proj.weight", rows=r) for n, r in zip("qkv", qkv_rows)]
        biases = [ckpt.take_optional(p + f"self_attn.{n}_proj.bias", rows=r) for n, r in zip("qkv", qkv_rows)]
    present = [b for b in biases if b is not None]
    gate_up, down = (None, None) if moe_config else _dense_mlp(ckpt, p, s, fused, onednn, all_reduce)
    return LayerWeights(
        input_norm=ckpt.take(p + "input_layernorm.weight"),
        qkv=Linear(torch.cat(qkv), torch.cat(present) if len(present) == len(biases) else None, onednn),
        o=_row_parallel(
            ckpt.take(p + "self_attn.o_proj.weight", cols=q_rows),
            ckpt.take_optional(p + "self_attn.o_proj.bias"),
            onednn,
            all_reduce,
        ),
        q_norm=ckpt.take_optional(p + "self_attn.q_norm.weight"),
        k_norm=ckpt.take_optional(p + "self_attn.k_norm.weight"),
        post_attention_norm=ckpt.take(p + "post_attention_layernorm.weight"),
        gate_up=gate_up,
        down=down,
        moe=_experts(ckpt, p, s, moe_config, all_reduce) if moe_config else None,
    )


def _dense_mlp(
    ckpt: Checkpoint, p: str, s: Sharding, fused: bool, onednn: bool, all_reduce: AllReduce | None
) -> tuple[Linear, Linear | RowParallelLinear]:
    """A dense layer's gate/up (fused, gate first: this rank's columns of each) and down."""
    if fused:  # Phi-3: gate and up in one tensor
        intermediate = ckpt.rows(p + "mlp.gate_up_proj.weight") // 2
        gate_up = [
            ckpt.take(p + "mlp.gate_up_proj.weight", rows=(o + s.columns[0], o + s.columns[1]))
            for o in (0, intermediate)
        ]
    else:
        gate_up = [ckpt.take(p + f"mlp.{n}_proj.weight", rows=s.columns) for n in ("gate", "up")]
    down = _row_parallel(ckpt.take(p + "mlp.down_proj.weight", cols=s.columns), None, onednn, all_reduce)
    return Linear(torch.cat(gate_up), None, onednn), down


def _experts(ckpt: Checkpoint, p: str, s: Sharding, config, all_reduce: AllReduce | None) -> SparseMoE:
    """A sparse layer's router and experts (checkpoints keep one gate, up and down matrix per
    expert); with tensor parallelism, this rank's slice of every expert's intermediate dim."""
    inter, world = config.moe_intermediate_size, s.world
    if inter % world:
        raise ModelLoadError(
            f"moe_intermediate_size {inter} does not split over {world} tensor-parallel ranks"
        )
    cols = (s.rank * inter // world, (s.rank + 1) * inter // world)
    e = f"{p}mlp.experts."
    gate_up = torch.stack(
        [
            torch.cat(
                [
                    ckpt.take(f"{e}{i}.gate_proj.weight", rows=cols),
                    ckpt.take(f"{e}{i}.up_proj.weight", rows=cols),
                ]
            )
            for i in range(config.num_experts)
        ]
    )
    down = torch.stack([ckpt.take(f"{e}{i}.down_proj.weight", cols=cols) for i in range(config.num_experts)])
    return SparseMoE(
        ckpt.take(f"{p}mlp.gate.weight"),
        gate_up,
        down,
        config.num_experts_per_tok,
        bool(getattr(config, "norm_topk_prob", False)),
        ACT2FN[config.hidden_act],
        all_reduce,
    )


def _row_parallel(
    weight: torch.Tensor, bias: torch.Tensor | None, onednn: bool, all_reduce: AllReduce | None
) -> Linear | RowParallelLinear:
    if all_reduce is None:
        return Linear(weight, bias, onednn)
    return RowParallelLinear(Linear(weight, None, onednn), bias, all_reduce)


def _embedding_and_head(
    ckpt: Checkpoint, tied: bool, s: Sharding, onednn: bool, all_reduce: AllReduce | None
) -> tuple[VocabParallelEmbedding, Linear | None]:
    """Every rank: its vocabulary rows of the embedding. Rank 0 alone: the whole LM head.

    NOTE: rank 0 alone samples, so sampling, grammars and logprobs stay in one process and
    no collective runs per logits call. The cost is memory on rank 0: a whole vocab x hidden
    matrix (Llama-3-70B in bf16: 128256 x 8192 x 2 B = 2.1 GB), which the all-reduce MIN of
    KV blocks then takes from every rank's cache. A vocab-sharded head with a gather of the
    logits to rank 0 is the next step when that matters."""
    rows = (s.vocab_start, s.vocab_end)
    head = None
    if s.rank == 0:
        head = ckpt.take_optional("lm_head.weight") if tied else ckpt.take("lm_head.weight")
    if (
        s.rank == 0 and head is None
    ):  # tied: one whole matrix serves as the head, a view of it as the embedding
        head = ckpt.take("model.embed_tokens.weight")
        embed = head[rows[0] : rows[1]]
    else:
        embed = ckpt.take("model.embed_tokens.weight", rows=rows)
    return VocabParallelEmbedding(embed, s.vocab_start, all_reduce), None if head is None else Linear(
        head, None, onednn
    )


class Checkpoint:
    """The safetensors files of a model directory, read a tensor (or a slice of one) at a
    time, so a rank never holds more than its own slices."""

    def __init__(self, model_dir: Path, device: torch.device, dtype: torch.dtype):
        self.model_dir, self.device, self.dtype = model_dir, device, dtype
        self.files = ExitStack()
        self.where = {
            name: st
            for f in sorted(model_dir.glob("*.safetensors"))
            for st in [self.files.enter_context(safe_open(f, framework="pt", device="cpu"))]
            for name in st.keys()  # noqa: SIM118 — a safetensors file is no dict: keys() is its API
        }

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.files.close()

    def has(self, name: str) -> bool:
        return name in self.where

    def rows(self, name: str) -> int:
        """The first dimension of tensor `name`, read from the file's header."""
        if name not in self.where:
            raise ModelLoadError(
                f"weight {name!r} is missing from the safetensors files in {str(self.model_dir)!r}"
            )
        return self.where[name].get_slice(name).get_shape()[0]

    def take(
        self, name: str, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Tensor `name` (or its `rows` or `cols` slice), which the model must have."""
        tensor = self.take_optional(name, rows, cols)
        if tensor is None:
            raise ModelLoadError(
                f"weight {name!r} is missing from the safetensors files in {str(self.model_dir)!r}"
            )
        return tensor

    def take_optional(
        self, name: str, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None
    ) -> torch.Tensor | None:
        """As take, for a weight only some models have: None where this one has not."""
        st = self.where.get(name)
        if st is None:
            return None
        if rows is not None:
            tensor = st.get_slice(name)[rows[0] : rows[1]]
        elif cols is not None:
            tensor = st.get_slice(name)[:, cols[0] : cols[1]]
        else:
            tensor = st.get_tensor(name)
        return tensor.to(device=self.device, dtype=self.dtype)
