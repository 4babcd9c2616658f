"""Structured outputs in the worker: a request's `StructuredOutput` compiled by xgrammar (once
per distinct constraint: the compiler caches), one `GrammarMatcher` per constrained row that
follows the row's tokens, and each step's masks for all constrained rows filled into one
preallocated bitmask and turned into an additive 0 / -inf mask with one lookup.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from shared.messages import SamplingParams
from shared.structured_grammar import compile_output

if TYPE_CHECKING:
    import xgrammar as xgr  # imported where used: it loads slowly, and most workers never need it

log = logging.getLogger(__name__)

# vLLM's default cache budget for compiled grammars (VLLM_XGRAMMAR_CACHE_MB).
_CACHE_LIMIT_BYTES = 512 * 2**20
_JSON_KINDS = ("json_schema", "json_object")
# Bytes JSON never holds raw: xgrammar 0.2.9 lets a string with maxLength/minLength contain
# control characters (its bounded-string class is [^"\\\r\n]), which JSON parsers refuse. Line
# breaks are kept (whitespace between values; that class already excludes them); a tab
# is lost only as whitespace between values.
_NOT_IN_JSON = frozenset(range(0x20)) - {0x0A, 0x0D}
# xgrammar 0.2.9's negated character classes ([^"\\], JSON strings and most regexes) take the
# UTF-16 surrogates U+D800..U+DFFF, whose UTF-8 form (ED A0..BF xx) is not valid UTF-8: a
# decoder shows each as three U+FFFD, which also breaks maxLength. A surrogate is banned
# inside a token here, and across two (a token ending in byte ED) by RowGrammar.
_SURROGATE = re.compile(rb"\xed[\xa0-\xbf]")
_SURROGATE_SECOND = range(0xA0, 0xC0)


class RowGrammar:
    """One row's place in its grammar. Once the grammar is complete xgrammar allows only the
    row's stop tokens; once one is accepted (the row goes on only under ignore_eos) the row
    keeps allowing only those, so its text stays the finished structure. `matcher` None:
    the constraint did not compile here, and the row is held to its stop tokens from the
    start (it ends at once, empty) rather than sampled freely against its constraint.

    A model that thinks first (`think_end` set) samples freely while `thinking`, and its
    grammar starts with the token after </think>, as vLLM's structured outputs with a
    reasoning parser. With `think_open` too, the row starts in `lead`: its first token is
    the grammar's or <think>, which puts it to thinking."""

    def __init__(
        self,
        matcher,
        stop_token_ids: list[int],
        vocab_size: int,
        keep: torch.Tensor | None = None,
        utf8: _Utf8Guard | None = None,
        think_end: int = -1,
        think_open: int = -1,
    ):
        self.matcher = matcher
        self.think_end = think_end
        self.think_open = think_open
        self.lead = matcher is not None and think_end >= 0 and think_open >= 0
        self.thinking = matcher is not None and think_end >= 0 and not self.lead
        self.lead_extra = _bitmask_of([think_open], vocab_size) if self.lead else None
        self.stop_only = _bitmask_of(stop_token_ids, vocab_size)
        # A bitmask of the tokens this row may take at all, whatever the grammar allows
        # (its stop tokens always may); None: all of them.
        self.keep = None if keep is None else keep | self.stop_only
        self.utf8 = utf8
        self.after_lead_ed = False  # the last token ended in byte ED: the next may not start A0..BF

        # Past the grammar (or without one): only stop tokens remain. Kept here, not asked
        # of the matcher, as it is read for every row every step and changes only on accept.
        self.free = matcher is None or matcher.is_terminated()

    def accept(self, token_id: int) -> None:
        accepted = self.try_accept(token_id)
        assert accepted, f"the grammar rejected token {token_id}, which its own mask allowed"

    def fork(self) -> RowGrammar:
        """An independent copy at the same place: a speculative step checks its proposals
        on copies, so the row's own grammar only ever takes the tokens it keeps."""
        twin = copy.copy(self)
        if self.matcher is not None:
            twin.matcher = self.matcher.fork()
        return twin

    def try_accept(self, token_id: int) -> bool:
        if self.thinking:
            self.thinking = token_id != self.think_end
            return True
        if self.lead:
            self.lead = False
            if token_id == self.think_open:
                self.thinking = True
                return True
        if self.free:
            return True
        if not self.matcher.accept_token(token_id):
            return False
        self.free = self.matcher.is_terminated()
        self.after_lead_ed = self.utf8 is not None and token_id in self.utf8.ends_with_ed
        return True

    def allowed_now(self) -> torch.Tensor | None:
        """The tokens this row may take this step beyond what its grammar says (None: any)."""
        if self.after_lead_ed:
            assert self.utf8 is not None  # after_lead_ed is set only with a guard
            base = self.utf8.after_ed if self.keep is None else self.keep & self.utf8.after_ed
            return base | self.stop_only
        return self.keep


class _Utf8Guard:
    """What keeps surrogates out of a row's bytes: the tokens without one (for `keep`), the
    tokens ending in byte ED, and the tokens that may follow one (not starting A0..BF)."""

    def __init__(self, token_bytes: list[bytes], vocab_size: int):
        self.keep = [i for i, b in enumerate(token_bytes) if not _SURROGATE.search(b)]
        self.ends_with_ed = frozenset(i for i, b in enumerate(token_bytes) if b.endswith(b"\xed"))
        self.after_ed = _bitmask_of(
            [i for i, b in enumerate(token_bytes) if not (b and b[0] in _SURROGATE_SECOND)], vocab_size
        )


def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _bitmask_of(token_ids, vocab_size: int) -> torch.Tensor:
    """An xgrammar bitmask row ([ceil(vocab / 32)] int32) with the bits of `token_ids` set."""
    bits = torch.zeros(-(-vocab_size // 32) * 32, dtype=torch.bool)
    bits[list(token_ids)] = True
    weights = torch.tensor([1 << i for i in range(31)] + [-(1 << 31)], dtype=torch.int64)
    return (bits.view(-1, 32).long() * weights).sum(dim=1).to(torch.int32)


class Grammars:
    """Compiles constraints for one model. The tokenizer is read on the first constrained
    request, not at start-up: it takes seconds for a large vocabulary, and most workers
    never see a constraint."""

    def __init__(self, model_dir: str | Path, vocab_size: int, eos_token_ids: list[int]):
        self.model_dir = Path(model_dir)
        self.vocab_size = vocab_size  # the logits' width: the mask covers every column
        self.eos_token_ids = list(eos_token_ids)
        self._compiler: xgr.GrammarCompiler | None = None
        self._json_keep: torch.Tensor | None = None  # tokens without a byte in _NOT_IN_JSON, nor a surrogate
        self._utf8_keep: torch.Tensor | None = None  # tokens without a surrogate
        self._utf8: _Utf8Guard | None = None
        self.token_bytes: list[bytes] = []  # each token's bytes, read with the tokenizer

    def row_grammar(self, params: SamplingParams, output_token_ids: list[int]) -> RowGrammar:
        """A matcher at the end of `output_token_ids` (the tokens generated before a
        preemption or a migration), so a resumed row continues where it was."""
        import xgrammar as xgr

        assert params.structured is not None
        stop = sorted({*self.eos_token_ids, *(t for t in params.stop_token_ids if 0 <= t < self.vocab_size)})
        try:
            compiled = compile_output(self.compiler, params.structured)
        except (RuntimeError, ValueError, OSError) as e:
            # The gateway compiled the same constraint with the same library from the same
            # tokenizer, so this is a deployment mismatch (or no tokenizer beside the weights).
            # Failing the step instead would fail every request batched with this one: the
            # scheduler retries a failed step's requests, then ends them all with an error.
            log.error(
                "structured output %s did not compile in the worker (%s); the request ends without output",
                params.structured,
                e,
            )
            return RowGrammar(None, stop, self.vocab_size)
        keep = self._json_keep if params.structured.kind in _JSON_KINDS else self._utf8_keep
        so = params.structured
        row = RowGrammar(
            xgr.GrammarMatcher(compiled, override_stop_tokens=stop),
            stop,
            self.vocab_size,
            keep,
            self._utf8,
            so.think_end,
            so.think_open,
        )
        for i, token_id in enumerate(output_token_ids):
            if not row.try_accept(token_id):
                log.error(
                    "resuming a structured output: its grammar rejects generated token %d at %d; "
                    "the request ends here",
                    token_id,
                    i,
                )
                return RowGrammar(None, stop, self.vocab_size)
        return row

    @property
    def compiler(self) -> xgr.GrammarCompiler:
        if self._compiler is None:
            import xgrammar as xgr
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
            info = xgr.TokenizerInfo.from_huggingface(
                tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.eos_token_ids or None
            )
            self._compiler = xgr.GrammarCompiler(
                info, max_threads=_usable_cpus(), cache_enabled=True, cache_limit_bytes=_CACHE_LIMIT_BYTES
            )
            self.token_bytes = token_bytes = list(info.decoded_vocab[: self.vocab_size])
            self._utf8 = _Utf8Guard(token_bytes, self.vocab_size)
            no_surrogate = set(self._utf8.keep)
            self._utf8_keep = _bitmask_of(no_surrogate, self.vocab_size)
            json_tokens = [i for i in no_surrogate if not _NOT_IN_JSON.intersection(token_bytes[i])]
            self._json_keep = _bitmask_of(json_tokens, self.vocab_size)
        return self._compiler


def byte_table(device: torch.device) -> torch.Tensor:
    """[256, 8]: for each byte value of a bitmask, its 8 tokens' additive mask (0 where the
    bit is set, -inf where not); an embedding lookup of a bitmask's bytes unpacks it."""
    bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1  # [byte value, bit]
    return torch.zeros(256, 8).masked_fill_(bits == 0, float("-inf")).to(device)


class GrammarMask:
    """Turns the grammars of one step's constrained rows into an additive [rows, width]
    mask (0 where allowed, -inf elsewhere). The bitmasks are filled on the CPU (xgrammar's
    matchers live there) into one reused int32 tensor, copied to the device in one transfer,
    and unpacked by one embedding lookup of each byte in a 256 x 8 table: on CPU that is 4x
    faster than xgrammar's own apply kernel (bench/structured_cost.py measures the whole path)."""

    def __init__(self, vocab_size: int, device: torch.device):
        assert sys.byteorder == "little", "the byte view below reads int32 words little-endian"
        self.vocab_size = vocab_size
        self.device = device
        self._table = byte_table(device)
        self._bitmask = torch.empty(0, -(-vocab_size // 32), dtype=torch.int32)
        self._filler: xgr.BatchGrammarMatcher | None = None  # one call fills every row

    def additive(self, grammars: list[RowGrammar], width: int) -> torch.Tensor:
        n = len(grammars)
        if self._bitmask.shape[0] < n:
            # Pinned, so the copy below can overlap; the step reads its tokens back (a sync)
            # before the next step refills this tensor.
            pin = self.device.type == "cuda"
            self._bitmask = torch.empty(
                max(n, 2 * self._bitmask.shape[0]), self._bitmask.shape[1], dtype=torch.int32, pin_memory=pin
            )
        bitmask = self._bitmask[:n]
        self._fill(bitmask, grammars)
        on_device = bitmask.to(self.device, non_blocking=True)
        add = torch.nn.functional.embedding(on_device.view(torch.uint8).long(), self._table).view(n, -1)
        if width <= add.shape[1]:
            return add[:, :width]
        # Columns past the grammar's vocabulary are never a grammar's token.
        return torch.cat([add, add.new_full((n, width - add.shape[1]), float("-inf"))], dim=1)

    def _fill(self, bitmask: torch.Tensor, grammars: list[RowGrammar]) -> None:
        """Rows in their grammar get xgrammar's mask (one call for all: 6x faster than a call
        per row), rows past it their stop tokens; then each row's `keep` is applied."""
        import xgrammar as xgr

        if self._filler is None:
            self._filler = xgr.BatchGrammarMatcher(max(1, _usable_cpus() // 2))
        inside = []
        for i, grammar in enumerate(grammars):
            assert not grammar.thinking, "a thinking row has no mask: the sampler leaves it out"
            if grammar.free:
                bitmask[i].copy_(grammar.stop_only)
            else:
                inside.append(i)
        if inside:
            self._filler.batch_fill_next_token_bitmask([grammars[i].matcher for i in inside], bitmask, inside)
        allowed = [(i, a) for i in inside if (a := grammars[i].allowed_now()) is not None]
        if allowed:
            rows, masks = zip(*allowed)
            bitmask[list(rows)] &= torch.stack(masks)
        for i in range(len(grammars)):
            if grammars[i].lead:  # the first token may open the thinking instead
                extra = grammars[i].lead_extra
                assert extra is not None  # made with lead
                bitmask[i] |= extra
