"""What evaluation harnesses and agents send, end to end through a gateway process, the
real scheduler and worker on the 2-layer tiny model (fp32 on CPU): lm-eval's loglikelihood
requests (a batch of token-id prompts with echo and logprobs) checked against transformers'
log_softmax, a batch of prompts with echo, vLLM's prompt_logprobs, and constrained outputs
that obey their constraint at temperature 0 and 1."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

pytestmark = pytest.mark.slow

TOLERANCE = 1e-3  # fp32, the worker's kernels against transformers' forward pass
TEXTS = [
    "The quick brown fox jumps over the lazy dog",
    "Paris is the capital of",
    "1 2 3 4 5 6 7 8",
    "Once upon a time, in a land far away, there lived a king who had three daughters",
]


@pytest.fixture(scope="module")
def hf(gateway_model_dir):
    tok = AutoTokenizer.from_pretrained(str(gateway_model_dir), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        str(gateway_model_dir), dtype=torch.float32, local_files_only=True
    ).eval()
    return tok, model


def _post(gateway, path: str, body: dict) -> dict:
    r = httpx.post(f"{gateway.url}{path}", json=body, headers=gateway.headers(), timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def _reference(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) for i >= 1, and each position's best logprob."""
    with torch.inference_mode():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return logp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0], logp[:-1].max(dim=-1).values


@pytest.mark.parametrize("max_tokens", [1, 0])
def test_lm_eval_loglikelihood_requests_match_transformers(gateway, gateway_model_dir, hf, max_tokens):
    """lm-eval 0.4's local-completions loglikelihood payload (it sends max_tokens 1 and drops
    the last entry; max_tokens 0 is vLLM's prompt-only echo). Sent twice: the second time
    the prompts hit the prefix cache, and their logprobs must still be there, unchanged."""
    tok, model = hf
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    body = {
        "model": gateway_model_dir.name,
        "prompt": prompts,
        "temperature": 0,
        "max_tokens": max_tokens,
        "logprobs": 1,
        "seed": 1234,
        "echo": True,
    }
    for attempt in range(2):
        out = _post(gateway, "/v1/completions", body)
        choices = sorted(out["choices"], key=lambda c: c["index"])
        assert [c["index"] for c in choices] == list(range(len(prompts)))
        for ids, choice in zip(prompts, choices):
            lp = choice["logprobs"]
            assert len(lp["tokens"]) == len(ids) + max_tokens
            assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
            want, best = _reference(model, ids)
            assert None not in lp["token_logprobs"][1 : len(ids)], (
                "every prompt token after the first has its logprob"
            )
            got = torch.tensor(lp["token_logprobs"][1 : len(ids)])
            assert torch.allclose(got, want, atol=TOLERANCE), (attempt, (got - want).abs().max())
            tops = lp["top_logprobs"][1 : len(ids)]
            assert all(abs(max(t.values()) - b) < TOLERANCE for t, b in zip(tops, best.tolist())), (
                "lm-eval's is_greedy reads the top entry"
            )
            if max_tokens == 0:
                assert choice["text"] == tok.decode(ids, skip_special_tokens=True)
        assert out["usage"]["prompt_tokens"] == sum(len(p) for p in prompts)


def test_prompt_logprobs_in_vllms_shape(gateway, gateway_model_dir, hf):
    tok, model = hf
    ids = tok(TEXTS[1])["input_ids"]
    out = _post(
        gateway,
        "/v1/completions",
        {
            "model": gateway_model_dir.name,
            "prompt": ids,
            "max_tokens": 2,
            "temperature": 0,
            "prompt_logprobs": 2,
        },
    )
    shown = out["choices"][0]["prompt_logprobs"]
    want, _ = _reference(model, ids)
    assert shown[0] is None and len(shown) == len(ids)
    assert None not in shown[1:], "every prompt token after the first has its entry"
    for entry, token, ref in zip(shown[1:], ids[1:], want.tolist()):
        assert abs(entry[str(token)]["logprob"] - ref) < TOLERANCE
        assert min(e["rank"] for e in entry.values()) == 1
    chat = _post(
        gateway,
        "/v1/chat/completions",
        {
            "model": gateway_model_dir.name,
            "max_tokens": 1,
            "messages": [{"role": "user", "content": "hi"}],
            "prompt_logprobs": 0,
        },
    )
    assert (
        chat["prompt_logprobs"][0] is None and len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"]
    )


def test_a_batch_of_prompts_with_echo_and_n(gateway, gateway_model_dir):
    out = _post(
        gateway,
        "/v1/completions",
        {
            "model": gateway_model_dir.name,
            "prompt": TEXTS[:3],
            "n": 2,
            "echo": True,
            "max_tokens": 4,
            "temperature": 0,
            "ignore_eos": True,
        },
    )
    choices = sorted(out["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in choices] == list(range(6))
    for c in choices:
        assert c["text"].startswith(TEXTS[c["index"] // 2]) and len(c["text"]) > len(TEXTS[c["index"] // 2])
    assert choices[0]["text"] == choices[1]["text"], "greedy: a prompt's n choices agree"
    assert out["usage"]["completion_tokens"] == 6 * 4
    tokenized = [_post(gateway, "/tokenize", {"prompt": t})["count"] for t in TEXTS[:3]]
    assert out["usage"]["prompt_tokens"] == sum(tokenized), "each prompt billed once"


SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["colour", "size", "tags"],
    "properties": {
        "colour": {"enum": ["red", "green", "blue"]},
        "size": {"type": "integer", "minimum": 1, "maximum": 9},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 2},
    },
}


@pytest.mark.parametrize("temperature", [0, 1])
def test_constrained_outputs_obey_their_constraint(gateway, gateway_model_dir, temperature):
    """Needs the worker's grammar masks: the gateway only converts and checks the constraint."""
    base = {
        "model": gateway_model_dir.name,
        "prompt": "Answer:",
        "temperature": temperature,
        "max_tokens": 60,
        "n": 3,
    }
    choice = _post(
        gateway, "/v1/completions", {**base, "structured_outputs": {"choice": ["yes", "no", "maybe"]}}
    )
    assert all(c["text"] in ("yes", "no", "maybe") for c in choice["choices"])
    regex = _post(gateway, "/v1/completions", {**base, "guided_regex": "[a-c]{2,4}-[0-9]{1,3}"})
    assert all(re.fullmatch("[a-c]{2,4}-[0-9]{1,3}", c["text"]) for c in regex["choices"])
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}
    for path, extra in (
        ("/v1/completions", {}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "A thing?"}]}),
    ):
        body = {**base, **extra, "response_format": fmt, "max_tokens": 120}
        if extra:
            body.pop("prompt")
        out = _post(gateway, path, body)
        for c in out["choices"]:
            text = c["text"] if "text" in c else c["message"]["content"]
            assert c["finish_reason"] == "stop", text
            jsonschema.validate(json.loads(text), SCHEMA)
