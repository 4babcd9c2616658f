"""Turns one step's logits into one token per request, following each request's
`SamplingParams`: its token masks (logit_bias, allowed_token_ids, bad_words, the grammar),
penalties, min_tokens masking, temperature, top-k/top-p/min-p, then a draw. Batch-wide
tensors throughout. A sampled row draws one uniform per token and takes the inverse CDF of
its filtered distribution; a seeded row's uniform comes from (seed, output position) alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain

import torch

from services.gpu_worker.grammar_masks import GrammarMask, RowGrammar
from services.gpu_worker.logit_masks import apply_token_masks, has_token_masks
from shared.messages import SamplingParams, TokenLogprobs

# Temperatures below this are greedy: dividing logits by them would overflow float32.
_GREEDY_TEMPERATURE = 1e-5
# How many of a row's most likely tokens a draw looks at first: nearly every nucleus of a
# trained model fits (SmolLM2 at T=0.7, top_p=0.9: median 2 tokens, p99 38), and a topk
# this narrow costs less than the argmax of greedy decoding. A row whose kept tokens do not
# fit looks wider, up to _NUCLEUS_CANDIDATES, then over its whole vocab.
_FIRST_CANDIDATES = 32
_NUCLEUS_CANDIDATES = 1024
# A narrow topk looks only at the blocks of this many tokens with the largest maxima (see
# _topk): at 32 of 49,152 it reads a 24th of the row after one amax, 2x faster.
_BLOCK = 64
# On CPU a temporary as large as the batch's logits falls out of the caches and, past
# glibc's mmap threshold (32 MiB), is page-faulted afresh every step: with one torch thread
# (the serving default on 2 cores) passes over whole rows go a few rows (this many
# elements) at a time, 3x faster at 256 x 49,152. With more threads, each of those small
# ops would cost a barrier between the threads: they go all at once, as on a GPU.
_CPU_CHUNK_ELEMENTS = 1 << 18
# SplitMix64 (Steele, Lea and Flood 2014): a seeded request's stream of uniforms.
_MASK64 = (1 << 64) - 1
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15


@dataclass
class SamplingRow:
    """One request's state the sampler needs; the engine keeps one per request, and this
    is the one place its tokens live (the engine's forward pass reads them from here)."""

    params: SamplingParams
    token_ids: list[int]  # prompt, then what was generated so far
    num_prompt_tokens: int
    grammar: RowGrammar | None = None  # set for structured outputs; follows every appended token

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        """A copy: add a generated token with `append`."""
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def append(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        if self.grammar is not None:
            self.grammar.accept(token_id)

    def ahead(self, drafts: list[int]) -> list[SamplingRow]:
        """This row, then copies of it as it would be after each of `drafts` in turn: the
        rows that sample the positions of a speculated step. Everything that depends on the
        tokens before (penalties, bad words, min_tokens, a seeded draw's position, the
        grammar's state) is then as at that position. A grammar that refuses a draft keeps
        the place before it: that draft is rejected, so what follows it is never used. Every
        row gets a matcher of its own: the batch fill runs matchers on threads at once."""
        rows = [self]
        grammar = self.grammar
        for j, token_id in enumerate(drafts):
            if grammar is not None:
                forked = grammar.fork()
                grammar = forked if forked.try_accept(token_id) else grammar.fork()
            rows.append(
                SamplingRow(self.params, self.token_ids + drafts[: j + 1], self.num_prompt_tokens, grammar)
            )
        return rows


@dataclass
class SamplerOutput:
    token_ids: list[int]  # one per row
    logprobs: list[TokenLogprobs | None]  # None where the request did not ask


def is_greedy(params: SamplingParams) -> bool:
    return params.temperature < _GREEDY_TEMPERATURE


def has_penalties(params: SamplingParams) -> bool:
    return (
        params.presence_penalty != 0.0 or params.frequency_penalty != 0.0 or params.repetition_penalty != 1.0
    )


def below_min_tokens(row: SamplingRow) -> bool:
    return row.num_output_tokens < row.params.min_tokens


class Sampler:
    """Samples one token per row of `logits` ([len(rows), vocab], vocab possibly padded
    past the tokenizer's: every column is a candidate)."""

    def __init__(self, vocab_size: int, eos_token_ids: list[int], device: torch.device):
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.device = device  # where the logits live
        self._grammar_mask: GrammarMask | None = None  # made for the first constrained row

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        assert logits.dim() == 2 and logits.shape[0] == len(rows), logits.shape
        assert logits.shape[1] >= self.vocab_size, (logits.shape, self.vocab_size)
        if all(_plain_greedy(row) for row in rows):
            # The hot path: nothing but argmax, one kernel for the whole batch. NOTE: max's
            # indices are argmax's (the first of tied maxima) at 2.7x its speed on CPU (128 x
            # 49,152 fp32: 2.9 vs 8.0 ms per step on one thread).
            return SamplerOutput(logits.max(dim=-1).indices.tolist(), [None] * len(rows))

        # `logits` stays raw for logprobs; only masks and penalties write to `work`.
        work = logits.to(torch.float32, copy=any(_edits_logits(row) for row in rows))
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
            token_ids = work.max(dim=-1).indices
            if random:
                token_ids[random] = self._sample(work[random], [rows[i] for i in random])
        return SamplerOutput(token_ids.tolist(), self._logprobs(logits, token_ids, rows, grammar))

    def _grammar_step(self, work: torch.Tensor, rows: list[SamplingRow]) -> _GrammarStep | None:
        idx = [i for i, row in enumerate(rows) if row.grammar is not None and not row.grammar.thinking]
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
        """One token per (non-greedy) row of `work`, which it leaves unchanged: the inverse
        CDF, at the row's uniform, of softmax(logits / T) after top-k, top-p and min-p, its
        kept tokens taken in id order. A row is drawn among its top candidates when its kept
        tokens fit among _NUCLEUS_CANDIDATES, else over its whole vocab; which, and the
        token, depend on the row alone, never on its batch-mates."""
        draw = _Draw.of(work, rows)
        token_ids = torch.empty(len(rows), dtype=torch.long, device=work.device)
        too_wide = _sample_among_candidates(work, draw, token_ids)
        unfiltered = [i for i, p in enumerate(draw.params) if not _filters(p, work.shape[1])]
        for idx in (unfiltered, too_wide):  # apart, so that rows without filters are never sorted
            if idx:
                token_ids[idx] = _sample_whole(work, idx, draw.take(idx))
        return token_ids

    def _logprobs(
        self,
        raw: torch.Tensor,
        token_ids: torch.Tensor,
        rows: list[SamplingRow],
        grammar: _GrammarStep | None,
    ) -> list[TokenLogprobs | None]:
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
        rows_out = zip(
            idx, wanted, chosen_ids.tolist(), chosen.tolist(), top_ids.tolist(), top_values.tolist()
        )
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
        suspects = [
            k for k, i in enumerate(self.idx) if has_token_masks(rows[i].params) or below_min_tokens(rows[i])
        ]
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


def _edits_logits(row: SamplingRow) -> bool:
    """Whether a mask, penalty or min_tokens writes to the row's logits before the draw."""
    p = row.params
    return (
        has_penalties(p)
        or below_min_tokens(row)
        or row.grammar is not None
        or bool(p.logit_bias)
        or has_token_masks(p)
    )


def _plain_greedy(row: SamplingRow) -> bool:
    return is_greedy(row.params) and row.params.logprobs is None and not _edits_logits(row)


def _take(tensor: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """Rows `idx` (ascending, at least one) of `tensor`: a view where they are consecutive."""
    return tensor[idx[0] : idx[-1] + 1] if idx[-1] - idx[0] == len(idx) - 1 else tensor[idx]


# ---- the draw ------------------------------------------------------------------------------


def _filters(params: SamplingParams, vocab: int) -> bool:
    return 0 < params.top_k < vocab or params.top_p < 1.0


def _sample_among_candidates(logits: torch.Tensor, draw: _Draw, token_ids: torch.Tensor) -> list[int]:
    """Draws into `token_ids` the rows with top-k or top-p whose kept tokens fit among their
    candidates, looking at their first width, then 8 times as many, up to _NUCLEUS_CANDIDATES.
    Returns the rows that fit none (ascending)."""
    vocab = logits.shape[1]
    widest = min(vocab, _NUCLEUS_CANDIDATES)
    by_width: dict[int, list[int]] = {}
    for i, p in enumerate(draw.params):
        if _filters(p, vocab):
            by_width.setdefault(_first_width(p, vocab), []).append(i)
    too_wide: list[int] = []
    while by_width:
        width = min(by_width)
        idx = sorted(by_width.pop(width))
        picked, fits = _sample_candidates(_take(logits, idx), draw.take(idx), width)
        fits_list = fits.tolist()
        token_ids[[i for i, f in zip(idx, fits_list) if f]] = picked[fits]
        rest = [i for i, f in zip(idx, fits_list) if not f]
        if rest:
            (too_wide if width == widest else by_width.setdefault(min(widest, 8 * width), [])).extend(rest)
    return sorted(too_wide)


def _first_width(params: SamplingParams, vocab: int) -> int:
    """How many top candidates to look among first: _FIRST_CANDIDATES, or past top_k (in
    powers of two, so that a batch has few widths), at most _NUCLEUS_CANDIDATES. A row fits
    a narrow width only if it fits _NUCLEUS_CANDIDATES, where it is drawn the same."""
    k = params.top_k if 0 < params.top_k < vocab else 0
    return min(vocab, _NUCLEUS_CANDIDATES, max(_FIRST_CANDIDATES, 1 << k.bit_length()))


@dataclass
class _Draw:
    """The sampled rows' parameters as [B, 1] columns, to broadcast against [B, width]."""

    params: list[SamplingParams]
    temperature: torch.Tensor
    top_k: torch.Tensor  # vocab where off
    top_p: torch.Tensor  # 1 where off
    min_p: torch.Tensor  # 0 where off
    log_mass: torch.Tensor  # log sum exp(logits / T) over the row, where top-p is on and top-k off
    uniform: torch.Tensor  # [B, 1], in (0, 1]: this token's draw (see _uniforms)

    @classmethod
    def of(cls, logits: torch.Tensor, rows: list[SamplingRow]) -> _Draw:
        params = [row.params for row in rows]
        vocab, device = logits.shape[1], logits.device
        temperature = _column([p.temperature for p in params], torch.float32, device)
        log_mass = torch.zeros_like(temperature)
        # The nucleus of a row without top-k is a share of its whole vocab's mass.
        over_vocab = [i for i, p in enumerate(params) if p.top_p < 1.0 and not 0 < p.top_k < vocab]
        if over_vocab:
            log_mass[over_vocab] = _log_mass(logits, over_vocab, temperature[over_vocab])
        return cls(
            params,
            temperature,
            _column([p.top_k if 0 < p.top_k < vocab else vocab for p in params], torch.long, device),
            _column([p.top_p for p in params], torch.float32, device),
            _column([p.min_p for p in params], torch.float32, device),
            log_mass,
            _uniforms(rows, device),
        )

    def take(self, idx: list[int]) -> _Draw:
        if len(idx) == len(self.params):
            return self
        return _Draw(
            [self.params[i] for i in idx],
            *(
                t[idx]
                for t in (self.temperature, self.top_k, self.top_p, self.min_p, self.log_mass, self.uniform)
            ),
        )


def _log_mass(logits: torch.Tensor, idx: list[int], temperature: torch.Tensor) -> torch.Tensor:
    """log sum exp(logits / T) of rows `idx` ([len(idx), 1]; `temperature` is theirs)."""
    out = []
    for part, rows in _chunks(logits, idx):
        t = temperature[part]
        top = rows.amax(dim=-1, keepdim=True) / t  # the same float as topk's first, scaled
        out.append((rows / t).sub_(top).exp_().sum(dim=-1, keepdim=True).log_().add_(top))
    return torch.cat(out)


def _chunks(logits: torch.Tensor, idx: list[int]) -> Iterator[tuple[slice, torch.Tensor]]:
    """Rows `idx` (ascending) of `logits`, a few at a time on one CPU thread (see
    _CPU_CHUNK_ELEMENTS), else all at once: (their positions in idx, the rows)."""
    one_thread = logits.device.type == "cpu" and torch.get_num_threads() == 1
    step = max(1, _CPU_CHUNK_ELEMENTS // logits.shape[1]) if one_thread else len(idx)
    for start in range(0, len(idx), step):
        part = slice(start, start + step)
        yield part, _take(logits, idx[part])


def _uniforms(rows: list[SamplingRow], device: torch.device) -> torch.Tensor:
    """Each row's one uniform for this token, [B, 1] in (0, 1]. A seeded request's is
    output n of its own SplitMix64 stream, n its output position, so its token is the same
    alone or in any batch, after a preemption and on another worker, with no RNG state
    kept anywhere. That is every sampled row that came through a gateway (validation.py
    seeds each request sent without a seed), so this Python loop runs over all of them;
    only rows submitted with no seed (tests, worker benchmarks) take torch's global RNG."""
    seeded = [
        _stream_uniform(row.params.seed, row.num_output_tokens) if row.params.seed is not None else 0.0
        for row in rows
    ]
    uniform = torch.tensor(seeded, dtype=torch.float32, device=device)
    unseeded = [i for i, row in enumerate(rows) if row.params.seed is None]
    if unseeded:
        uniform[unseeded] = 1.0 - torch.rand(len(unseeded), device=device)  # [0, 1) -> (0, 1]
    return uniform.unsqueeze(1)


def _stream_uniform(seed: int, position: int) -> float:
    """Output `position` of the SplitMix64 stream that starts at mix(seed) (mixed first, so
    that seeds a multiple of the gamma apart do not give shifted copies of one stream),
    as a float32-exact multiple of 2^-24 in (0, 1]. Python ints: any seed, no overflow."""
    z = _mix64((_mix64(seed & _MASK64) + (position + 1) * _GOLDEN_GAMMA) & _MASK64)
    return ((z >> 40) + 1) * 2.0**-24


def _mix64(z: int) -> int:
    """SplitMix64's finalizer: a bijection of 64-bit ints in which every input bit flips
    about half of the output bits."""
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB & _MASK64
    return z ^ (z >> 31)


def _sample_candidates(logits: torch.Tensor, draw: _Draw, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws among each row's `width` most likely tokens ([B] token ids), and says whether
    each row's kept tokens all lie among them ([B] bool); where not, its token means nothing."""
    vocab = logits.shape[1]
    values, ids = _topk(logits, width)  # sorted, descending; dividing by T keeps the order
    scaled = values / draw.temperature
    in_top_k = torch.arange(width, device=logits.device) < draw.top_k
    log_mass = torch.where(draw.top_k < vocab, _top_k_log_mass(scaled, in_top_k), draw.log_mass)
    num_kept = _nucleus_size(scaled, in_top_k, draw.top_p, log_mass)
    # Any token tied with the last one stays; tokens masked to -inf go (a top-k larger than
    # the tokens left would keep them, and they have no mass to draw).
    kept = (scaled >= scaled.gather(1, num_kept - 1)) & (scaled > float("-inf"))
    # A tie may lie past the candidates, and top-p's share needs all of the top k.
    fits = (
        (kept.sum(dim=-1, keepdim=True) < width) & ((draw.top_k < width) | (draw.top_k == vocab))
    ).squeeze(1)
    kept &= scaled >= scaled[:, :1] + draw.min_p.log()  # min-p, relative to the top token
    n = int(torch.where(fits, kept.sum(dim=-1), 1).max())  # kept tokens are a prefix of the candidates
    kept, scaled = kept[:, :n], scaled[:, :n]
    # In id order: the draw must not depend on how topk orders tied logits.
    ids, order = ids[:, :n].masked_fill(~kept, vocab).sort(dim=-1)
    weights = (scaled - scaled[:, :1]).exp_().masked_fill_(~kept, 0.0).gather(1, order)
    return ids.gather(1, _inverse_cdf(weights, draw.uniform)).squeeze(1), fits


def _topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits.topk(k): the same values; among tied ones, any ids. Where k is small beside
    the vocab, only among the k blocks with the largest maxima: if at least k blocks reach
    a value v, those k do, holding k tokens >= v; if fewer, all of them are among the k."""
    rows, vocab = logits.shape
    if vocab % _BLOCK or 8 * k * _BLOCK > vocab:
        return logits.topk(k, dim=-1)
    blocks = logits.reshape(rows, vocab // _BLOCK, _BLOCK).amax(dim=-1).topk(k, dim=-1).indices
    ids = (blocks.unsqueeze(-1) * _BLOCK + torch.arange(_BLOCK, device=logits.device)).flatten(1)
    values, at = logits.gather(1, ids).topk(k, dim=-1)
    return values, ids.gather(1, at)


def _sample_whole(logits: torch.Tensor, idx: list[int], draw: _Draw) -> torch.Tensor:
    """Draws rows `idx` of `logits` over the whole vocab (`draw` is theirs): rows without
    top-k or top-p, and those whose kept tokens do not fit among the candidates."""
    out = []
    for part, rows in _chunks(logits, idx):
        scaled = rows / draw.temperature[part]
        apply_top_k_top_p(scaled, draw.top_k[part], draw.top_p[part])
        if any(p.min_p > 0.0 for p in draw.params[part]):
            apply_min_p(scaled, draw.min_p[part])
        weights = scaled.sub_(scaled.amax(dim=-1, keepdim=True)).exp_()
        out.append(_inverse_cdf(weights, draw.uniform[part]))
    return torch.cat(out).squeeze(1)


def _inverse_cdf(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Per row ([B, 1]), the first column whose cumulative weight reaches `uniform` times the
    row's total. With the uniform in (0, 1] and the largest weight 1, it is never a column of
    zero weight, and never past the last column. Overwrites `weights` with their sums."""
    cdf = weights.cumsum_(dim=-1)
    return torch.searchsorted(cdf, uniform * cdf[:, -1:])


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
    does any token tied with the last one kept. In place. It sorts whole rows: the sampler
    calls it only for rows whose kept tokens are too many for its candidates."""
    vocab = logits.shape[1]
    filtered = (top_k < vocab) | (top_p < 1.0)
    if not bool(filtered.any()):
        return
    largest = logits.sort(dim=-1, descending=True).values
    in_top_k = torch.arange(vocab, device=logits.device) < top_k
    log_mass = torch.where(
        top_k < vocab, _top_k_log_mass(largest, in_top_k), logits.logsumexp(dim=-1, keepdim=True)
    )
    cutoff = largest.gather(1, _nucleus_size(largest, in_top_k, top_p, log_mass) - 1)
    logits.masked_fill_((logits < cutoff) & filtered, float("-inf"))


def _top_k_log_mass(largest: torch.Tensor, in_top_k: torch.Tensor) -> torch.Tensor:
    """top-p's mass where top-k is on: over what top-k kept (all among `largest`)."""
    return largest.masked_fill(~in_top_k, float("-inf")).logsumexp(dim=-1, keepdim=True)


def _nucleus_size(
    largest: torch.Tensor, in_top_k: torch.Tensor, top_p: torch.Tensor, log_mass: torch.Tensor
) -> torch.Tensor:
    """How many of each row's sorted `largest` logits top-k and top-p keep ([B, 1], at least
    one): those in its top k while the mass before them (a share of `log_mass`) is below top_p."""
    probs = (largest - log_mass).exp_().masked_fill_(~in_top_k, 0.0)
    mass_before = probs.cumsum(dim=-1) - probs
    kept = in_top_k & ((mass_before < top_p) | (top_p >= 1.0))  # a prefix of each row
    kept[:, 0] = True
    return kept.sum(dim=-1, keepdim=True)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> None:
    """Drop tokens whose probability is below min_p ([B, 1]) times the top token's.
    In log space: logit < max_logit + log(min_p); min_p = 0 gives -inf, dropping none."""
    threshold = logits.max(dim=-1, keepdim=True).values + min_p.log()
    logits.masked_fill_(logits < threshold, float("-inf"))
