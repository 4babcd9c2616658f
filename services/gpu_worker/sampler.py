"""Turns one step's logits into one token per request, following each request's
`SamplingParams`: its token masks (logit_bias, allowed_token_ids, bad_words, the grammar),
penalties, min_tokens masking, temperature, top-k/top-p/min-p, then a draw. Batch-wide
tensors throughout; only a seeded row's own random draw loops per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import torch

from services.gpu_worker.logit_masks import apply_token_masks, has_token_masks
from services.gpu_worker.structured import GrammarMask, RowGrammar
from shared.messages import SamplingParams, TokenLogprobs

# Temperatures below this are greedy: dividing logits by them would overflow float32.
_GREEDY_TEMPERATURE = 1e-5
# How many of a row's most likely tokens top-p searches before sorting the whole vocab.
_NUCLEUS_CANDIDATES = 1024


@dataclass
class SamplingRow:
    """One request's state the sampler needs; the engine keeps one per request, and this
    is the one place its tokens live (the engine's forward pass reads them from here)."""

    params: SamplingParams
    token_ids: list[int]  # prompt, then what was generated so far
    num_prompt_tokens: int
    generator: torch.Generator | None  # set for seeded requests (see make_generator)
    grammar: RowGrammar | None = None  # set for structured outputs; follows every appended token

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        """A copy: add a generated token with `append`."""
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def append(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        if self.grammar is not None:
            self.grammar.accept(token_id)


@dataclass
class SamplerOutput:
    token_ids: list[int]  # one per row
    logprobs: list[TokenLogprobs | None]  # None where the request did not ask


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    """A request's own RNG. The engine re-seeds it before each token from (seed, token
    index), so a stream needs no generator state carried across a preemption or a move
    to another worker."""
    return torch.Generator(device=device).manual_seed(seed)


def is_greedy(params: SamplingParams) -> bool:
    return params.temperature < _GREEDY_TEMPERATURE


def has_penalties(params: SamplingParams) -> bool:
    return params.presence_penalty != 0.0 or params.frequency_penalty != 0.0 or params.repetition_penalty != 1.0


def below_min_tokens(row: SamplingRow) -> bool:
    return row.num_output_tokens < row.params.min_tokens


class Sampler:
    """Samples one token per row of `logits` ([len(rows), vocab], vocab possibly padded
    past the tokenizer's: every column is a candidate)."""

    def __init__(self, vocab_size: int, eos_token_ids: list[int], device: torch.device):
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.device = device  # where the logits and the requests' generators live
        self._grammar_mask: GrammarMask | None = None  # made for the first constrained row

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        assert logits.dim() == 2 and logits.shape[0] == len(rows), logits.shape
        assert logits.shape[1] >= self.vocab_size, (logits.shape, self.vocab_size)
        if all(_plain_greedy(row) for row in rows):
            # The hot path: nothing but argmax, one kernel for the whole batch.
            return SamplerOutput(logits.argmax(dim=-1).tolist(), [None] * len(rows))

        work = logits.to(torch.float32, copy=True)  # `logits` stays raw for logprobs
        apply_token_masks(work, rows)
        grammar = self._grammar_step(work, rows)
        penalized = [i for i, row in enumerate(rows) if has_penalties(row.params)]
        if penalized:
            self._penalize(work, rows, penalized)
        self._mask_stop_tokens(work, rows)
        if grammar is not None:
            grammar.rescue(work, logits, rows)

        random = [i for i, row in enumerate(rows) if not is_greedy(row.params)]
        if len(random) == len(rows):
            token_ids = self._sample(work, rows)
        else:
            # Greedy rows are done here: top-k/top-p/min-p always keep the argmax.
            token_ids = work.argmax(dim=-1)
            if random:
                token_ids[random] = self._sample(work[random], [rows[i] for i in random])
        return SamplerOutput(token_ids.tolist(), self._logprobs(logits, token_ids, rows, grammar))

    def _grammar_step(self, work: torch.Tensor, rows: list[SamplingRow]) -> _GrammarStep | None:
        idx = [i for i, row in enumerate(rows) if row.grammar is not None]
        if not idx:
            return None
        if self._grammar_mask is None:
            self._grammar_mask = GrammarMask(self.vocab_size, self.device)
        step = _GrammarStep(idx, self._grammar_mask.additive([rows[i].grammar for i in idx], work.shape[1]))
        if len(idx) == len(rows):
            work.add_(step.additive)
        else:
            work[idx] += step.additive
        return step

    def _penalize(self, work: torch.Tensor, rows: list[SamplingRow], idx: list[int]) -> None:
        if len(idx) == len(rows):
            apply_penalties(work, rows)
            return
        sub = work[idx]
        apply_penalties(sub, [rows[i] for i in idx])
        work[idx] = sub

    def _mask_stop_tokens(self, work: torch.Tensor, rows: list[SamplingRow]) -> None:
        """min_tokens: a request may not stop before it has generated that many tokens."""
        vocab = work.shape[1]
        row_idx: list[int] = []
        token_idx: list[int] = []
        for i, row in enumerate(rows):
            if not below_min_tokens(row):
                continue
            eos = [] if row.params.ignore_eos else self.eos_token_ids
            # An id outside the vocab can never be sampled, so there is nothing to mask.
            ids = [t for t in chain(row.params.stop_token_ids, eos) if 0 <= t < vocab]
            row_idx += [i] * len(ids)
            token_idx += ids
        if row_idx:
            work[row_idx, token_idx] = float("-inf")

    def _sample(self, work: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Draw one token per (non-greedy) row of `work`, which it modifies."""
        params = [row.params for row in rows]
        vocab = work.shape[1]
        device = work.device
        work.div_(_column([p.temperature for p in params], torch.float32, device))
        top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        top_p = [p.top_p for p in params]
        apply_top_k_top_p(work, _column(top_k, torch.long, device), _column(top_p, torch.float32, device))
        if any(p.min_p > 0.0 for p in params):
            apply_min_p(work, _column([p.min_p for p in params], torch.float32, device))
        # The Gumbel-max trick: argmax(logits + G), G = -log(-log U), draws from
        # softmax(logits); it is the exponential race argmax(probs / E), E = -log U, in
        # log space. Only elementwise ops follow the filters, so a seeded row's token
        # depends on its own logits and generator, never on its batch-mates.
        return work.add_(self._gumbel_noise(rows, vocab)).argmax(dim=-1)

    def _gumbel_noise(self, rows: list[SamplingRow], vocab: int) -> torch.Tensor:
        # Built from uniform_ rather than exponential_, which is several times slower on CPU.
        uniform = torch.empty(len(rows), vocab, dtype=torch.float32, device=self.device)
        unseeded = [i for i, row in enumerate(rows) if row.generator is None]
        if len(unseeded) == len(rows):
            uniform.uniform_()
        elif unseeded:
            uniform[unseeded] = torch.rand(len(unseeded), vocab, device=self.device)
        for i, row in enumerate(rows):
            if row.generator is not None:
                uniform[i].uniform_(generator=row.generator)  # its one draw this step
        # U = 0 would make -log U infinite; clamping keeps every score finite.
        return uniform.clamp_(min=torch.finfo(torch.float32).tiny).log_().neg_().log_().neg_()

    def _logprobs(self, raw: torch.Tensor, token_ids: torch.Tensor, rows: list[SamplingRow],
                  grammar: _GrammarStep | None) -> list[TokenLogprobs | None]:
        """Raw logprobs (before the token masks, penalties, temperature and filters), as
        vLLM's default; but, as in vLLM, after the grammar's mask, which it applies to the
        model's logits before its sampler: alternatives are tokens the grammar allows."""
        out: list[TokenLogprobs | None] = [None] * len(rows)
        idx = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
        if not idx:
            return out
        logprobs = raw[idx].to(torch.float32)
        if grammar is not None:
            grammar.mask_rows(logprobs, idx)
        logprobs = logprobs.log_softmax(dim=-1)
        wanted = [min(max(rows[i].params.logprobs, 0), raw.shape[1]) for i in idx]
        top_values, top_ids = logprobs.topk(max(wanted), dim=-1)
        chosen_ids = token_ids[idx]
        chosen = logprobs.gather(1, chosen_ids.unsqueeze(1)).squeeze(1)
        rows_out = zip(idx, wanted, chosen_ids.tolist(), chosen.tolist(), top_ids.tolist(), top_values.tolist())
        for i, n, token_id, logprob, ids, values in rows_out:
            out[i] = TokenLogprobs(token_id, logprob, list(zip(ids[:n], values[:n])))
        return out


class _GrammarStep:
    """The grammar masks of one step: `additive[k]` is for row `idx[k]`."""

    def __init__(self, idx: list[int], additive: torch.Tensor):
        self.idx, self.additive = idx, additive

    def mask_rows(self, logits: torch.Tensor, row_ids: list[int]) -> None:
        """Adds the masks to `logits`, whose row j is the step's row `row_ids[j]`."""
        where = {i: k for k, i in enumerate(self.idx)}
        pairs = [(j, where[i]) for j, i in enumerate(row_ids) if i in where]
        if pairs:
            targets, sources = zip(*pairs)
            logits[list(targets)] += self.additive[list(sources)]

    def rescue(self, work: torch.Tensor, raw: torch.Tensor, rows: list[SamplingRow]) -> None:
        """A constrained row that its other masks left without any token gets the grammar's
        mask alone on its raw logits: the grammar wins where they clash. vLLM does so for
        min_tokens, which would ban the stop tokens that a complete grammar allows alone;
        here also for allowed_token_ids and bad_words, which otherwise force a token
        outside the grammar."""
        suspects = [k for k, i in enumerate(self.idx) if has_token_masks(rows[i].params) or below_min_tokens(rows[i])]
        if not suspects:
            return
        at = [self.idx[k] for k in suspects]
        dead = torch.isneginf(work[at]).all(dim=1).tolist()
        for k, i, is_dead in zip(suspects, at, dead):
            if is_dead:
                work[i] = raw[i].to(torch.float32) + self.additive[k]


def _column(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A [B, 1] tensor, ready to broadcast against [B, vocab]."""
    return torch.tensor(values, dtype=dtype, device=device).unsqueeze(1)


def _plain_greedy(row: SamplingRow) -> bool:
    p = row.params
    return (is_greedy(p) and p.logprobs is None and not has_penalties(p) and not below_min_tokens(row)
            and row.grammar is None and not p.logit_bias and not has_token_masks(p))


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """Repetition penalty (HF/vLLM: over prompt and generated tokens, a positive logit
    is divided by it, a negative one multiplied), then the OpenAI frequency and presence
    penalties (over generated tokens only: frequency x count, presence once). In place."""
    vocab, device = logits.shape[1], logits.device
    params = [row.params for row in rows]
    output_counts = token_counts([row.output_token_ids for row in rows], vocab, device)
    if any(p.repetition_penalty != 1.0 for p in params):
        prompt_counts = token_counts([row.prompt_token_ids for row in rows], vocab, device)
        seen = (prompt_counts > 0) | (output_counts > 0)
        penalty = _column([p.repetition_penalty for p in params], torch.float32, device)
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits.copy_(torch.where(seen, penalized, logits))
    frequency = _column([p.frequency_penalty for p in params], torch.float32, device)
    presence = _column([p.presence_penalty for p in params], torch.float32, device)
    logits.sub_(frequency * output_counts + presence * (output_counts > 0))


def token_counts(token_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[len(token_lists), vocab] float counts, built with one scatter_add for the batch."""
    flat = torch.tensor(list(chain.from_iterable(token_lists)), dtype=torch.long, device=device)
    lengths = torch.tensor([len(t) for t in token_lists], dtype=torch.long, device=device)
    rows = torch.repeat_interleave(torch.arange(len(token_lists), device=device), lengths)
    counts = torch.zeros(len(token_lists) * vocab, dtype=torch.float32, device=device)
    counts.scatter_add_(0, rows * vocab + flat, torch.ones_like(flat, dtype=torch.float32))
    return counts.view(len(token_lists), vocab)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> None:
    """Set to -inf every token outside the row's top_k ([B, 1], vocab where off) and
    outside its nucleus: the smallest set of most likely tokens (after top-k) whose mass
    reaches top_p ([B, 1], 1 where off). The most likely token always survives, and so
    does any token tied with the last one kept. In place."""
    vocab = logits.shape[1]
    use_k, use_p = top_k < vocab, top_p < 1.0
    filtered = use_k | use_p
    if not bool(filtered.any()):
        return
    # A full sort of the vocab is slow on CPU, so look among the largest few first:
    # every top-k cut lies within max(k), and a nucleus nearly always within a thousand.
    k_max = int(top_k[use_k].max()) if bool(use_k.any()) else 1
    width = min(vocab, max(k_max, _NUCLEUS_CANDIDATES if bool(use_p.any()) else 1))
    cutoff, decided = _cutoff_logit(logits, top_k, top_p, width)
    wider = (~decided & filtered).squeeze(1).nonzero().squeeze(1)
    if len(wider):
        cutoff[wider] = _cutoff_logit(logits[wider], top_k[wider], top_p[wider], vocab)[0]
    logits.masked_fill_((logits < cutoff) & filtered, float("-inf"))


def _cutoff_logit(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's smallest kept logit ([B, 1]) judged from its `width` largest, and
    whether the cut fell among them (if not, the row needs a wider look)."""
    vocab = logits.shape[1]
    largest = logits.topk(width, dim=-1).values  # sorted, descending
    rank = torch.arange(width, device=logits.device)
    in_top_k = rank < top_k
    # top_p's mass is over what top-k kept (all within `width`), else over the row.
    largest_k = largest.masked_fill(~in_top_k, float("-inf"))
    total = torch.where(top_k < vocab, largest_k.logsumexp(dim=-1, keepdim=True),
                        logits.logsumexp(dim=-1, keepdim=True))
    probs = (largest_k - total).exp()
    mass_before = probs.cumsum(dim=-1) - probs
    kept = in_top_k & ((mass_before < top_p) | (top_p >= 1.0))  # a prefix of each row
    kept[:, 0] = True
    num_kept = kept.sum(dim=-1, keepdim=True)
    decided = (num_kept < width) | (width == vocab) | (top_k <= width)
    return largest.gather(1, num_kept - 1), decided


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> None:
    """Drop tokens whose probability is below min_p ([B, 1]) times the top token's.
    In log space: logit < max_logit + log(min_p); min_p = 0 gives -inf, dropping none."""
    threshold = logits.max(dim=-1, keepdim=True).values + min_p.log()
    logits.masked_fill_(logits < threshold, float("-inf"))
