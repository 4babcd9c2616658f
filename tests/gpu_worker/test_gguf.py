"""Serving a .gguf file (shared/gguf_model.py): a K-quant file the test writes (from the real
SmolLM2 file: its metadata, tokenizer and two of its layers, with Q4_K and Q6_K tensors
among its Q4_1 ones) is converted once into the cache, its weights exactly what the gguf
package's dequantizer reads, and an engine serving it by its path generates what
transformers does on those weights. Files we cannot serve are refused, saying why."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors import safe_open
from transformers import AutoTokenizer

from conveyor.tiny_model import ensure_tiny_model
from services.gateway.served_model import load_served_model
from services.gpu_worker.factory import create_engine
from shared.config import GatewaySettings, WorkerSettings
from shared.gguf_model import converted_dir
from shared.models import ModelLoadError, check_model_dir, model_dir
from tests.gguf_files import KQUANT_TENSORS, write_foreign_arch, write_kquant_model
from tests.gpu_worker.conftest import TEST_DEVICE
from tests.gpu_worker.hf_reference import assert_greedy_matches, hf_greedy
from tests.gpu_worker.plan_driver import PlanDriver
from tools.real_models import ensure_smollm2, smollm2_gguf

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def own_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf-cache")


@pytest.fixture
def cache(own_cache, monkeypatch):
    """A cache of the module's own, so that the conversion really happens here. Only for
    the tests that ask for it: the others find SmolLM2 converted once in the usual cache,
    not again here (20 s or more)."""
    monkeypatch.setenv("CONVEYOR_CACHE_DIR", str(own_cache))
    return own_cache


@pytest.fixture(scope="module")
def kquant(tmp_path_factory):
    return write_kquant_model(smollm2_gguf(), tmp_path_factory.mktemp("gguf") / "smol-kq.gguf")


def test_a_kquant_file_is_converted_once_to_exactly_its_dequantized_weights(kquant, cache):
    assert check_model_dir(kquant) == {}, "a .gguf is checked by its header alone, before converting"
    served = model_dir(str(kquant))
    assert served == converted_dir(kquant) and served.is_relative_to(cache)
    assert served.name == "smol-kq", "the name clients send: the file's, without .gguf"
    weights = served / "model.safetensors"
    first_write = weights.stat().st_mtime_ns
    assert model_dir(str(kquant)) == served and weights.stat().st_mtime_ns == first_write, "converted once"

    tensors = {t.name: t for t in GGUFReader(kquant).tensors}
    assert {tensors[n].tensor_type for n in KQUANT_TENSORS} == set(KQUANT_TENSORS.values())
    # ffn_down (K-quants) and ffn_up (the file's own Q4_1): not permuted by the conversion.
    pairs = {
        f"model.layers.{i}.mlp.{hf}.weight": f"blk.{i}.ffn_{g}.weight"
        for i in (0, 1)
        for hf, g in (("down_proj", "down"), ("up_proj", "up"))
    }
    with safe_open(weights, "pt") as f:
        for hf_name, gguf_name in pairs.items():
            t = tensors[gguf_name]
            want = dequantize(np.asarray(t.data), t.tensor_type).reshape(f.get_tensor(hf_name).shape)
            got = f.get_tensor(hf_name).numpy()
            assert got.dtype == np.float32 and np.array_equal(got, want), hf_name
            assert np.abs(want).max() > 0, "a real weight, not zeros"


def test_an_engine_serving_a_kquant_file_by_its_path_matches_hf(kquant, cache):
    served = model_dir(str(kquant))
    tokenizer = AutoTokenizer.from_pretrained(str(served), local_files_only=True)
    assert tokenizer.chat_template, "the chat template comes from the file's metadata"
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        for q in ("What is the capital of France?", "Name three colours.")
    ]
    prompts.append(tokenizer("The quick brown fox")["input_ids"])
    settings = WorkerSettings(
        model=str(kquant),
        device=TEST_DEVICE,
        dtype="float32",
        max_model_len=512,
        kv_cache_memory="16MiB",
        worker_id="test-worker",
    )
    engine, info = create_engine(settings)
    driver = PlanDriver(engine.execute, info.block_size, info.num_blocks, info.eos_token_ids, chunk_size=9)
    for i, prompt in enumerate(prompts):
        driver.add(str(i), prompt, MAX_TOKENS)
    outputs = driver.run()
    for i, want in enumerate(hf_greedy(served, prompts, MAX_TOKENS)):
        assert_greedy_matches(outputs[str(i)], want, str(i))


def test_files_we_cannot_serve_are_refused_saying_why(tmp_path, cache):
    with pytest.raises(ModelLoadError, match="does not exist"):
        model_dir(str(tmp_path / "absent.gguf"))
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError, match="not a readable GGUF file"):
        check_model_dir(garbage)
    mamba = write_foreign_arch(tmp_path / "mamba.gguf")
    for check in (check_model_dir, model_dir):
        with pytest.raises(ModelLoadError, match="unsupported GGUF architecture 'mamba'.*supported: llama"):
            check(str(mamba))
    assert not (cache / "models" / "gguf").exists() or not any((cache / "models" / "gguf").rglob("mamba*")), (
        "refused before any conversion"
    )


def test_the_gateway_takes_another_tokenizer_if_it_fits_the_model():
    tiny, smollm2 = ensure_tiny_model(), ensure_smollm2()
    served = load_served_model(GatewaySettings(model=str(smollm2), tokenizer=str(tiny)))
    assert len(served.tokenizer) == 4096 and served.name == smollm2.name
    with pytest.raises(ModelLoadError, match="49152 tokens, more than the model's vocab_size 4096"):
        load_served_model(GatewaySettings(model=str(tiny), tokenizer=str(smollm2)))
