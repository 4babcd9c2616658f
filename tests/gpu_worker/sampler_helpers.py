"""What the sampler's tests share: a row built from its params and tokens, a sampler over
a small vocabulary, many seeded draws at once, the reference top-k/top-p set computed one
token at a time, and logits shaped like a trained model's."""

from __future__ import annotations

import math

import torch

from services.gpu_worker.sampler import Sampler
from services.gpu_worker.sampling_row import SamplingRow
from shared.messages import SamplingParams

CPU = torch.device("cpu")
EOS = 5


def make_row(prompt=(), output=(), seed=None, **params) -> SamplingRow:
    return SamplingRow(SamplingParams(seed=seed, **params), [*prompt, *output], len(prompt))


def sampler(vocab: int = 8) -> Sampler:
    return Sampler(vocab, [EOS], CPU)


def sample_many(logits: list[float], n: int, **params) -> list[int]:
    """n independent draws: n seeded rows (seeds 0..n-1) over the same logits."""
    rows = [make_row(seed=s, **params) for s in range(n)]
    batch = torch.tensor(logits).expand(n, -1).contiguous()
    return sampler(len(logits))(batch, rows).token_ids


def log(probs: list[float]) -> list[float]:
    return [math.log(p) for p in probs]


def reference_kept(row: list[float], top_k: int, top_p: float) -> set[int]:
    """The top-k then top-p survivors, one token at a time in float64, and any token tied
    with the last one kept."""
    order = sorted(range(len(row)), key=lambda i: -row[i])
    if 0 < top_k < len(row):
        order = order[:top_k]
    weights = [math.exp(row[i] - row[order[0]]) for i in order]
    kept, mass_before = set(), 0.0
    for i, w in zip(order, weights):
        if mass_before >= top_p * sum(weights):
            break
        kept.add(i)
        mass_before += w
    last = min(row[i] for i in kept)
    return kept | {i for i, x in enumerate(row) if x == last}


def peaked_logits(
    vocab: int, head: int, seed: int, top: float = 6.0, low: float = 2.0, step: float = 0.0
) -> torch.Tensor:
    """A trained model's shape: `head` likely tokens (logits from top down to low, at
    random ids) over a long tail of unlikely ones; rounded to multiples of `step` if set
    (many ties, as in bf16 logits)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(vocab, generator=g) - 4.0
    ids = torch.randperm(vocab, generator=g)[:head]
    logits[ids] = torch.linspace(top, low, head) + 0.1 * torch.randn(head, generator=g)
    return (logits / step).round() * step if step else logits
