"""Tests for the random-weight model generator: every arch loads offline with plain
transformers, weights and tokenizer are reproducible from the seed, and the cache and CLI
hand back a ready directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conveyor.tiny_model import (
    IM_END,
    PRESETS,
    build_tokenizer,
    ensure_tiny_model,
    make_model,
)
from shared.model_cache import default_model_dir

REPO_ROOT = Path(__file__).resolve().parents[2]
TEXTS = [
    "hello world",
    "héllo → 世界 🙂",
    "  two  spaces\tand a tab\n\nnew lines ",
    "<|im_end|> inside text",
    "",
    "KV-cache: 16 tokens/block, p99=180ms",
]


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("tiny") / "model", num_hidden_layers=2)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_each_arch_loads_offline_and_gives_logits(tmp_path, arch):
    model_dir = make_model(tmp_path / arch, arch=arch, num_hidden_layers=2)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.model_type == arch
    assert model.config.max_position_embeddings == 4096
    with torch.no_grad():
        logits = model(torch.tensor([[5, 17, 300, 4095]])).logits
    assert logits.shape == (1, 4, PRESETS["tiny"]["vocab_size"])
    assert torch.isfinite(logits).all()

    attn = model.model.layers[0].self_attn
    if arch == "qwen2":  # the bias must be random, or a runner that drops it still matches HF
        assert attn.q_proj.bias is not None and attn.q_proj.bias.abs().sum() > 0
    if arch == "qwen3":
        assert model.config.head_dim == 256 // 4
        assert attn.q_norm.weight.shape == (64,)


def test_gpu_05b_preset_is_qwen2_tied_bf16(tmp_path):
    # Shrunk by overrides: the preset's shape is what matters, not its 0.5B parameters.
    model_dir = make_model(
        tmp_path / "g",
        arch="llama",
        preset="gpu-0.5b",
        dtype=torch.bfloat16,
        num_hidden_layers=1,
        vocab_size=4096,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = model.config
    assert config.model_type == "qwen2" and model.dtype == torch.bfloat16
    assert (config.hidden_size, config.intermediate_size) == (896, 4864)
    assert (config.num_attention_heads, config.num_key_value_heads) == (14, 2)
    assert config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.model.layers[0].self_attn.k_proj.bias is not None
    assert PRESETS["gpu-0.5b"]["vocab_size"] == 151936


def test_overrides_reach_the_config(tmp_path):
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 1024,
    }
    model_dir = make_model(
        tmp_path / "m",
        num_hidden_layers=1,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        rope_scaling=scaling,
        max_position_embeddings=8192,
    )
    config = AutoModelForCausalLM.from_pretrained(model_dir).config
    assert config.num_hidden_layers == 1 and config.tie_word_embeddings
    assert config.rope_parameters["rope_type"] == "llama3"
    assert config.rope_parameters["rope_theta"] == 500000.0
    assert AutoTokenizer.from_pretrained(model_dir).model_max_length == 8192


def test_same_seed_same_files_other_seed_other_weights(tmp_path):
    a = make_model(tmp_path / "a", num_hidden_layers=2, seed=0)
    b = make_model(tmp_path / "b", num_hidden_layers=2, seed=0)
    c = make_model(tmp_path / "c", num_hidden_layers=2, seed=1)
    assert_same_weights(a, b)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    wa, wc = weights(a), weights(c)
    assert not torch.equal(wa["model.embed_tokens.weight"], wc["model.embed_tokens.weight"])


def test_make_model_replaces_an_existing_model(tmp_path):
    out = tmp_path / "m"
    make_model(out, num_hidden_layers=1, seed=0)
    make_model(out, num_hidden_layers=1, seed=1)
    assert_same_weights(out, make_model(tmp_path / "ref", num_hidden_layers=1, seed=1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "ref"]  # no temp dirs left


@pytest.mark.parametrize("bad", [{"preset": "huge"}, {"arch": "gpt2"}])
def test_unknown_preset_or_arch_names_the_field(tmp_path, bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        make_model(tmp_path / "m", **bad)


def test_tokenizer_round_trips_text(tiny_dir):
    assert len(build_tokenizer(4096)) == 4096  # the corpus fills the tiny vocabulary
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    for text in TEXTS:
        ids = tok.encode(text)
        assert all(0 <= i < 4096 for i in ids)
        assert tok.decode(ids) == text


def test_chat_template_is_chatml(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhéllo<|im_end|>\n<|im_start|>assistant\n"
    )
    # The markers are single special tokens, not spelled out byte by byte.
    ids = tok.encode(text)
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3
    assert "chat_template" in json.loads((tiny_dir / "tokenizer_config.json").read_text())


def test_eos_ids_match_the_tokenizer(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    config = json.loads((tiny_dir / "config.json").read_text())
    generation = json.loads((tiny_dir / "generation_config.json").read_text())
    eos, im_end = tok.eos_token_id, tok.convert_tokens_to_ids(IM_END)
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token_id == eos
    assert config["eos_token_id"] == config["bos_token_id"] == config["pad_token_id"] == eos
    assert generation["eos_token_id"] == [eos, im_end]
    assert generation["bos_token_id"] == generation["pad_token_id"] == eos


def test_ensure_tiny_model_uses_cache_dir_and_builds_once(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVEYOR_CACHE_DIR", str(tmp_path))
    assert default_model_dir() == tmp_path / "models" / "tiny"
    path = ensure_tiny_model()
    assert path == tmp_path / "models" / "tiny"
    assert AutoModelForCausalLM.from_pretrained(path).config.num_hidden_layers == 4
    built_at = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model() == path
    assert (path / "model.safetensors").stat().st_mtime_ns == built_at
    assert [p.name for p in path.parent.iterdir()] == ["tiny"]


def test_cli_prints_dir_while_racing_another_builder(tmp_path):
    # This process rebuilds the same directory over and over while the CLI builds it, so
    # their publishes overlap: both must succeed, leaving one complete model that is
    # identical to ours (so the seed also holds across processes).
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "conveyor.tiny_model", "--out", str(out), "--preset", "tiny"]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO_ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    builds, deadline = 0, time.monotonic() + 120
    while proc.poll() is None:
        assert time.monotonic() < deadline, "the CLI did not finish within 120 s"
        make_model(out)
        builds += 1
        time.sleep(0.1)  # leave the CLI most of the CPU; it spends its time importing
    assert builds > 0
    stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stderr
    assert stdout.strip() == str(out)
    assert [p.name for p in tmp_path.iterdir()] == ["cli"]  # no temp dirs left behind
    reference = make_model(tmp_path / "ref")
    assert_same_weights(out, reference)
    assert (out / "tokenizer.json").read_bytes() == (reference / "tokenizer.json").read_bytes()
