"""The backend switch: device defaults, the environment override, and a clear error for a typo."""

import logging
import os
import time

import pytest
import torch

from kernels import BACKEND_ENV_VAR, cpu, get_attention_backend, reference


def test_cpu_defaults_to_the_cpu_kernel(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV_VAR, raising=False)
    backend = get_attention_backend(torch.device("cpu"))
    assert backend.name == "cpu"
    assert backend.decode_attention is cpu.decode_attention
    assert backend.prefill_attention is cpu.prefill_attention
    assert backend.store_kv is cpu.store_kv


def test_environment_overrides_the_default(monkeypatch):
    # Without a GPU, conftest.py has set TRITON_INTERPRET=1, which lets triton run on CPU.
    monkeypatch.setenv(BACKEND_ENV_VAR, "triton")
    backend = get_attention_backend(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    assert backend.name == "triton"
    assert backend.store_kv.__module__ == "kernels.triton_store_kv"
    monkeypatch.setenv(BACKEND_ENV_VAR, "reference")
    assert get_attention_backend(torch.device("cpu")).decode_attention is reference.decode_attention


def test_explicit_name_beats_the_environment(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV_VAR, "triton")
    assert get_attention_backend(torch.device("cpu"), "reference").name == "reference"


def test_unknown_backend_is_named_in_the_error():
    with pytest.raises(ValueError, match="'cuda-graphs'"):
        get_attention_backend(torch.device("cpu"), "cuda-graphs")


def test_cpu_backend_refuses_a_gpu_device():
    with pytest.raises(ValueError, match="CPU only, not on cuda"):
        get_attention_backend(torch.device("cuda"), "cpu")


@pytest.fixture
def no_compiler(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV_VAR, raising=False)
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    cpu.load.cache_clear()  # forget the build this process already loaded
    yield
    cpu.load.cache_clear()


def test_without_a_compiler_the_default_falls_back_to_the_reference_and_says_why(no_compiler, caplog):
    with caplog.at_level(logging.WARNING, logger="kernels"):
        backend = get_attention_backend(torch.device("cpu"))
    assert backend.name == "reference"
    assert "'/nonexistent/c++' not found" in caplog.text


def test_without_a_compiler_asking_for_the_cpu_backend_is_an_error(no_compiler):
    with pytest.raises(RuntimeError, match="needs a C\\+\\+ compiler"):
        get_attention_backend(torch.device("cpu"), "cpu")


def test_a_build_lock_left_by_a_killed_build_is_removed_and_a_live_one_kept(tmp_path):
    # torch's extension loader waits while `lock` exists: one left by a worker killed mid-build
    # would hang every later start of the worker.
    lock = tmp_path / "lock"
    lock.touch()
    assert not cpu.clear_stale_lock(tmp_path) and lock.exists(), "a build in progress keeps its lock"
    old = time.time() - cpu.STALE_LOCK_S - 1
    os.utime(lock, (old, old))
    assert cpu.clear_stale_lock(tmp_path) and not lock.exists()
    assert not cpu.clear_stale_lock(tmp_path), "no lock, nothing to do"
