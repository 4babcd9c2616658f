"""Turns the requests scheduled in one step into the flat tensors of a forward pass.

Layout of a step's batch (what the attention kernels expect):

    tokens:  [ d0 d1 d2 | p0 p0 p0 p0 p1 p1 ]   decodes first (one token each),
    slots:   [ where each token's K/V goes in the paged cache ]   then prefill chunks
    decode:  block_tables[num_decodes, max_blocks], seq_lens
    prefill: block_tables[num_prefills, max_blocks], seq_lens, cu_seqlens_q

A "decode" here is any request scheduled for exactly one token, whether it is generating
or finishing a prefill one token at a time: the attention math is the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # int64 [T]
    num_decode_tokens: int
    decode_block_tables: torch.Tensor  # int32 [num_decodes, max_blocks]
    decode_seq_lens: torch.Tensor  # int32 [num_decodes]
    prefill_block_tables: torch.Tensor  # int32 [num_prefills, max_blocks]
    prefill_seq_lens: torch.Tensor  # int32 [num_prefills]
    prefill_cu_seqlens_q: torch.Tensor  # int32 [num_prefills + 1]


@dataclass
class ScheduledRow:
    """One request's part of the step: tokens [start, start+count) of `token_ids`."""

    token_ids: list[int]
    block_ids: list[int]
    start: int
    count: int


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    order: list[int]  # order[i] = index into the caller's rows of the batch's i-th request
    last_token_index: list[int]  # per batch request: index of its last token in the batch


def build_batch(rows: list[ScheduledRow], block_size: int, device: torch.device) -> ForwardBatch:
    order = sorted(range(len(rows)), key=lambda i: rows[i].count != 1)  # stable: decodes first
    num_decodes = sum(1 for r in rows if r.count == 1)

    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    seq_lens: list[int] = []
    last_token_index: list[int] = []
    for i in order:
        r = rows[i]
        end = r.start + r.count
        input_ids.extend(r.token_ids[r.start : end])
        pos = range(r.start, end)
        positions.extend(pos)
        slots.extend(r.block_ids[p // block_size] * block_size + p % block_size for p in pos)
        seq_lens.append(end)
        last_token_index.append(len(input_ids) - 1)

    def tables(indices: list[int]) -> torch.Tensor:
        width = max((len(rows[i].block_ids) for i in indices), default=0)
        padded = [rows[i].block_ids + [0] * (width - len(rows[i].block_ids)) for i in indices]
        return torch.tensor(padded, dtype=torch.int32).reshape(len(indices), width).to(device)

    def as_i32(values: list[int]) -> torch.Tensor:  # the kernels' dtype for lengths
        return torch.tensor(values, dtype=torch.int32, device=device)

    q_lens = [rows[i].count for i in order[num_decodes:]]
    cu = [0, *accumulate(q_lens)]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        num_decode_tokens=num_decodes,
        decode_block_tables=tables(order[:num_decodes]),
        decode_seq_lens=as_i32(seq_lens[:num_decodes]),
        prefill_block_tables=tables(order[num_decodes:]),
        prefill_seq_lens=as_i32(seq_lens[num_decodes:]),
        prefill_cu_seqlens_q=as_i32(cu),
    )
    return ForwardBatch(
        torch.tensor(input_ids, dtype=torch.int64, device=device),
        torch.tensor(positions, dtype=torch.int64, device=device),
        meta,
        order,
        last_token_index,
    )
