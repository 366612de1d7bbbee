"""`reviews`: short product and movie reviews from a small grammar; the gold reward is the continuation's sentiment.

The grammar (words are separated by spaces; "." is a word of its own):

    review    := sentence+
    sentence  := clause (CONNECTOR clause)* "."
    clause    := "i" ACQUIRED "this" ITEM [time]                  neutral:  i bought this phone last week
               | "i" ["really"] OPINION "it"                      opinion:  i really loved it
               | "i" "did" "not" ["really"] OPINION_BASE "it"     opinion:  i did not like it
               | "i" "would" ["not"] "recommend" "it"             opinion:  i would recommend it
               | subject COPULA ["not"] [INTENSIFIER] ADJECTIVE   judgement: the battery was not very good
    subject   := "it" | "the" (ASPECT | ITEM) | "this" ITEM
    time      := "yesterday" | "recently" | "last" PERIOD | "for" "my" RELATIVE

Valence of a clause = word valence (adjective ±1/±2, opinion verb ±1/±2, "recommend" +2) × intensifier
(very/really/extremely ×1.5, pretty/fairly/somewhat ×0.5) × negation ("not" ×-0.5: "not great" = -1,
"not bad" = +0.5). Every clause therefore lies in [-3, +3], in steps of 1/8 (exact in floating point).

Gold reward of a continuation = mean valence of the sentiment clauses whose sentiment word (the adjective, the
opinion verb or "recommend") lies in the continuation; the prompt and continuation are parsed together, so
"the acting was not" + " great ." scores -1. A well-formed continuation without a sentiment word scores 0.
A well-formed continuation therefore scores in [-3, +3]. Anything the grammar cannot produce (an empty
continuation, a clause cut off, a missing final ".", an unknown word, a capital letter) is malformed and scores
MALFORMED_PENALTY = -4, below every well-formed continuation.

The grammar checks syntax only: it accepts "the battery was great" after "i watched this movie"; the generator below
keeps items and aspects consistent, the parser does not ask for it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from rlhflab.tasks.base import check_same_length

MALFORMED_PENALTY = -4.0
NEGATION = -0.5
"""Multiplier of "not": flips the sign and halves ("not great" is mildly negative, "not bad" mildly positive)."""

ADJECTIVES: dict[str, float] = {
    **dict.fromkeys("great excellent amazing fantastic wonderful perfect brilliant superb".split(), 2.0),
    **dict.fromkeys("good nice fine solid decent pleasant enjoyable fun".split(), 1.0),
    **dict.fromkeys("bad poor weak dull boring mediocre disappointing flimsy".split(), -1.0),
    **dict.fromkeys("awful terrible horrible dreadful useless pathetic atrocious unbearable".split(), -2.0),
}
INTENSIFIERS: dict[str, float] = {
    **dict.fromkeys(["very", "really", "extremely"], 1.5),
    **dict.fromkeys(["pretty", "fairly", "somewhat"], 0.5),  # downtoners
}
OPINIONS: dict[str, float] = {
    **{"loved": 2.0, "liked": 1.0, "enjoyed": 1.0},
    **{"hated": -2.0, "disliked": -1.0, "regretted": -1.0},
}
OPINION_BASES: dict[str, float] = {"love": 2.0, "like": 1.0, "enjoy": 1.0, "hate": -2.0, "regret": -1.0}
RECOMMEND = 2.0
CONNECTORS = ("and", "but", "yet", "although", "though", "because", "so")
SAME_SIGN_CONNECTORS = ("and", "and", "and", "so", "because")
CONTRAST_CONNECTORS = ("but", "but", "yet", "although", "though")
COPULAS = ("was", "is")
PERIODS = ("week", "night", "month", "year")
RELATIVES = ("son", "daughter", "wife", "husband", "friend", "mom", "dad")

_SCREEN = ["plot", "acting", "ending", "soundtrack", "dialogue", "cast", "story", "pacing", "script", "humor"]
_GADGET = ["battery", "screen", "speaker", "design", "price", "quality", "software", "charger"]
_PRODUCT = ["bought", "ordered", "got"]
DOMAINS: dict[str, tuple[list[str], list[str]]] = {
    # item: (verbs of acquiring it, aspects a review of it talks about)
    "movie": (["watched", "saw"], _SCREEN),
    "film": (["watched", "saw"], _SCREEN),
    "show": (["watched", "saw"], _SCREEN),
    "book": (["read", "bought", "got"], "plot ending story writing pacing cover humor dialogue".split()),
    "game": (["played", "bought", "got"], "gameplay graphics story music ending controls price".split()),
    "phone": (_PRODUCT, [*_GADGET, "camera"]),
    "laptop": (_PRODUCT, [*_GADGET, "keyboard", "trackpad", "fan"]),
    "tablet": (_PRODUCT, [*_GADGET, "camera", "case"]),
    "camera": (_PRODUCT, "lens battery screen design price quality autofocus".split()),
    "speaker": (_PRODUCT, "sound bass battery design price quality volume".split()),
    "blender": (_PRODUCT, "motor lid blade design price quality noise".split()),
    "jacket": (_PRODUCT, "fit fabric color zipper price quality hood".split()),
    "chair": (_PRODUCT, "cushion design price quality assembly height".split()),
}
ITEMS = frozenset(DOMAINS)
ACQUIRED = frozenset(verb for verbs, _ in DOMAINS.values() for verb in verbs)
ASPECTS = frozenset(aspect for _, aspects in DOMAINS.values() for aspect in aspects)

EVAL_PROMPTS: tuple[str, ...] = (
    # Hand-picked, sentiment-free openings; the generators reject any text that starts with one of them.
    "i bought this phone last week and the battery",
    "i watched this movie last night and the acting was",
    "the soundtrack was",
    "i ordered this laptop for my son and",
    "i read this book recently and the ending",
    "this camera is",
    "i played this game yesterday .",
    "i got this blender for my wife and the motor",
    "i saw this film last month and the dialogue was",
    "i bought this jacket last year and the fit is",
    "i watched this show yesterday and",
    "i ordered this chair last week and the cushion",
    "the screen is",
    "i got this speaker for my friend and the sound was",
    "i bought this tablet recently .",
    "i got this laptop yesterday and the keyboard",
)
_EVAL_WORDS = frozenset(tuple(p.split()) for p in EVAL_PROMPTS)
_EVAL_LENGTHS = sorted({len(p) for p in _EVAL_WORDS})


def vocabulary() -> set[str]:
    """Every word the grammar can produce."""
    fixed = "i this the it did not would recommend yesterday recently last for my .".split()
    lexicons = [ADJECTIVES, INTENSIFIERS, OPINIONS, OPINION_BASES, CONNECTORS, COPULAS, PERIODS, RELATIVES]
    return set(fixed).union(*lexicons, ITEMS, ACQUIRED, ASPECTS)


# ----------------------------------------------------------------------------------------------------------------
# Parsing: words -> sentiment clauses, or None when the grammar cannot produce the words.


@dataclass(frozen=True)
class Clause:
    """A sentiment clause: its valence and the index of its sentiment word in the parsed word list."""

    valence: float
    word_index: int


def split_words(text: str) -> list[str]:
    """Words of a review; "great." and "great ." read the same, so do any runs of whitespace."""
    return text.replace(".", " . ").split()


def parse_review(words: list[str]) -> list[Clause] | None:
    """Parse a whole review; return its sentiment clauses, or None if the grammar cannot produce `words`."""
    if not words:
        return None
    clauses: list[Clause] = []
    i = 0
    while i < len(words):  # one sentence per iteration
        i = _parse_clause(words, i, clauses)
        while 0 <= i < len(words) and words[i] in CONNECTORS:
            i = _parse_clause(words, i + 1, clauses)
        if i < 0 or i >= len(words) or words[i] != ".":
            return None
        i += 1
    return clauses


def _parse_clause(words: list[str], i: int, out: list[Clause]) -> int:
    """Parse one clause starting at `i`; append its sentiment (if any) to `out`; return the next index or -1."""

    def at(k: int) -> str:
        return words[k] if k < len(words) else ""

    if at(i) == "i":
        i += 1
        if at(i) in ACQUIRED:  # i bought this phone [last week]
            if at(i + 1) != "this" or at(i + 2) not in ITEMS:
                return -1
            return _parse_time(words, i + 3)
        if at(i) == "would":  # i would [not] recommend it
            negated = at(i + 1) == "not"
            i += 2 if negated else 1
            if at(i) != "recommend" or at(i + 1) != "it":
                return -1
            out.append(Clause(RECOMMEND * (NEGATION if negated else 1.0), i))
            return i + 2
        negated = at(i) == "did"  # i did not [really] like it
        if negated:
            if at(i + 1) != "not":
                return -1
            i += 2
        scale = INTENSIFIERS["really"] if at(i) == "really" else 1.0
        i += at(i) == "really"
        verbs = OPINION_BASES if negated else OPINIONS
        if at(i) not in verbs or at(i + 1) != "it":
            return -1
        out.append(Clause(verbs[at(i)] * scale * (NEGATION if negated else 1.0), i))
        return i + 2

    # subject copula [not] [intensifier] adjective
    if at(i) == "it":
        i += 1
    elif (at(i) == "the" and (at(i + 1) in ASPECTS or at(i + 1) in ITEMS)) or (
        at(i) == "this" and at(i + 1) in ITEMS
    ):
        i += 2
    else:
        return -1
    if at(i) not in COPULAS:
        return -1
    i += 1
    negated = at(i) == "not"
    i += negated
    scale = INTENSIFIERS.get(at(i), 1.0)
    i += at(i) in INTENSIFIERS
    if at(i) not in ADJECTIVES:
        return -1
    out.append(Clause(ADJECTIVES[at(i)] * scale * (NEGATION if negated else 1.0), i))
    return i + 1


def _parse_time(words: list[str], i: int) -> int:
    """Optional time phrase after a neutral clause; return the next index or -1."""
    word = words[i] if i < len(words) else ""
    nxt = words[i + 1] if i + 1 < len(words) else ""
    if word in ("yesterday", "recently"):
        return i + 1
    if word == "last":
        return i + 2 if nxt in PERIODS else -1
    if word == "for":
        return i + 3 if nxt == "my" and i + 2 < len(words) and words[i + 2] in RELATIVES else -1
    return i


def continuation_valence(prompt: str, completion: str) -> float | None:
    """Mean valence of the sentiment clauses the completion finishes; 0.0 if none; None if malformed."""
    if not isinstance(prompt, str) or not isinstance(completion, str):
        return None
    prompt_words, completion_words = split_words(prompt), split_words(completion)
    if not completion_words:
        return None
    clauses = parse_review(prompt_words + completion_words)
    if clauses is None:
        return None
    own = [c.valence for c in clauses if c.word_index >= len(prompt_words)]
    return sum(own) / len(own) if own else 0.0


def reviews_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """Gold reward: the sentiment valence of each continuation in [-3, +3], or -4 when malformed."""
    check_same_length(prompts, completions)
    rewards = []
    for prompt, completion in zip(prompts, completions, strict=True):
        valence = continuation_valence(prompt, completion)
        rewards.append(MALFORMED_PENALTY if valence is None else valence)
    return rewards


# ----------------------------------------------------------------------------------------------------------------
# Generation. A prompt ends in one of three states; a continuation finishes that state, then adds clauses.

CLAUSE_START, AFTER_SUBJECT, AFTER_COPULA = "clause_start", "after_subject", "after_copula"


def _predicate(rng: random.Random, sign: int) -> list[str]:
    """[not] [intensifier] adjective with the given sign of valence."""
    negated = rng.random() < 0.2
    wanted = -sign if negated else sign
    adjective = rng.choice([w for w, v in ADJECTIVES.items() if v * wanted > 0])
    words = ["not"] if negated else []
    if rng.random() < 0.3:  # downtoners only before mild adjectives: "pretty good", not "pretty perfect"
        strong = abs(ADJECTIVES[adjective]) > 1
        words.append(rng.choice([w for w, m in INTENSIFIERS.items() if m > 1 or not strong]))
    return [*words, adjective]


def _subject(rng: random.Random, item: str) -> list[str]:
    roll = rng.random()
    if roll < 0.75:
        return ["the", rng.choice(DOMAINS[item][1])]
    if roll < 0.9:
        return [rng.choice(["this", "the"]), item]
    return ["it"]


def _sentiment_clause(rng: random.Random, item: str, sign: int) -> list[str]:
    """A whole clause whose valence has the given sign."""
    roll = rng.random()
    if roll < 0.65:
        return [*_subject(rng, item), rng.choice(COPULAS), *_predicate(rng, sign)]
    if roll < 0.9:
        really = ["really"] if rng.random() < 0.25 else []
        if rng.random() < 0.2:  # "i did not like it" is negative, "i did not hate it" positive
            verb = rng.choice([w for w, v in OPINION_BASES.items() if v * sign < 0])
            return ["i", "did", "not", *really, verb, "it"]
        return ["i", *really, rng.choice([w for w, v in OPINIONS.items() if v * sign > 0]), "it"]
    return ["i", "would", "recommend", "it"] if sign > 0 else ["i", "would", "not", "recommend", "it"]


def _neutral_clause(rng: random.Random, item: str) -> list[str]:
    words = ["i", rng.choice(DOMAINS[item][0]), "this", item]
    roll = rng.random()
    if roll < 0.2:
        words.append(rng.choice(["yesterday", "recently"]))
    elif roll < 0.4:
        words += ["last", rng.choice(PERIODS)]
    elif roll < 0.6:
        words += ["for", "my", rng.choice(RELATIVES)]
    return words


def _opening(rng: random.Random, item: str) -> tuple[list[str], str]:
    """A prompt (review opening) and the parse state it ends in."""
    words: list[str] = []
    if rng.random() < 0.75:
        words += [*_neutral_clause(rng, item), "and" if rng.random() < 0.7 else "."]
    if rng.random() < 0.15:
        words += [*_sentiment_clause(rng, item, rng.choice([1, -1])), rng.choice(CONNECTORS)]
    state = rng.choice([CLAUSE_START, AFTER_SUBJECT, AFTER_SUBJECT, AFTER_COPULA, AFTER_COPULA])
    if state == CLAUSE_START and not words:
        words += [*_neutral_clause(rng, item), "and"]
    if state != CLAUSE_START:
        words += _subject(rng, item)
    if state == AFTER_COPULA:
        words.append(rng.choice(COPULAS))
    return words, state


def _continuation(rng: random.Random, item: str, state: str, stance: str) -> list[str]:
    """Finish the prompt's clause, maybe add clauses and a second sentence. stance: "positive"|"negative"|"mixed"."""
    sign = rng.choice([1, -1]) if stance == "mixed" else (1 if stance == "positive" else -1)
    if state == AFTER_COPULA:
        words = _predicate(rng, sign)
    elif state == AFTER_SUBJECT:
        words = [rng.choice(COPULAS), *_predicate(rng, sign)]
    else:
        words = _sentiment_clause(rng, item, sign)
    for _ in range(int(rng.random() < 0.45) + int(rng.random() < 0.15)):
        if stance == "mixed" and rng.random() < 0.6:
            sign = -sign
            words.append(rng.choice(CONTRAST_CONNECTORS))
        else:
            words.append(rng.choice(SAME_SIGN_CONNECTORS))
        words += _sentiment_clause(rng, item, sign)
    words.append(".")
    if rng.random() < 0.2:
        words += [*_sentiment_clause(rng, item, sign), "."]
    return words


def _stance(rng: random.Random) -> str:
    return rng.choice(["positive", "positive", "negative", "negative", "mixed"])


def _starts_with_eval_prompt(words: list[str]) -> bool:
    return any(tuple(words[:n]) in _EVAL_WORDS for n in _EVAL_LENGTHS if n <= len(words))


def _sample(rng: random.Random) -> tuple[str, list[str], list[str], str]:
    """(item, prompt words, continuation words, prompt state); never starts with an evaluation prompt."""
    while True:
        item = rng.choice(sorted(ITEMS))
        prompt, state = _opening(rng, item)
        continuation = _continuation(rng, item, state, _stance(rng))
        if not _starts_with_eval_prompt(prompt + continuation):
            return item, prompt, continuation, state


def _as_completion(words: list[str]) -> str:
    return " " + " ".join(words)


class ReviewsTask:
    """Short reviews from a grammar; gold reward = sentiment valence of the continuation (see module docstring)."""

    name = "reviews"
    max_new_tokens = 32

    def pretrain_corpus(self, n: int, seed: int) -> list[str]:
        """Full reviews, e.g. "i bought this phone and the battery was great ."."""
        rng = random.Random(f"reviews/pretrain/{seed}")
        return [
            " ".join(prompt + continuation) for _, prompt, continuation, _ in (_sample(rng) for _ in range(n))
        ]

    def sft_examples(self, n: int, seed: int) -> list[dict]:
        """Prompt and continuation; stances are balanced, so the mean gold reward is near 0."""
        rng = random.Random(f"reviews/sft/{seed}")
        examples = []
        for _ in range(n):
            _, prompt, continuation, _ = _sample(rng)
            examples.append({"prompt": " ".join(prompt), "completion": _as_completion(continuation)})
        return examples

    def train_prompts(self, n: int, seed: int) -> list[str]:
        """Review openings: after a connector, after a subject ("... the battery") or after a copula ("the acting was")."""
        rng = random.Random(f"reviews/prompts/{seed}")
        return [" ".join(prompt) for _, prompt, _, _ in (_sample(rng) for _ in range(n))]

    def eval_prompts(self) -> list[str]:
        """The 16 fixed, sentiment-free openings in EVAL_PROMPTS."""
        return list(EVAL_PROMPTS)

    def gold_reward(self, prompts: list[str], completions: list[str]) -> list[float]:
        return reviews_reward(prompts, completions)

    def is_wellformed(self, prompt: str, completion: str) -> bool:
        return continuation_valence(prompt, completion) is not None

    def constructed_pairs(self, n: int, seed: int) -> list[dict]:
        """Two continuations of one prompt; the more positive is chosen. A fifth of the rejected are malformed
        (cut off mid-review or with a word repeated)."""
        rng = random.Random(f"reviews/pairs/{seed}")
        pairs = []
        while len(pairs) < n:
            item, prompt_words, first, state = _sample(rng)
            prompt = " ".join(prompt_words)
            second = _continuation(rng, item, state, _stance(rng))
            if rng.random() < 0.2:
                second = _malformed(rng, second)
            if _starts_with_eval_prompt(prompt_words + second):
                continue
            a, b = _as_completion(first), _as_completion(second)
            gold_a, gold_b = reviews_reward([prompt, prompt], [a, b])
            if gold_a == gold_b:
                continue
            chosen, rejected = (a, b) if gold_a > gold_b else (b, a)
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        return pairs


def _malformed(rng: random.Random, words: list[str]) -> list[str]:
    """Break a continuation: cut it off before its final "." or repeat one of its words."""
    if rng.random() < 0.5:
        return words[: rng.randrange(1, len(words))]
    k = rng.randrange(len(words))
    return [*words[: k + 1], words[k], *words[k + 1 :]]
