"""Structured outputs in the worker: a request's `StructuredOutput` compiled by xgrammar (once
per distinct constraint: the compiler caches), one `GrammarMatcher` per constrained row that
follows the row's tokens, and each step's masks for all constrained rows filled into one
preallocated bitmask and turned into an additive 0 / -inf mask with one lookup.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import torch

from shared.messages import SamplingParams
from shared.structured import compile_output

log = logging.getLogger(__name__)

# vLLM's default cache budget for compiled grammars (VLLM_XGRAMMAR_CACHE_MB).
_CACHE_LIMIT_BYTES = 512 * 2**20
_JSON_KINDS = ("json_schema", "json_object")
# Bytes JSON never holds raw: xgrammar 0.2.9 lets a string with maxLength/minLength contain
# control characters (its bounded-string class is [^"\\\r\n]), which JSON parsers refuse. Line
# breaks are kept (whitespace between values; that class already excludes them); a tab
# is lost only as whitespace between values.
_NOT_IN_JSON = frozenset(range(0x20)) - {0x0A, 0x0D}


class RowGrammar:
    """One row's place in its grammar. Once the grammar is complete xgrammar allows only the
    row's stop tokens; once one is accepted (the row goes on only under ignore_eos) the row
    keeps allowing only those, so its text stays the finished structure. `matcher` None:
    the constraint did not compile here, and the row is held to its stop tokens from the
    start (it ends at once, empty) rather than sampled freely against its constraint."""

    def __init__(self, matcher, stop_token_ids: list[int], vocab_size: int, keep: torch.Tensor | None = None):
        self.matcher = matcher
        self.stop_only = _bitmask_of(stop_token_ids, vocab_size)
        # A bitmask of the tokens this row may take at all, whatever the grammar allows
        # (its stop tokens always may); None: all of them.
        self.keep = None if keep is None else keep | self.stop_only

        # Past the grammar (or without one): only stop tokens remain. Kept here, not asked
        # of the matcher, as it is read for every row every step and changes only on accept.
        self.free = matcher is None or matcher.is_terminated()

    def accept(self, token_id: int) -> None:
        accepted = self.try_accept(token_id)
        assert accepted, f"the grammar rejected token {token_id}, which its own mask allowed"

    def try_accept(self, token_id: int) -> bool:
        if self.free:
            return True
        if not self.matcher.accept_token(token_id):
            return False
        self.free = self.matcher.is_terminated()
        return True


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
        self._compiler = None
        self._json_keep: torch.Tensor | None = None  # tokens without a byte in _NOT_IN_JSON

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
            log.error("structured output %s did not compile in the worker (%s); the request ends "
                      "without output", params.structured, e)
            return RowGrammar(None, stop, self.vocab_size)
        keep = self._json_keep if params.structured.kind in _JSON_KINDS else None
        row = RowGrammar(xgr.GrammarMatcher(compiled, override_stop_tokens=stop), stop, self.vocab_size, keep)
        for i, token_id in enumerate(output_token_ids):
            if not row.try_accept(token_id):
                log.error("resuming a structured output: its grammar rejects generated token %d at %d; "
                          "the request ends here", token_id, i)
                return RowGrammar(None, stop, self.vocab_size)
        return row

    @property
    def compiler(self):
        if self._compiler is None:
            import xgrammar as xgr
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
            info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size,
                                                      stop_token_ids=self.eos_token_ids or None)
            self._compiler = xgr.GrammarCompiler(info, max_threads=_usable_cpus(), cache_enabled=True,
                                                 cache_limit_bytes=_CACHE_LIMIT_BYTES)
            json_tokens = [i for i, text in enumerate(info.decoded_vocab[: self.vocab_size])
                           if not _NOT_IN_JSON.intersection(text)]
            self._json_keep = _bitmask_of(json_tokens, self.vocab_size)
        return self._compiler


class GrammarMask:
    """Turns the grammars of one step's constrained rows into an additive [rows, width]
    mask (0 where allowed, -inf elsewhere). The bitmasks are filled on the CPU (xgrammar's
    matchers live there) into one reused int32 tensor, copied to the device in one transfer,
    and unpacked by one embedding lookup of each byte in a 256 x 8 table: on CPU that is 4x
    faster than xgrammar's own apply kernel (bench_structured measures the whole path)."""

    def __init__(self, vocab_size: int, device: torch.device):
        assert sys.byteorder == "little", "the byte view below reads int32 words little-endian"
        self.vocab_size = vocab_size
        self.device = device
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1  # [byte value, bit]
        self._table = torch.zeros(256, 8).masked_fill_(bits == 0, float("-inf")).to(device)
        self._bitmask = torch.empty(0, -(-vocab_size // 32), dtype=torch.int32)
        self._filler = None  # an xgrammar BatchGrammarMatcher: one call fills every row

    def additive(self, grammars: list[RowGrammar], width: int) -> torch.Tensor:
        n = len(grammars)
        if self._bitmask.shape[0] < n:
            # Pinned, so the copy below can overlap; the step reads its tokens back (a sync)
            # before the next step refills this tensor.
            pin = self.device.type == "cuda"
            self._bitmask = torch.empty(max(n, 2 * self._bitmask.shape[0]), self._bitmask.shape[1],
                                        dtype=torch.int32, pin_memory=pin)
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
            if grammar.free:
                bitmask[i].copy_(grammar.stop_only)
            else:
                inside.append(i)
        if inside:
            self._filler.batch_fill_next_token_bitmask([grammars[i].matcher for i in inside], bitmask, inside)
        kept = [i for i in inside if grammars[i].keep is not None]
        if kept:
            bitmask[kept] &= torch.stack([grammars[i].keep for i in kept])
