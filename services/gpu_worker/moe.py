"""A mixture-of-experts MLP (Qwen3-MoE): a router picks each token's top-k experts, their
weights renormalised when the config says so (norm_topk_prob), and each expert is a gated
MLP of its own.

The tokens are grouped per expert, not looped over: one sort of the (token, slot) pairs by
expert, one host read of the per-expert counts, then one gate_up and one down matmul per
expert that any token chose, over all of that expert's tokens at once; the weighted outputs
are added back per token in expert order, as transformers adds them (the same fp32 sums).
A decode batch of 64 tokens with top-8 of 128 experts runs ~100 expert matmul pairs a layer
instead of 512 per-token ones.

Tensor parallelism shards every expert's intermediate dimension: each rank holds its slice
of every expert's gate/up rows and down columns, computes a partial sum over its slice, and
the ranks' partial outputs are summed (one all-reduce per layer, as a dense MLP's down).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


class SparseMoE:
    def __init__(
        self,
        router: torch.Tensor,
        gate_up: torch.Tensor,
        down: torch.Tensor,
        top_k: int,
        norm_topk_prob: bool,
        act: Callable[[torch.Tensor], torch.Tensor],
        all_reduce: Callable[[torch.Tensor], None] | None = None,
    ):
        """router [E, H]; gate_up [E, 2I, H] (each expert's gate rows, then its up rows);
        down [E, H, I]; with tensor parallelism, I is this rank's slice and `all_reduce`
        sums a tensor over the ranks in place."""
        assert gate_up.shape[0] == down.shape[0] == router.shape[0] and gate_up.shape[1] == 2 * down.shape[2]
        self.router, self.gate_up, self.down = router, gate_up, down
        self.num_experts, self.top_k, self.norm_topk_prob = router.shape[0], top_k, norm_topk_prob
        self.act, self.all_reduce = act, all_reduce

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, k] in x's dtype, expert ids [T, k]), as transformers' router: softmax in
        fp32, top-k, renormalised over the k when norm_topk_prob."""
        probs = torch.softmax(F.linear(x, self.router), dim=-1, dtype=torch.float)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), experts

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weights, experts = self.route(x)
        flat = experts.flatten()  # slot j of token t at t * k + j
        order = torch.argsort(flat, stable=True)  # the slots grouped by expert
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()  # the one host sync
        flat_weights = weights.flatten()
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            slots = order[start : start + n]
            start += n
            tokens = slots // self.top_k
            gate, up = F.linear(x[tokens], self.gate_up[e]).chunk(2, dim=-1)
            y = F.linear(self.act(gate) * up, self.down[e]) * flat_weights[slots, None]
            out.index_add_(0, tokens, y)
        if self.all_reduce is not None:
            self.all_reduce(out)
        return out


def is_sparse_layer(config, layer: int) -> bool:
    """Qwen3-MoE: a layer is sparse unless listed in mlp_only_layers, every
    decoder_sparse_step-th layer (1: all)."""
    if not getattr(config, "num_experts", 0):
        return False
    step = getattr(config, "decoder_sparse_step", 1) or 1
    return layer not in (getattr(config, "mlp_only_layers", None) or []) and (layer + 1) % step == 0
