"""How rank 0 hands a forward pass to the follower ranks: a fixed header (the command and
the shapes), then every input of the step packed in one int64 tensor. Two broadcasts a
step, no pickling.
"""

from __future__ import annotations

import torch

from services.gpu_worker.batch import AttentionMetadata
from services.gpu_worker.tp_group import Group

STEP, STOP = 1, 2
# command, tokens, num_decode_tokens, decode table rows and width, prefill table rows and width
_HEADER_LEN = 7

StepInputs = tuple[torch.Tensor, torch.Tensor, AttentionMetadata]  # input_ids, positions, meta


def send_step(
    group: Group, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
) -> None:
    decode, prefill = meta.decode_block_tables, meta.prefill_block_tables
    _send_header(group, [STEP, input_ids.numel(), meta.num_decode_tokens, *decode.shape, *prefill.shape])
    parts = (
        input_ids,
        positions,
        meta.slot_mapping,
        decode,
        meta.decode_seq_lens,
        prefill,
        meta.prefill_seq_lens,
        meta.prefill_cu_seqlens_q,
    )
    group.broadcast(torch.cat([t.reshape(-1).to(torch.int64) for t in parts]))


def send_stop(group: Group) -> None:
    _send_header(group, [STOP] + [0] * (_HEADER_LEN - 1))


def recv_step(group: Group) -> StepInputs | None:
    """The next step's inputs, or None when rank 0 says stop."""
    header = torch.empty(_HEADER_LEN, dtype=torch.int64, device=group.device)
    group.broadcast(header)
    command, tokens, num_decode_tokens, decodes, decode_width, prefills, prefill_width = header.tolist()
    if command == STOP:
        return None
    assert command == STEP, f"unknown tensor-parallel command {command}"
    sizes = [
        tokens,
        tokens,
        tokens,
        decodes * decode_width,
        decodes,
        prefills * prefill_width,
        prefills,
        prefills + 1,
    ]
    payload = torch.empty(sum(sizes), dtype=torch.int64, device=group.device)
    group.broadcast(payload)
    ids, positions, slots, decode, decode_lens, prefill, prefill_lens, cu = payload.split(sizes)
    i32 = lambda t: t.to(torch.int32)  # noqa: E731 — the kernels' dtype for tables and lengths
    meta = AttentionMetadata(
        slot_mapping=slots,
        num_decode_tokens=num_decode_tokens,
        decode_block_tables=i32(decode).view(decodes, decode_width),
        decode_seq_lens=i32(decode_lens),
        prefill_block_tables=i32(prefill).view(prefills, prefill_width),
        prefill_seq_lens=i32(prefill_lens),
        prefill_cu_seqlens_q=i32(cu),
    )
    return ids, positions, meta


def _send_header(group: Group, values: list[int]) -> None:
    assert len(values) == _HEADER_LEN, values
    group.broadcast(torch.tensor(values, dtype=torch.int64, device=group.device))
