"""Builds a ready Engine from WorkerSettings: resolve model, device and dtype, load the
weights, then size the KV cache from what memory is left."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from transformers import PretrainedConfig

from kernels import get_attention_backend
from services.gpu_worker.drafter import Drafter
from services.gpu_worker.engine import Engine
from services.gpu_worker.grammar_masks import Grammars
from services.gpu_worker.kv_cache import allocate_kv_cache, bytes_per_block, num_blocks_in_budget
from services.gpu_worker.linear import onednn_slow_path
from services.gpu_worker.loader import load_config, load_model
from services.gpu_worker.model import DecoderModel
from services.gpu_worker.tensor_parallel import start_tensor_parallel
from shared.config import WorkerSettings
from shared.messages import RegisterWorker
from shared.models import ModelLoadError, max_model_len, model_dir, read_config
from shared.speculative import draft_model_of

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {name!r} was asked for but CUDA is not available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def eos_token_ids(path: Path, config: PretrainedConfig) -> list[int]:
    """EOS ids from generation_config.json when present (it may list several, e.g. a chat
    end token), else from config.json."""
    eos = None
    gen = path / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def tokenizer_dir(settings: WorkerSettings, path: Path) -> Path:
    """Whose tokenizer structured outputs compile against: --tokenizer's, else the model's."""
    return Path(settings.tokenizer).expanduser() if settings.tokenizer else path


def create_engine(settings: WorkerSettings) -> tuple[Engine, RegisterWorker]:
    """The engine, and what the worker tells the scheduler about it (as it will send it).
    With tensor_parallel_size N > 1 this process is rank 0 and the other ranks are started
    here: engine.close() stops them."""
    path = model_dir(settings.model)
    config = load_config(path)  # fails early with a clear message
    max_len = max_model_len(read_config(path), path, settings.max_model_len)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    draft_path = _draft_path(settings, max_len)
    model, draft, num_blocks = _load_models(settings, path, draft_path, device, dtype, max_len)
    min_blocks = -(-max_len // settings.block_size)
    if num_blocks < min_blocks:
        model.close()
        raise ModelLoadError(
            f"the KV cache budget holds {num_blocks} blocks, fewer than the {min_blocks} one "
            f"request of max_model_len {max_len} needs: raise --kv-cache-memory / "
            f"--gpu-memory-fraction or lower --max-model-len"
        )
    kv_caches = allocate_kv_cache(model.shape, num_blocks, settings.block_size, dtype, device)
    eos = eos_token_ids(path, config)
    backends, slow_paths = _kernels(model, settings.linear_backend, device, dtype)
    log.info(
        "loaded %s on %s (%s): %d KV blocks of %d tokens (%.1f MiB)",
        path,
        device,
        dtype,
        num_blocks,
        settings.block_size,
        num_blocks * bytes_per_block(model.shape, settings.block_size, dtype) / 2**20,
    )
    drafter = None
    if draft is not None and draft_path is not None:
        drafter = _drafter(draft, draft_path, num_blocks, settings.block_size, dtype, device)
    engine = Engine(
        model,
        kv_caches,
        settings.block_size,
        num_blocks,
        max_len,
        eos,
        settings.worker_id,
        Grammars(tokenizer_dir(settings, path), model.shape.vocab_size, eos),
        drafter,
    )
    facts = RegisterWorker(
        worker_id=settings.worker_id,
        model=str(path),
        max_model_len=max_len,
        block_size=settings.block_size,
        num_blocks=num_blocks,
        vocab_size=model.shape.vocab_size,
        eos_token_ids=eos,
        device=str(device),
        pid=os.getpid(),
        backends=backends,
        slow_paths=slow_paths,
        draft_model="" if draft_path is None else str(draft_path),
    )
    return engine, facts


def _load_models(
    settings: WorkerSettings,
    path: Path,
    draft_path: Path | None,
    device: torch.device,
    dtype: torch.dtype,
    max_len: int,
) -> tuple[DecoderModel, DecoderModel | None, int]:
    """The model (with tensor parallelism, rank 0's shard, its followers started), the draft
    model if there is one, and the number of KV blocks their memory budget holds."""
    if settings.tensor_parallel_size > 1:
        leader, num_blocks = start_tensor_parallel(settings, path, device, dtype)
        return leader, None, num_blocks
    model = _load_with(settings, path, device, dtype, max_len)
    draft = None if draft_path is None else _load_draft(draft_path, model, settings, device, dtype, max_len)
    shapes = [model.shape] if draft is None else [model.shape, draft.shape]
    num_blocks = num_blocks_in_budget(
        shapes,
        settings.block_size,
        dtype,
        device,
        int(settings.kv_cache_memory),
        settings.gpu_memory_fraction,
    )
    return model, draft, num_blocks


def _kernels(
    model: DecoderModel, linear_backend: str, device: torch.device, dtype: torch.dtype
) -> tuple[dict[str, str], list[str]]:
    """The kernels each part of a step runs on and the slower paths taken, logged here."""
    backends, slow_paths = model.backends()
    slow_paths += onednn_slow_path(linear_backend, device, dtype)
    log.info("kernels: %s", ", ".join(f"{part} {name}" for part, name in backends.items()))
    for slow in slow_paths:  # NOTE: never a silent fallback: each slower path is said once, here
        log.warning("slow path: %s", slow)
    return backends, slow_paths


def _drafter(
    draft: DecoderModel,
    draft_path: Path,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
) -> Drafter:
    """The draft model with a KV cache of the target's blocks (drafter.py)."""
    drafter = Drafter(
        draft,
        allocate_kv_cache(draft.shape, num_blocks, block_size, dtype, device),
        block_size,
        str(draft_path),
    )
    log.info(
        "speculative decoding: draft model %s (%d layers, %.1f MiB of KV cache beside the model's), "
        "on the rows the scheduler asks proposals of",
        draft_path,
        draft.shape.num_layers,
        num_blocks * bytes_per_block(draft.shape, block_size, dtype) / 2**20,
    )
    return drafter


def _draft_path(settings: WorkerSettings, max_len: int) -> Path | None:
    """The draft model's directory when speculative_config names one, checked before anything
    loads: a model of its own, with no tensor parallelism."""
    name = draft_model_of(settings.speculative_config)
    if name is None:
        return None
    if settings.tensor_parallel_size > 1:
        raise ModelLoadError(
            "speculative_config: a draft model with tensor_parallel_size > 1 is not supported"
        )
    try:
        path = model_dir(name)
        positions = read_config(path).get("max_position_embeddings")
    except ModelLoadError as e:
        raise ModelLoadError(
            f"speculative_config's draft model: {str(e).replace(' (CONVEYOR_MODEL / --model)', '')}"
        ) from None
    if isinstance(positions, int) and positions < max_len:
        raise ModelLoadError(
            f"speculative_config: the draft model {str(path)!r} holds {positions} positions, "
            f"fewer than max_model_len {max_len}: lower --max-model-len"
        )
    return path


def _load_with(
    settings: WorkerSettings, path: Path, device: torch.device, dtype: torch.dtype, max_len: int
) -> DecoderModel:
    """A model on this worker's kernels (the target and its draft load alike)."""
    return load_model(
        path,
        device,
        dtype,
        get_attention_backend(device, settings.attention_backend),
        settings.linear_backend,
        max_model_len=max_len,
        layer_ops=settings.layer_ops,
    )


def _load_draft(
    path: Path,
    model: DecoderModel,
    settings: WorkerSettings,
    device: torch.device,
    dtype: torch.dtype,
    max_len: int,
) -> DecoderModel:
    draft = _load_with(settings, path, device, dtype, max_len)
    if draft.shape.vocab_size != model.shape.vocab_size:
        draft.close()
        raise ModelLoadError(
            f"speculative_config: the draft model's vocabulary ({draft.shape.vocab_size} tokens) "
            f"is not the model's ({model.shape.vocab_size}): it must share the tokenizer"
        )
    return draft
