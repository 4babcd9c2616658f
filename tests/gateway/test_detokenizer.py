"""Incremental detokenization and stop strings: never half a character, the stream equal to
the whole decode, stop strings found across token boundaries and cut, the held-back tail
released at the end; and a choice's state over scheduler outputs."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from services.gateway.detokenizer import IncrementalDetokenizer, StopStringMatcher
from services.gateway.generation import ChoiceState
from services.gateway.validation import ChoicePlan, OutputOptions
from shared.messages import RequestOutput, SamplingParams, TokenLogprobs


def byte_decode(ids: list[int]) -> str:
    """A toy tokenizer: each token id is one byte."""
    return bytes(ids).decode("utf-8", errors="replace")


def stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detok.add(t) for t in ids] + [detok.flush()]


def test_a_character_split_across_tokens_is_held_until_complete():
    ids = list("a€b".encode())  # € is three bytes
    deltas = stream(IncrementalDetokenizer(byte_decode), ids)
    assert deltas == ["a", "", "", "€", "b", ""]


def test_an_unfinished_character_at_the_end_is_released_as_replacement():
    deltas = stream(IncrementalDetokenizer(byte_decode), list(b"x") + list("€".encode())[:2])
    assert deltas == ["x", "", "", "\ufffd"]


def test_a_prompt_ending_mid_character_does_not_change_the_output():
    euro = list("€".encode())
    deltas = stream(IncrementalDetokenizer(byte_decode, prompt_token_ids=euro[:1]), euro[1:])
    assert "".join(deltas) == byte_decode(euro[1:])


def test_real_tokenizer_splits_characters_and_never_emits_half_of_one(tokenizer):
    text = "日本語のテキスト, naïve café 🎉 Ωμέγα — ok"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.split()), "the byte-level tokenizer splits these characters into byte tokens"
    deltas = stream(IncrementalDetokenizer(_decode(tokenizer)), ids)
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas[:-1], "some token completed no character: it was held back"


@settings(max_examples=200, deadline=None)
@given(text=st.text(min_size=1, max_size=40))
def test_any_text_streams_back_exactly(tokenizer, text):
    ids = tokenizer.encode(text)
    deltas = stream(IncrementalDetokenizer(_decode(tokenizer)), ids)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)
    if "\ufffd" not in text:
        assert all("\ufffd" not in d for d in deltas)


@settings(max_examples=500, deadline=None)
@given(
    ids=st.lists(st.integers(0, 4095), min_size=1, max_size=30),
    prompt=st.lists(st.integers(0, 4095), max_size=8),
)
def test_any_token_sequence_streams_to_its_whole_decode(tokenizer, ids, prompt):
    """Random ids (what a random model emits: stray continuation bytes, special tokens)."""
    deltas = stream(IncrementalDetokenizer(_decode(tokenizer), prompt), ids)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)


# ---- stop strings -------------------------------------------------------------------------


def test_stop_string_across_pushes_is_cut():
    m = StopStringMatcher(["lo w"])
    assert m.push("Hel") == ("He", False)  # "l" may begin "lo w": held
    assert m.push("lo") == ("l", False)  # "lo" held
    assert m.push(" world") == ("", True)
    assert m.push("more") == ("", True)
    assert m.flush() == ""


def test_partial_match_that_fails_is_released():
    m = StopStringMatcher(["bc"])
    assert m.push("ab") == ("a", False)
    assert m.push("d") == ("bd", False)
    assert m.push("xb") == ("x", False)
    assert m.flush() == "b", "the held tail comes out when the text ends"


def test_first_completed_stop_string_wins_and_text_before_it_is_kept():
    assert StopStringMatcher(["world", "o w"]).push("hello world") == ("hell", True)
    assert StopStringMatcher(["baa", "a"]).push("xbaay") == ("xb", True), "'a' completes before 'baa'"


def test_no_stop_strings_passes_text_through():
    m = StopStringMatcher([])
    assert m.push("abc") == ("abc", False)


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="abc", max_size=30),
    stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 30), max_size=6),
)
def test_matcher_equals_cutting_the_whole_text_at_the_first_stop(text, stops, cuts):
    pieces, prev = [], 0
    for c in sorted(set(min(c, len(text)) for c in cuts)) + [len(text)]:
        pieces.append(text[prev:c])
        prev = c
    m = StopStringMatcher(stops)
    out, matched = "", False
    for p in pieces:
        safe, matched = m.push(p)
        out += safe
        if matched:
            break
    if not matched:
        out += m.flush()
    assert (out, matched) == _cut_at_first_completed_stop(text, stops)


def _cut_at_first_completed_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """The reference: read one character at a time, stop at the first stop string completed."""
    for end in range(1, len(text) + 1):
        for s in sorted(stops, key=len, reverse=True):
            if text[:end].endswith(s):
                return text[: end - len(s)], True
    return text, False


# ---- a choice over scheduler outputs -------------------------------------------------------


class _Model:
    """Just what ChoiceState needs of a ServedModel: a byte-per-token decode."""

    @staticmethod
    def decode(ids, skip_special_tokens=True):
        return byte_decode(ids)


def _choice(stop=(), logprobs=None, **options) -> ChoiceState:
    plan = ChoicePlan(0, "r-0", SamplingParams(logprobs=logprobs), [])
    return ChoiceState(plan, _Model(), list(stop), OutputOptions(**options))


def _bytes(s: str) -> list[int]:
    return list(s.encode())


def test_choice_excludes_the_stop_token_text_but_counts_it():
    c = _choice()
    d1 = c.on_output(RequestOutput("r-0", _bytes("hi")))
    d2 = c.on_output(RequestOutput("r-0", [ord("!")], index=2, finish_reason="stop", stop_token_id=ord("!")))
    assert d1.text + d2.text == "hi"
    assert d2.finish_reason == "stop" and c.num_tokens == 3


def test_choice_stop_string_finishes_with_tokens_counted_up_to_the_match():
    c = _choice(stop=["cd"])
    d = c.on_output(RequestOutput("r-0", _bytes("abcdef")))
    assert (d.text, d.finish_reason, c.stopped_by_string, c.num_tokens) == ("ab", "stop", True, 4)
    assert not c.on_output(RequestOutput("r-0", _bytes("gh"), index=6)), "nothing after the stop string"
    c.on_output(RequestOutput("r-0", index=8, finish_reason="abort"))
    assert c.final is not None and c.finish_reason == "stop"


def test_choice_releases_held_text_when_the_output_ends_without_a_match():
    c = _choice(stop=["xyz"])
    d1 = c.on_output(RequestOutput("r-0", _bytes("abx")))
    d2 = c.on_output(RequestOutput("r-0", _bytes("y"), index=3, finish_reason="length"))
    assert (d1.text, d2.text, d2.finish_reason) == ("ab", "xy", "length")


def test_choice_drops_tokens_replayed_by_a_restarted_scheduler():
    c = _choice()
    texts = [
        c.on_output(RequestOutput("r-0", _bytes("ab"), index=0)).text,
        c.on_output(RequestOutput("r-0", _bytes("abc"), index=0)).text,  # replayed from the prompt
        c.on_output(RequestOutput("r-0", _bytes("d"), index=3, finish_reason="length")).text,
    ]
    assert "".join(texts) == "abcd" and c.num_tokens == 4


def test_a_token_with_no_text_yet_still_makes_a_chunk():
    """As vLLM streams: an output that generated tokens is a chunk, even with empty text
    (here the first byte of a three-byte character), so TTFT is the first token's time."""
    c = _choice()
    first = c.on_output(RequestOutput("r-0", _bytes("€")[:1]))
    assert first and first.text == "" and first.num_tokens == 1
    rest = c.on_output(RequestOutput("r-0", _bytes("€")[1:], index=1, finish_reason="length"))
    assert rest.text == "€" and c.num_tokens == 3
    assert not c.on_output(RequestOutput("r-0", _bytes("€"), index=0)), "nothing after it finished"


def test_choice_keeps_logprobs_aligned_with_tokens():
    c = _choice(logprobs=1)
    lps = [TokenLogprobs(t, -0.5, [(t, -0.5)]) for t in _bytes("a€")]
    d = c.on_output(RequestOutput("r-0", _bytes("a€"), lps, finish_reason="length"))
    assert d.text == "a€"
    assert [e.token_id for e in d.logprobs] == _bytes("a€")
    assert d.text_offsets == [0, 1, 1, 1], "the three bytes of € start where it starts"


def _decode(tokenizer):
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
