"""The user messages of BENCH.md's `copy` workload: a paragraph of plain sentences, written
here (nothing is downloaded), given in the message with an instruction to copy it or edit it
lightly, so that most of the answer repeats the prompt: what speculative decoding by prompt
lookup is for. `messages(n, rng)` draws `n` of them, the instruction kinds taking turns.
"""

from __future__ import annotations

import numpy as np

from bench.chat_prompts import TOPICS

SENTENCES: tuple[str, ...] = (
    "Many people first hear about {topic} at school.",
    "There are good books and short videos about {topic} for beginners.",
    "Learning about {topic} takes patience, but the basics are simple.",
    "A local library is a fine place to start reading about {topic}.",
    "Some people spend years studying {topic} in depth.",
    "Friends and family often have their own stories about {topic}.",
    "It helps to write down questions about {topic} as they come up.",
    "Experts still disagree about some details of {topic}.",
    "A weekend is enough to get a first feel for {topic}.",
    "Most newspapers write about {topic} at least once a year.",
)

# (kind, instruction): {paragraph}; "replace" also {old} and {new}.
INSTRUCTIONS: tuple[tuple[str, str], ...] = (
    ("copy", "Copy the following paragraph exactly, word for word, and write nothing else:\n\n{paragraph}"),
    (
        "replace",
        'Repeat the paragraph below, but write "{new}" wherever it says "{old}". Change nothing '
        "else.\n\n{paragraph}",
    ),
    (
        "typos",
        "Fix the spelling mistakes in this paragraph and give it back otherwise unchanged:\n\n{paragraph}",
    ),
    (
        "quote",
        "Quote this paragraph back to me inside double quotes, then say in one sentence what it is "
        "about:\n\n{paragraph}",
    ),
)


def paragraph(rng: np.random.Generator) -> tuple[str, str, str]:
    """Four to six sentences on topics of one domain; returns it with one of its topics and
    another topic of that domain (for "replace")."""
    domain = list(TOPICS.values())[rng.integers(len(TOPICS))]
    picks = rng.choice(len(SENTENCES), size=int(rng.integers(4, 7)), replace=False)
    topics = [domain[i] for i in rng.choice(len(domain), size=2, replace=False)]
    text = " ".join(SENTENCES[k].format(topic=topics[j % 2]) for j, k in enumerate(picks))
    return text[0].upper() + text[1:], topics[0], topics[1]


def with_typos(text: str, rng: np.random.Generator, n: int = 3) -> str:
    """`text` with two adjacent letters swapped in `n` of its longer words."""
    words = text.split(" ")
    longer = [i for i, w in enumerate(words) if len(w) >= 6 and w.isalpha()]
    for i in rng.choice(longer, size=min(n, len(longer)), replace=False):
        w = words[i]
        k = int(rng.integers(1, len(w) - 2))
        words[i] = w[:k] + w[k + 1] + w[k] + w[k + 2 :]
    return " ".join(words)


def messages(n: int, rng: np.random.Generator) -> list[str]:
    """`n` messages, the instruction kinds taking turns, each over a fresh paragraph."""
    if n < 1:
        raise ValueError(f"copy requests must be >= 1 (got {n})")
    out = []
    for i in range(n):
        kind, instruction = INSTRUCTIONS[i % len(INSTRUCTIONS)]
        text, old, new = paragraph(rng)
        if kind == "typos":
            text = with_typos(text, rng)
        out.append(instruction.format(paragraph=text, old=old, new=new))
    return out
