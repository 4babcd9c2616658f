"""Hand-made figures, as the scheduler would publish them, for tests of their readers."""

from __future__ import annotations

from shared.figure_records import WorkerFigures
from shared.messages import RegisterWorker


def worker_figures(worker_id: str, updated_at: float = 1000.0, **fields) -> WorkerFigures:
    """A worker of 64 blocks of 16 tokens whose model holds 2048: its max_len is 1024."""
    reg = RegisterWorker(
        worker_id,
        "tiny",
        max_model_len=2048,
        block_size=16,
        num_blocks=64,
        vocab_size=4096,
        eos_token_ids=[0],
        device="cpu",
        pid=1,
    )
    return WorkerFigures(registered=reg, max_len=1024, updated_at=updated_at, **fields)
