"""Megatron-style sharding of a decoder over tensor-parallel ranks: which slice of each
weight a rank holds (`Sharding`), and the two layers that need a collective to undo the
split (a row-parallel linear and a vocabulary-sharded embedding).

With one rank every slice is the whole weight and no collective runs, so the single-device
model is the same code with a world of 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from services.gpu_worker.linear import Linear
from shared.models import ModelLoadError

AllReduce = Callable[[torch.Tensor], None]  # sums a tensor over the ranks, in place


@dataclass(frozen=True)
class Sharding:
    """This rank's part of the model: heads, intermediate columns and vocabulary rows."""

    rank: int
    world: int
    num_heads: int  # this rank's query heads: global heads [rank * num_heads, (rank + 1) * num_heads)
    num_kv_heads: int
    kv_head_start: int  # global index of this rank's first KV head
    intermediate: int  # this rank's columns of the MLP
    vocab_start: int  # embedding rows [vocab_start, vocab_end)
    vocab_end: int

    @property
    def heads(self) -> tuple[int, int]:
        return self.rank * self.num_heads, (self.rank + 1) * self.num_heads

    @property
    def kv_heads(self) -> tuple[int, int]:
        return self.kv_head_start, self.kv_head_start + self.num_kv_heads

    @property
    def columns(self) -> tuple[int, int]:
        return self.rank * self.intermediate, (self.rank + 1) * self.intermediate


def plan_sharding(
    num_heads: int, num_kv_heads: int, intermediate_size: int, vocab_size: int, rank: int, world: int
) -> Sharding:
    """Rank `rank`'s slices of a model split `world` ways, or ModelLoadError naming the
    numbers that do not divide."""
    assert 0 <= rank < world, (rank, world)
    problems = [
        f"{name} {n}"
        for name, n in (("num_attention_heads", num_heads), ("intermediate_size", intermediate_size))
        if n % world
    ]
    if num_kv_heads % world and world % num_kv_heads:
        problems.append(
            f"num_key_value_heads {num_kv_heads} (nor does {world} divide by it, "
            f"which would let ranks share replicated KV heads)"
        )
    rows = -(-vocab_size // world)  # the last rank's share may be shorter, but never empty
    if (world - 1) * rows >= vocab_size:
        problems.append(
            f"vocab_size {vocab_size} into shares of {rows} rows for every rank "
            f"(rank {world - 1} would hold none)"
        )
    if problems:
        raise ModelLoadError(
            f"tensor_parallel_size {world} cannot split this model: it does not divide " + ", ".join(problems)
        )
    if num_kv_heads % world == 0:
        local_kv, kv_start = num_kv_heads // world, rank * (num_kv_heads // world)
    else:
        # NOTE: fewer KV heads than ranks: each rank holds a copy of the one KV head its
        # query heads read (q head i reads KV head i // (num_heads // num_kv_heads)), as vLLM does.
        local_kv, kv_start = 1, rank // (world // num_kv_heads)
    return Sharding(
        rank,
        world,
        num_heads // world,
        local_kv,
        kv_start,
        intermediate_size // world,
        min(rank * rows, vocab_size),
        min((rank + 1) * rows, vocab_size),
    )


class RowParallelLinear:
    """y = sum over ranks of x_r @ W_r.T, then the bias once: each rank holds W's columns
    for its own slice of x (its heads, its MLP columns)."""

    def __init__(self, linear: Linear, bias: torch.Tensor | None, all_reduce: AllReduce):
        self.linear = linear
        self.bias = bias
        self.all_reduce = all_reduce

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        self.all_reduce(y)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding:
    """Each rank holds rows [start, end) of the table; a token outside them looks up zeros,
    so the all-reduce leaves every rank with every token's row. Without `all_reduce`
    (one rank) it is a plain lookup."""

    def __init__(self, weight: torch.Tensor, start: int, all_reduce: AllReduce | None):
        self.weight = weight
        self.start = start
        self.all_reduce = all_reduce

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.all_reduce is None:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        h = F.embedding(local.masked_fill(outside, 0), self.weight)
        h.masked_fill_(outside.unsqueeze(-1), 0)
        self.all_reduce(h)
        return h
