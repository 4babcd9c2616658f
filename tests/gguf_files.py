"""GGUF files the tests write with the `gguf` package: a K-quant model made from the real
SmolLM2 file (its metadata and tokenizer, fewer layers, some tensors as Q4_K and Q6_K), and
a file of an architecture we do not serve.

The gguf package quantizes only the simple types (Q4_0 ... Q8_0); K-quant blocks are written
here as random quants under small scales, which is a valid file of those types whatever the
values mean: what the test checks is that we serve exactly what a dequantizer reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

# Bytes per block of 256 weights (ggml's block_q4_K and block_q6_K).
_Q4_K_BYTES, _Q6_K_BYTES = 144, 210


def _random_q4_k(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """d (f16), dmin (f16), 12 bytes of 6-bit scales and mins, 128 bytes of 4-bit quants."""
    blocks = rng.integers(0, 256, size=(rows * cols // 256, _Q4_K_BYTES), dtype=np.uint8)
    scales = np.empty((len(blocks), 2), dtype=np.float16)
    scales[:, 0] = rng.uniform(1e-5, 3e-5, len(blocks))  # d: weights of about +-0.02
    scales[:, 1] = rng.uniform(1e-5, 3e-5, len(blocks))  # dmin
    blocks[:, :4] = scales.view(np.uint8)
    return blocks.reshape(rows, -1)


def _random_q6_k(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """128 bytes of low 4 bits, 64 of high 2 bits, 16 int8 scales, then d (f16)."""
    blocks = rng.integers(0, 256, size=(rows * cols // 256, _Q6_K_BYTES), dtype=np.uint8)
    blocks[:, 192:208] = rng.integers(1, 32, size=(len(blocks), 16), dtype=np.int8).view(np.uint8)
    blocks[:, 208:] = rng.uniform(2e-5, 4e-5, len(blocks)).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


KQUANT_TENSORS = {
    "blk.0.ffn_down.weight": GGMLQuantizationType.Q4_K,
    "blk.1.ffn_down.weight": GGMLQuantizationType.Q6_K,
}


def _copy_field(writer: GGUFWriter, field) -> None:
    main = GGUFValueType(field.types[0])
    if main == GGUFValueType.ARRAY:
        writer.add_key_value(field.name, field.contents(), main, sub_type=GGUFValueType(field.types[-1]))
    else:
        writer.add_key_value(field.name, field.contents(), main)


def write_kquant_model(source: Path, out: Path, layers: int = 2, seed: int = 0) -> Path:
    """`source`'s first `layers` layers (llama architecture), with KQUANT_TENSORS replaced by
    random blocks of their types; the rest copied as they are (Q4_1, F32 ...)."""
    reader = GGUFReader(source)
    arch = str(reader.get_field("general.architecture").contents())
    writer = GGUFWriter(out, arch)  # writes general.architecture itself
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        if name == f"{arch}.block_count":
            writer.add_key_value(name, layers, GGUFValueType(field.types[0]))
        else:
            _copy_field(writer, field)
    rng = np.random.default_rng(seed)
    for t in reader.tensors:
        if t.name.startswith("blk.") and int(t.name.split(".")[1]) >= layers:
            continue
        qtype = KQUANT_TENSORS.get(t.name)
        if qtype is None:
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
            continue
        cols, rows = (int(x) for x in t.shape)  # GGUF shapes are innermost first
        make = _random_q4_k if qtype == GGMLQuantizationType.Q4_K else _random_q6_k
        writer.add_tensor(t.name, make(rows, cols, rng), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def write_foreign_arch(out: Path, arch: str = "mamba") -> Path:
    """A GGUF file that says it holds `arch` (and nothing else worth reading)."""
    writer = GGUFWriter(out, arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
