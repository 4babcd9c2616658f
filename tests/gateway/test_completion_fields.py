"""vLLM's completion fields, from the request to the response, without a model: a batch of
prompts, echo, prompt logprobs, the token-level masks, truncation, and the output options
(shown by feeding a choice hand-made scheduler outputs, as the worker would send them)."""

from __future__ import annotations

import logging

import pytest

from services.gateway import fields
from services.gateway.errors import ApiError
from services.gateway.generation import ChoiceText, Generation
from services.gateway.protocol import ChatCompletionRequest, CompletionRequest
from services.gateway.responses import ChatFormat, CompletionFormat
from services.gateway.validation import chat_plan, completion_plan
from shared.messages import FinishReason, RequestOutput, TokenLogprobs, Usage


def _completion(served, **body):
    return completion_plan(CompletionRequest.model_validate({"prompt": "hello", **body}), served)


def _refused(served, **body) -> ApiError:
    with pytest.raises(ApiError) as info:
        _completion(served, **body)
    assert info.value.status == 400
    return info.value


# ---- the plan ------------------------------------------------------------------------------
def test_a_batch_gives_one_choice_per_prompt_and_n_in_openais_order(served_model):
    plan = _completion(served_model, prompt=["hello", "good morning"], n=2, seed=5, max_tokens=3)
    hello, morning = served_model.encode("hello"), served_model.encode("good morning")
    assert plan.prompts == [hello, morning]
    assert [(c.index, c.prompt_index, c.prompt_token_ids) for c in plan.choices] == [
        (0, 0, hello),
        (1, 0, hello),
        (2, 1, morning),
        (3, 1, morning),
    ]
    assert [c.sampling.seed for c in plan.choices] == [5, 6, 5, 6], "each prompt's choices as one request's"
    assert len({c.request_id for c in plan.choices}) == 4
    ids = _completion(served_model, prompt=[[5, 6], [7, 8, 9]])
    assert [c.prompt_token_ids for c in ids.choices] == [[5, 6], [7, 8, 9]]


def test_a_batch_checks_each_prompt_and_names_it(served_model):
    err = _refused(served_model, prompt=[[5], list(range(3, 70))], max_tokens=10)
    assert err.param == "prompt[1]" and "67 in the prompt[1]" in err.message
    err = _refused(served_model, prompt=[[5], [6, 4096]])
    assert err.param == "prompt" and "prompt[1][1]" in err.message and "4096" in err.message


def test_echo_asks_for_prompt_logprobs_and_max_tokens_0_generates_one_dropped_token(served_model):
    plan = _completion(
        served_model, prompt=[[5, 6, 7], [8, 9]], echo=True, logprobs=1, max_tokens=0, temperature=0
    )
    s = plan.choices[0].sampling
    assert (s.prompt_logprobs, s.logprobs, s.max_tokens) == (1, 1, 1)
    assert plan.output.echo and plan.output.echo_only
    assert plan.output.prompt_texts == (served_model.decode([5, 6, 7]), served_model.decode([8, 9]))
    assert _completion(served_model, echo=True).choices[0].sampling.prompt_logprobs is None, (
        "no logprobs: none"
    )
    assert _completion(served_model, prompt_logprobs=3).choices[0].sampling.prompt_logprobs == 3
    assert (
        _completion(served_model, echo=True, logprobs=2, prompt_logprobs=4)
        .choices[0]
        .sampling.prompt_logprobs
        == 4
    )


def test_token_level_fields_become_sampling_params(served_model):
    s = (
        _completion(
            served_model, logit_bias={"5": 100, "7": -2.5}, allowed_token_ids=[9, 3, 9], bad_words=["hello"]
        )
        .choices[0]
        .sampling
    )
    assert s.logit_bias == {5: 100.0, 7: -2.5}
    assert s.allowed_token_ids == [3, 9]
    bare, spaced = served_model.encode("hello", False), served_model.encode(" hello", False)
    expected = [bare] + ([spaced] if spaced[0] != bare[0] and len(spaced) == len(bare) else [])
    assert s.bad_words == expected and s.bad_words[0] == bare


def test_bad_words_are_tokenized_as_vllm_does(served_model):
    # A word whose spaced form is a different word token of the same length is banned in both forms.
    for word in ("the", "hello world", " fox"):
        got = fields.bad_words([word], served_model)
        bare = served_model.encode(word.lstrip(), False)
        spaced = served_model.encode(" " + word.lstrip(), False)
        assert got[0] == bare
        assert (spaced in got) == (spaced[0] != bare[0] and len(spaced) == len(bare))


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"logit_bias": {"x": 1}}, "logit_bias", ["token ids written as strings"]),
        ({"logit_bias": {"4096": 1}}, "logit_bias", ["logit_bias[4096]", "4096 tokens"]),
        ({"logit_bias": {"5": -101}}, "logit_bias", ["-100 to 100"]),
        ({"allowed_token_ids": []}, "allowed_token_ids", ["empty"]),
        ({"allowed_token_ids": [1, 5000]}, "allowed_token_ids", ["allowed_token_ids[1]", "5000"]),
        ({"bad_words": [""]}, "bad_words", ["bad_words[0]", "no token"]),
        ({"truncate_prompt_tokens": 65}, "truncate_prompt_tokens", ["64"]),
        ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens", ["empty prompt"]),
        ({"truncation_side": "left"}, "truncation_side", ["truncate_prompt_tokens"]),
        ({"max_tokens": 0}, "max_tokens", ["echo"]),
        ({"use_beam_search": True}, "use_beam_search", ["not supported", "false"]),
        ({"length_penalty": 0.5}, "length_penalty", ["not supported"]),
        ({"prompt_embeds": "AAAA"}, "prompt_embeds", ["not supported"]),
    ],
)
def test_refusals_name_the_field(served_model, body, param, words):
    err = _refused(served_model, **body)
    assert err.param == param, err.message
    for w in words:
        assert w in err.message, err.message


def test_defaults_of_refused_fields_are_accepted_and_unknown_fields_logged_once(served_model, caplog):
    _completion(
        served_model, use_beam_search=False, length_penalty=1.0, stream_interval=1, mm_payload="tensors"
    )
    with caplog.at_level(logging.WARNING, logger="services.gateway.fields"):
        _completion(served_model, frobnicate=1, zzz_unknown=2)
        _completion(served_model, frobnicate=1)
    logged = [r.getMessage() for r in caplog.records]
    assert (
        len(logged) == 1
        and "frobnicate" in logged[0]
        and "zzz_unknown" in logged[0]
        and "ignored" in logged[0]
    )


def test_truncate_prompt_tokens_keeps_the_end_unless_right(served_model):
    ids = list(range(10, 30))
    assert _completion(served_model, prompt=ids, truncate_prompt_tokens=5).prompt_token_ids == ids[-5:]
    assert (
        _completion(
            served_model, prompt=ids, truncate_prompt_tokens=5, truncation_side="right"
        ).prompt_token_ids
        == ids[:5]
    )
    assert (
        _completion(served_model, prompt=ids, truncate_prompt_tokens=-1, max_tokens=1).prompt_token_ids == ids
    )
    long = list(range(10, 100))
    assert fields.truncate(long, -1, None, served_model.limits) == long[-64:], (
        "-1: the maximum length (here 64)"
    )
    plan = _completion(served_model, prompt=long, truncate_prompt_tokens=60, max_tokens=0, echo=True)
    assert plan.prompt_token_ids == long[-60:] and plan.output.prompt_texts == (
        served_model.decode(long[-60:]),
    )


def test_add_special_tokens_and_request_id(served_model):
    assert _completion(served_model, add_special_tokens=False).prompt_token_ids == served_model.encode(
        "hello", False
    )
    plan = _completion(served_model, request_id="my-id", n=2)
    assert plan.request_id == "cmpl-my-id" and len({c.request_id for c in plan.choices}) == 2


# ---- the response ----------------------------------------------------------------------------
def _generation(plan, model) -> Generation:
    return Generation(plan, model, engine=None, metrics=None)


def _run(gen: Generation, outputs: dict[int, list[RequestOutput]]) -> list[ChoiceText]:
    results = [ChoiceText(c.index) for c in gen.choices]
    for index, outs in outputs.items():
        for out in outs:
            results[index].add(gen.choices[index].on_output(out))
    return results


def _lp(token: int, logprob: float, *top: tuple[int, float]) -> TokenLogprobs:
    return TokenLogprobs(token, logprob, list(top))


def _final(rid: str, tokens: list[int], **kw) -> RequestOutput:
    return RequestOutput(rid, tokens, finish_reason=FinishReason.LENGTH, usage=Usage(3, len(tokens), 0), **kw)


def test_echo_with_logprobs_puts_the_prompt_first(served_model):
    prompt = served_model.encode("hi there")
    plan = _completion(served_model, prompt=[prompt], echo=True, logprobs=1, max_tokens=1, temperature=0)
    gen = _generation(plan, served_model)
    pl = [_lp(t, -1.0 - k, (t, -1.0 - k), (3, -0.5)) for k, t in enumerate(prompt[1:])]
    out = _final(plan.choices[0].request_id, [50], logprobs=[_lp(50, -0.25, (50, -0.25))], prompt_logprobs=pl)
    body = CompletionFormat(served_model, gen).response(_run(gen, {0: [out]}))
    choice = body["choices"][0]
    assert choice["text"] == "hi there" + served_model.decode([50])
    lp = choice["logprobs"]
    tt = served_model.token_text
    assert lp["tokens"] == [tt(t) for t in prompt] + [tt(50)]
    assert lp["token_logprobs"] == [None] + [-1.0 - k for k in range(len(prompt) - 1)] + [-0.25]
    assert lp["top_logprobs"][0] is None
    assert lp["top_logprobs"][1] == {tt(prompt[1]): -1.0, tt(3): -0.5}, (
        "the prompt token and its top alternatives"
    )
    offsets = [sum(len(tt(t)) for t in prompt[:i]) for i in range(len(prompt) + 1)]
    assert lp["text_offset"] == offsets, "as vLLM: the tokens' strings added up, through the prompt"
    assert choice["prompt_logprobs"][0] is None and str(prompt[1]) in choice["prompt_logprobs"][1]


def test_echo_max_tokens_0_returns_the_prompt_only_for_each_prompt(served_model):
    plan = _completion(served_model, prompt=[[40, 41], [42, 43, 44]], echo=True, logprobs=1, max_tokens=0)
    gen = _generation(plan, served_model)
    outs = {
        c.index: [
            _final(
                c.request_id,
                [99],
                logprobs=[_lp(99, -3.0)],
                prompt_logprobs=[_lp(t, -2.0, (t, -2.0)) for t in c.prompt_token_ids[1:]],
            )
        ]
        for c in plan.choices
    }
    body = CompletionFormat(served_model, gen).response(_run(gen, outs))
    assert [c["text"] for c in body["choices"]] == [
        served_model.decode([40, 41]),
        served_model.decode([42, 43, 44]),
    ]
    assert [c["logprobs"]["token_logprobs"] for c in body["choices"]] == [[None, -2.0], [None, -2.0, -2.0]]
    assert body["usage"]["prompt_tokens"] == 5, "the prompts summed"
    assert body["usage"]["completion_tokens"] == 2, "as vLLM: the token generated and dropped is counted"


def test_prompt_logprobs_in_vllms_shape_with_ranks(served_model):
    plan = _completion(served_model, prompt=[5, 6, 7], prompt_logprobs=2, max_tokens=1)
    gen = _generation(plan, served_model)
    pl = [_lp(6, -0.5, (6, -0.5), (9, -1.5)), _lp(7, -4.0, (8, -0.1), (9, -0.2))]
    fmt = CompletionFormat(served_model, gen)
    got = fmt.response(_run(gen, {0: [_final(plan.choices[0].request_id, [1], prompt_logprobs=pl)]}))
    shown = got["choices"][0]["prompt_logprobs"]
    tt = served_model.token_text
    assert shown[0] is None
    assert shown[1] == {
        "6": {"logprob": -0.5, "rank": 1, "decoded_token": tt(6)},
        "9": {"logprob": -1.5, "rank": 2, "decoded_token": tt(9)},
    }
    assert shown[2]["7"]["rank"] == 3 and shown[2]["8"]["rank"] == 1


def test_chat_prompt_logprobs_and_token_ids_are_response_level(served_model):
    plan = chat_plan(
        ChatCompletionRequest.model_validate(
            {
                "messages": [{"role": "user", "content": "hi"}],
                "prompt_logprobs": 0,
                "return_token_ids": True,
                "max_tokens": 2,
            }
        ),
        served_model,
    )
    gen = _generation(plan, served_model)
    prompt = plan.prompt_token_ids
    pl = [_lp(t, -1.0, (t, -1.0)) for t in prompt[1:]]
    body = ChatFormat(served_model, gen).response(
        _run(gen, {0: [_final(plan.choices[0].request_id, [65, 66], prompt_logprobs=pl)]})
    )
    assert len(body["prompt_logprobs"]) == len(prompt) and body["prompt_logprobs"][0] is None
    assert body["prompt_token_ids"] == prompt and body["choices"][0]["token_ids"] == [65, 66]


def test_tokens_as_ids_token_ids_and_continuous_usage_in_a_stream(served_model):
    plan = _completion(
        served_model,
        prompt=[5, 6],
        logprobs=1,
        return_tokens_as_token_ids=True,
        return_token_ids=True,
        stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
        max_tokens=3,
    )
    gen = _generation(plan, served_model)
    fmt = CompletionFormat(served_model, gen)
    rid = plan.choices[0].request_id
    first = fmt.chunk(
        gen.choices[0].on_output(RequestOutput(rid, [65], logprobs=[_lp(65, -1.0, (66, -0.5))]))
    )
    c = first["choices"][0]
    assert c["logprobs"]["tokens"] == ["token_id:65"] and c["logprobs"]["top_logprobs"] == [
        {"token_id:66": -0.5}
    ]
    assert c["prompt_token_ids"] == [5, 6] and c["token_ids"] == [65]
    assert first["usage"] == {
        "prompt_tokens": 2,
        "completion_tokens": 1,
        "total_tokens": 3,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    second = fmt.chunk(gen.choices[0].on_output(RequestOutput(rid, [67], index=1, logprobs=[_lp(67, -1.0)])))
    assert second["choices"][0]["prompt_token_ids"] is None and second["usage"]["completion_tokens"] == 2


def test_include_stop_str_in_output_keeps_the_stop_string_and_stop_token(served_model):
    text_ids = served_model.encode("one two three", False)
    for include, expected in ((False, "one"), (True, "one two")):
        plan = _completion(served_model, stop=[" two"], include_stop_str_in_output=include, max_tokens=10)
        gen = _generation(plan, served_model)
        got = _run(gen, {0: [RequestOutput(plan.choices[0].request_id, text_ids)]})[0]
        assert got.text == expected and got.finish_reason == FinishReason.STOP
    eos = served_model.tokenizer.convert_tokens_to_ids("<|im_end|>")
    for include, expected in ((False, "one"), (True, "one<|im_end|>")):
        plan = _completion(served_model, include_stop_str_in_output=include, skip_special_tokens=False)
        gen = _generation(plan, served_model)
        out = RequestOutput(
            plan.choices[0].request_id,
            served_model.encode("one", False) + [eos],
            finish_reason=FinishReason.STOP,
            stop_token_id=eos,
        )
        assert _run(gen, {0: [out]})[0].text == expected


def test_skip_special_tokens_false_shows_them(served_model):
    start, end = (served_model.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>"))
    ids = [start, end] + served_model.encode("ok", False)
    texts = {}
    for skip, spaces in ((True, True), (False, True), (False, False)):
        plan = _completion(served_model, skip_special_tokens=skip, spaces_between_special_tokens=spaces)
        gen = _generation(plan, served_model)
        texts[skip, spaces] = _run(gen, {0: [_final(plan.choices[0].request_id, ids)]})[0].text
    assert texts[True, True] == "ok"
    assert texts[False, False] == "<|im_start|><|im_end|>ok"
    assert texts[False, True].replace(" ", "") == "<|im_start|><|im_end|>ok"


def test_a_streamed_echo_starts_with_the_prompt_and_offsets_continue_through_it(served_model):
    prompt = [40, 41, 42]
    plan = _completion(served_model, prompt=prompt, echo=True, logprobs=0, max_tokens=2, stream=True)
    gen = _generation(plan, served_model)
    fmt, rid = CompletionFormat(served_model, gen), plan.choices[0].request_id
    pl = [_lp(t, -1.0, (t, -1.0)) for t in prompt[1:]]
    first = fmt.chunk(
        gen.choices[0].on_output(RequestOutput(rid, [65], logprobs=[_lp(65, -1.0)], prompt_logprobs=pl))
    )
    second = fmt.chunk(gen.choices[0].on_output(RequestOutput(rid, [66], index=1, logprobs=[_lp(66, -1.0)])))
    one, two = first["choices"][0], second["choices"][0]
    assert one["text"] == served_model.decode(prompt) + served_model.decode([65])
    assert two["text"] == served_model.decode([66]), "the prompt once, on the first chunk"
    base = sum(len(served_model.token_text(t)) for t in prompt)
    lengths = [len(served_model.token_text(t)) for t in prompt]
    assert one["logprobs"]["text_offset"] == [0, lengths[0], lengths[0] + lengths[1], base]
    assert one["logprobs"]["token_logprobs"] == [None, -1.0, -1.0, -1.0]
    assert two["logprobs"]["text_offset"] == [base + len(served_model.decode([65]))]
