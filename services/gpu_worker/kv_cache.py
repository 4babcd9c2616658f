"""The physical paged KV cache: one K and one V tensor per layer, sized from a budget.

Shape per tensor: [num_blocks, block_size, num_kv_heads, head_dim]. The scheduler owns
which block belongs to whom (every block, 0 included, may hold a request's tokens); the
worker only stores and reads.
"""

from __future__ import annotations

import torch

from services.gpu_worker.model import ModelShape


def bytes_per_block(shape: ModelShape, block_size: int, dtype: torch.dtype) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * shape.num_layers * block_size * shape.num_kv_heads * shape.head_dim * element


def cache_budget_bytes(device: torch.device, cpu_budget: int, gpu_fraction: float) -> int:
    """CPU: the configured byte budget. CUDA: a share of what is free once weights are
    loaded, leaving the rest for activations and the allocator's fragmentation."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0] * gpu_fraction)  # (free, total)
    return int(cpu_budget)


def num_blocks_in_budget(
    shapes: ModelShape | list[ModelShape],
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    cpu_budget: int,
    gpu_fraction: float,
) -> int:
    """Blocks that fit: of each model's cache when several share the block ids (a draft model's)."""
    shapes = shapes if isinstance(shapes, list) else [shapes]
    per_block = sum(bytes_per_block(shape, block_size, dtype) for shape in shapes)
    return cache_budget_bytes(device, cpu_budget, gpu_fraction) // per_block


def allocate_kv_cache(
    shape: ModelShape, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    dims = (num_blocks, block_size, shape.num_kv_heads, shape.head_dim)
    return [
        (torch.zeros(dims, dtype=dtype, device=device), torch.zeros(dims, dtype=dtype, device=device))
        for _ in range(shape.num_layers)
    ]
