"""The backend switch: device defaults, the worker's attention_backend setting, and a clear
error for a typo."""

import logging
import os
import time

import pytest
import torch
from pydantic import ValidationError

from kernels import cpu, cpu_build, get_attention_backend, reference
from shared.config import WorkerSettings, parse_settings


def test_cpu_defaults_to_the_cpu_kernel(monkeypatch):
    monkeypatch.delenv("CONVEYOR_ATTENTION_BACKEND", raising=False)
    backend = get_attention_backend(torch.device("cpu"), WorkerSettings().attention_backend)
    assert backend.name == "cpu"
    assert backend.decode_attention is cpu.decode_attention
    assert backend.prefill_attention is cpu.prefill_attention
    assert backend.store_kv is cpu.store_kv


def test_the_setting_overrides_the_default(monkeypatch):
    # Without a GPU, conftest.py has set TRITON_INTERPRET=1, which lets triton run on CPU.
    monkeypatch.setenv("CONVEYOR_ATTENTION_BACKEND", "triton")
    backend = get_attention_backend(
        torch.device("cuda" if torch.cuda.is_available() else "cpu"), WorkerSettings().attention_backend
    )
    assert backend.name == "triton"
    assert backend.store_kv.__module__ == "kernels.triton_store_kv"
    monkeypatch.setenv("CONVEYOR_ATTENTION_BACKEND", "reference")
    assert (
        get_attention_backend(torch.device("cpu"), WorkerSettings().attention_backend).decode_attention
        is reference.decode_attention
    )


def test_the_flag_beats_the_environment_and_a_typo_names_the_setting(monkeypatch):
    monkeypatch.setenv("CONVEYOR_ATTENTION_BACKEND", "triton")
    assert (
        parse_settings(WorkerSettings, ["--attention-backend", "reference"]).attention_backend == "reference"
    )
    with pytest.raises(ValidationError, match="attention_backend"):
        WorkerSettings(attention_backend="cuda-graphs")


def test_unknown_backend_is_named_in_the_error():
    with pytest.raises(ValueError, match="'cuda-graphs'"):
        get_attention_backend(torch.device("cpu"), "cuda-graphs")


def test_cpu_backend_refuses_a_gpu_device():
    with pytest.raises(ValueError, match="CPU only, not on cuda"):
        get_attention_backend(torch.device("cuda"), "cpu")


@pytest.fixture
def no_compiler(monkeypatch):
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
    assert not cpu_build.clear_stale_lock(tmp_path) and lock.exists(), "a build in progress keeps its lock"
    old = time.time() - cpu_build.STALE_LOCK_S - 1
    os.utime(lock, (old, old))
    assert cpu_build.clear_stale_lock(tmp_path) and not lock.exists()
    assert not cpu_build.clear_stale_lock(tmp_path), "no lock, nothing to do"
