"""The backend switch: device defaults, the environment override, and a clear error for a typo."""

import pytest
import torch

from kernels import BACKEND_ENV_VAR, get_attention_backend, reference


def test_cpu_defaults_to_the_reference(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV_VAR, raising=False)
    backend = get_attention_backend(torch.device("cpu"))
    assert backend.name == "reference"
    assert backend.decode_attention is reference.decode_attention


def test_environment_overrides_the_default(monkeypatch):
    # Without a GPU, conftest.py has set TRITON_INTERPRET=1, which lets triton run on CPU.
    monkeypatch.setenv(BACKEND_ENV_VAR, "triton")
    backend = get_attention_backend(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    assert backend.name == "triton"
    assert backend.store_kv.__module__ == "kernels.triton_store_kv"


def test_explicit_name_beats_the_environment(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV_VAR, "triton")
    assert get_attention_backend(torch.device("cpu"), "reference").name == "reference"


def test_unknown_backend_is_named_in_the_error():
    with pytest.raises(ValueError, match="'cuda-graphs'"):
        get_attention_backend(torch.device("cpu"), "cuda-graphs")
