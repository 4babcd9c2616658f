"""The user messages of BENCH.md's `chat` workload: real requests, written here (nothing is
downloaded), made by filling instruction templates of ten kinds (explain, summarize, list,
compare, story, poem, email, advice, translate, quiz) with topics from nine domains.
`messages(n, rng)` draws `n` distinct ones, the kinds in equal shares.
"""

from __future__ import annotations

import numpy as np

# Noun phrases that read well in every template; "compare" pairs two of one domain.
TOPICS: dict[str, tuple[str, ...]] = {
    "science": (
        "photosynthesis",
        "black holes",
        "the water cycle",
        "plate tectonics",
        "vaccines",
        "the immune system",
        "DNA",
        "climate change",
        "volcanoes",
        "the speed of light",
    ),
    "history": (
        "the Roman Empire",
        "the printing press",
        "the French Revolution",
        "the Silk Road",
        "ancient Egypt",
        "the Industrial Revolution",
        "the Apollo moon landings",
        "the Renaissance",
    ),
    "money": (
        "compound interest",
        "inflation",
        "index funds",
        "monthly budgeting",
        "credit scores",
        "saving for retirement",
        "cryptocurrency",
        "starting a small business",
    ),
    "technology": (
        "machine learning",
        "the internet",
        "password managers",
        "cloud computing",
        "open-source software",
        "electric cars",
        "smartphone batteries",
        "video game design",
    ),
    "home": (
        "sourdough bread",
        "houseplants",
        "composting",
        "cooking for one",
        "meal planning",
        "decluttering a small apartment",
        "growing tomatoes on a balcony",
        "indoor cats",
    ),
    "health": (
        "sleep",
        "running",
        "meditation",
        "healthy breakfasts",
        "staying hydrated",
        "yoga",
        "good posture at a desk",
        "strength training",
    ),
    "nature": (
        "honeybees",
        "octopuses",
        "migrating birds",
        "coral reefs",
        "wolves",
        "rainforests",
        "ocean tides",
        "mushrooms",
    ),
    "culture": (
        "jazz",
        "learning the guitar",
        "impressionist painting",
        "Shakespeare's plays",
        "chess",
        "street photography",
        "haiku",
        "science fiction novels",
    ),
    "travel": (
        "learning Spanish",
        "travelling on a budget",
        "Japanese tea ceremonies",
        "night trains in Europe",
        "street food in Mexico City",
        "hiking in the Alps",
        "visiting Iceland",
        "camping with children",
    ),
}

# (kind, template): {topic}, and {other} (a topic of the same domain) for "compare".
TEMPLATES: tuple[tuple[str, str], ...] = (
    ("explain", "Explain {topic} in simple terms, as if I were twelve years old."),
    ("explain", "Can you explain {topic} to me? Keep it short and avoid jargon."),
    ("explain", "What is the most common misunderstanding about {topic}, and what is actually true?"),
    ("explain", "Give me a simple analogy that explains {topic}."),
    ("summarize", "Summarize the key ideas behind {topic} in one paragraph."),
    ("summarize", "Give me a three-sentence summary of {topic} for a school presentation."),
    ("summarize", "I have two minutes before a meeting. Summarize what I should know about {topic}."),
    ("list", "List five interesting facts about {topic}."),
    (
        "list",
        "What are the three most important things a beginner should know about {topic}? Use a numbered list.",
    ),
    ("list", "Make a bulleted list of common mistakes people make with {topic}."),
    ("compare", "Compare {topic} and {other}. How are they similar, and how are they different?"),
    ("compare", "Which would be more interesting to study, {topic} or {other}? Give two reasons for each."),
    ("compare", "Write a short table comparing {topic} with {other}."),
    ("story", "Write a short story about a young girl who becomes fascinated by {topic}."),
    ("story", "Tell me a bedtime story for a five-year-old that involves {topic}."),
    ("story", "Write a funny short story in which an old man tries to teach his dog about {topic}."),
    ("poem", "Write a short poem about {topic}."),
    ("poem", "Write a haiku about {topic}, then explain its imagery in one sentence."),
    ("poem", "Write a four-line rhyming poem about {topic} for a birthday card."),
    ("email", "Write a polite email to my teacher asking for extra reading material on {topic}."),
    ("email", "Draft a short email inviting my colleagues to a lunchtime talk about {topic} next Thursday."),
    ("email", "Write an email to a friend recommending that she learn about {topic}, and say why."),
    ("advice", "I'd like to learn about {topic} but I don't know where to start. What do you suggest?"),
    (
        "advice",
        "My friend keeps asking me about {topic} and I never know what to say. Any tips for explaining it?",
    ),
    ("advice", "I have one free hour every evening. How could I use it to learn about {topic}?"),
    (
        "translate",
        'Translate into French: "I would love to learn more about {topic}." '
        "Then explain the grammar briefly.",
    ),
    ("translate", 'How do I say "Can you recommend a good book about {topic}?" in Spanish?'),
    ("translate", 'Rewrite this sentence in formal English: "hey, wanna chat about {topic} later?"'),
    ("quiz", "Write three quiz questions about {topic}, with the answers."),
    ("quiz", "Why should anyone care about {topic}? Answer in a few sentences."),
    ("quiz", "Ask me five true-or-false questions about {topic}, and give the answers at the end."),
)

KINDS: tuple[str, ...] = tuple(dict.fromkeys(kind for kind, _ in TEMPLATES))


def _candidates(kind: str) -> list[str]:
    """Every message of one kind, in a fixed order."""
    out = []
    for k, template in TEMPLATES:
        if k != kind:
            continue
        for topics in TOPICS.values():
            for i, topic in enumerate(topics):
                other = topics[(i + 1) % len(topics)]  # the next of its domain, for "compare"
                out.append(template.format(topic=topic, other=other))
    return out


def messages(n: int, rng: np.random.Generator) -> list[str]:
    """`n` distinct messages, the kinds taking turns, each kind's drawn at random; then shuffled."""
    pools = [_candidates(kind) for kind in KINDS]
    capacity = sum(len(p) for p in pools)
    if not 1 <= n <= capacity:
        raise ValueError(f"chat requests must be between 1 and {capacity} (got {n})")
    order = [list(rng.permutation(len(p))) for p in pools]
    picked = []
    while len(picked) < n:
        for pool, idx in zip(pools, order):
            if idx and len(picked) < n:
                picked.append(pool[idx.pop()])
    return [picked[i] for i in rng.permutation(n)]
