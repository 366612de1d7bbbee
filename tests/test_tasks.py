"""Built-in tasks: determinism, held-out evaluation prompts, and gold rewards checked against independent references.

The references here are written separately from the task code: hand-computed valences for hand-written reviews, a
second valence scorer that reads sentiment words and the two words before them (instead of parsing), and Python's
own integer addition for arithmetic.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhflab.errors import InputError
from rlhflab.tasks import TASKS, Task, arithmetic_reward, get_task, reviews_reward
from rlhflab.tasks import reviews as rv

PENALTY = -4.0
ALL_TASKS = ["reviews", "arithmetic"]


@pytest.fixture(scope="module")
def review_sft() -> list[dict]:
    return get_task("reviews").sft_examples(3000, seed=0)


# ---------------------------------------------------------------------------------------------------- the registry


def test_get_task_and_registry():
    assert sorted(TASKS) == ["arithmetic", "reviews"]
    for name in ALL_TASKS:
        task = get_task(name)
        assert isinstance(task, Task)
        assert task.name == name
        assert task.max_new_tokens > 0
    with pytest.raises(InputError, match="arithmetic, reviews"):
        get_task("sentiment")


@pytest.mark.parametrize("name", ALL_TASKS)
def test_generators_are_deterministic_in_the_seed(name):
    task = get_task(name)
    for method in (task.pretrain_corpus, task.sft_examples, task.train_prompts, task.constructed_pairs):
        assert method(50, seed=3) == method(50, seed=3)
        assert method(50, seed=3) != method(50, seed=4)
        assert len(method(7, seed=0)) == 7


@pytest.mark.parametrize("name", ALL_TASKS)
def test_eval_prompts_are_16_fixed_and_never_generated(name):
    task = get_task(name)
    evals = task.eval_prompts()
    assert len(evals) == 16 == len(set(evals))
    assert evals == task.eval_prompts()
    n = 3000
    sft, pairs = task.sft_examples(n, seed=1), task.constructed_pairs(n, seed=2)
    generated = (
        set(task.train_prompts(n, seed=0)) | {ex["prompt"] for ex in sft} | {p["prompt"] for p in pairs}
    )
    assert not generated & set(evals)
    # No generated text even starts with an evaluation prompt: documents, prompts, prompt + completion.
    separator = " " if name == "reviews" else ""
    texts = (
        task.pretrain_corpus(n, seed=3) + sorted(generated) + [ex["prompt"] + ex["completion"] for ex in sft]
    )
    texts += [p["prompt"] + p[key] for p in pairs for key in ("chosen", "rejected")]
    assert not [t for t in texts for p in evals if t == p or t.startswith(p + separator)]


# ---------------------------------------------------------------------------------------------------- reviews


@pytest.mark.parametrize(
    "prompt, completion, expected",
    [
        ("the acting was", " great .", 2.0),
        ("the acting was", " great . i loved it .", 2.0),  # mean of 2 and 2
        ("the acting was", " not great .", -1.0),  # negation: x -0.5
        ("the acting was not", " great .", -1.0),  # "not" in the prompt still applies
        ("the acting was", " not bad .", 0.5),
        ("the acting was", " very good .", 1.5),  # intensifier x1.5
        ("the acting was", " extremely awful .", -3.0),  # the worst a clause can be
        ("the acting was", " pretty good .", 0.5),  # downtoner x0.5
        ("the acting was", " not very good .", -0.75),
        (
            "the plot was great but the acting",
            " was awful .",
            -2.0,
        ),  # prompt's clause is not the completion's
        ("the plot was great but the acting was", " awful .", -2.0),
        (
            "i bought this phone and",
            " the battery is good but the screen was terrible .",
            -0.5,
        ),  # (1 - 2) / 2
        ("i bought this phone and", " i really loved it .", 3.0),
        ("i bought this phone and", " i did not like it .", -0.5),
        ("i bought this phone and", " i did not hate it .", 1.0),
        ("i bought this phone and", " i would not recommend it .", -1.0),
        ("i bought this phone and", " i would recommend it because it is good .", 1.5),
        ("i bought this phone and", " i liked it . the price was fine . it is bad .", 1.0 / 3.0),
        ("i bought this phone", " last week .", 0.0),  # well-formed, no sentiment of its own
        ("the acting was great", " .", 0.0),
        ("the acting was", "great .", 2.0),  # no leading space: prompt and completion are split separately
        ("the acting  was", "  great.", 2.0),  # any whitespace; "great." reads as "great ."
    ],
)
def test_review_valence_hand_computed(prompt, completion, expected):
    assert reviews_reward([prompt], [completion]) == [pytest.approx(expected, abs=1e-12)]
    assert get_task("reviews").is_wellformed(prompt, completion)


@pytest.mark.parametrize(
    "prompt, completion",
    [
        ("the acting was", ""),  # empty
        ("the acting was", "   "),
        ("the acting was", " great"),  # no final "."
        ("the acting was", " great and the plot ."),  # clause cut off
        ("the acting was", " great and the plot was ."),
        ("the acting was", " very ."),
        ("the acting was", " superlative ."),  # unknown word
        ("the acting was", " Great ."),  # the grammar is lower case
        ("the acting was", " great . ."),  # empty sentence
        ("the acting was", " great great ."),
        ("the acting was", " 😀 ñ 字 ."),
        ("the acting was", "\x00\n\t"),
        ("", ""),
        ("", " ."),
        ("not a review", " great ."),
        ("i did", " like it ."),  # "did" needs "not"
        ("i would", " not recommend ."),
    ],
)
def test_review_malformed_scores_the_penalty(prompt, completion):
    assert reviews_reward([prompt], [completion]) == [PENALTY]
    assert not get_task("reviews").is_wellformed(prompt, completion)


def test_reward_length_mismatch_is_an_input_error():
    with pytest.raises(InputError):
        reviews_reward(["the acting was"], [])
    with pytest.raises(InputError):
        arithmetic_reward([], ["1"])


def reference_valence(prompt: str, completion: str) -> float:
    """Independent scorer for generated text: each sentiment word scaled by an intensifier right before it and
    by -0.5 when "not" is among the two words before it; mean over the completion's sentiment words."""
    words = prompt.split() + completion.split()
    base = {**rv.ADJECTIVES, **rv.OPINIONS, **rv.OPINION_BASES, "recommend": 2.0}
    values = []
    for i in range(len(prompt.split()), len(words)):
        if words[i] not in base:
            continue
        value = base[words[i]] * {"very": 1.5, "really": 1.5, "extremely": 1.5}.get(words[i - 1], 1.0)
        value *= {"pretty": 0.5, "fairly": 0.5, "somewhat": 0.5}.get(words[i - 1], 1.0)
        if "not" in words[max(0, i - 2) : i]:
            value *= -0.5
        values.append(value)
    return sum(values) / len(values) if values else 0.0


def test_review_lexicon_values():
    assert (rv.ADJECTIVES["great"], rv.ADJECTIVES["good"], rv.ADJECTIVES["bad"], rv.ADJECTIVES["awful"]) == (
        2.0,
        1.0,
        -1.0,
        -2.0,
    )
    assert sum(rv.ADJECTIVES.values()) == 0 and sum(rv.OPINIONS.values()) == 0  # no built-in bias
    assert 100 <= len(rv.vocabulary()) <= 150


def test_review_sft_completions_wellformed_and_match_reference(review_sft):
    task = get_task("reviews")
    prompts = [ex["prompt"] for ex in review_sft]
    completions = [ex["completion"] for ex in review_sft]
    rewards = task.gold_reward(prompts, completions)
    for prompt, completion, reward in zip(prompts, completions, rewards, strict=True):
        assert completion.startswith(" ") and not prompt.endswith(" ") and completion.endswith(" .")
        assert task.is_wellformed(prompt, completion), (prompt, completion)
        assert reward == pytest.approx(reference_valence(prompt, completion), abs=1e-12), (prompt, completion)
    mean = sum(rewards) / len(rewards)
    assert abs(mean) < 0.15  # balanced, so preference / RL training has something to improve
    assert min(rewards) >= -3 and max(rewards) <= 3
    assert sum(r > 0 for r in rewards) > 0.35 * len(rewards) and sum(r < 0 for r in rewards) > 0.35 * len(
        rewards
    )
    lengths = sorted(len(c.split()) for c in completions)
    assert lengths[len(lengths) // 2] <= 12 and max(lengths) <= 26


def test_review_pretraining_documents_parse_and_are_diverse():
    docs = get_task("reviews").pretrain_corpus(20000, seed=0)
    assert all(rv.parse_review(doc.split()) is not None for doc in docs[:1000])
    assert len(set(docs)) > 19000  # nearly every review is new: tens of thousands of distinct reviews
    assert {w for doc in docs for w in doc.split()} <= rv.vocabulary()
    prompts = get_task("reviews").train_prompts(5000, seed=0)
    assert len(set(prompts)) > 1000


def test_review_eval_prompts_leave_room_for_either_sentiment():
    task = get_task("reviews")
    sentiment_words = set(rv.ADJECTIVES) | set(rv.OPINIONS) | set(rv.OPINION_BASES) | {"recommend", "not"}
    for prompt in task.eval_prompts():
        assert not set(prompt.split()) & sentiment_words
        endings = [" great .", " is great .", " the battery is great ."]
        positive = next(c for c in endings if task.is_wellformed(prompt, c))
        negative = positive.replace("great", "awful")
        assert task.gold_reward([prompt, prompt], [positive, negative]) == [2.0, -2.0]


def test_review_constructed_pairs_prefer_the_more_positive():
    task = get_task("reviews")
    pairs = task.constructed_pairs(500, seed=0)
    chosen = task.gold_reward([p["prompt"] for p in pairs], [p["chosen"] for p in pairs])
    rejected = task.gold_reward([p["prompt"] for p in pairs], [p["rejected"] for p in pairs])
    assert all(c > r for c, r in zip(chosen, rejected, strict=True))
    assert all(task.is_wellformed(p["prompt"], p["chosen"]) for p in pairs)
    assert 0.05 < sum(r == PENALTY for r in rejected) / len(pairs) < 0.35  # some rejected are malformed


# ---------------------------------------------------------------------------------------------------- arithmetic


def test_arithmetic_reward_is_exact_match():
    prompts = ["37+48="] * 7 + ["5+4=", "99+1=", "not a sum", ""]
    completions = ["85", " 85 ", "8 5", "84", "085", "85.0", "", "9", "100", "85", "1"]
    assert arithmetic_reward(prompts, completions) == [1, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0]


def test_arithmetic_generated_data_is_correct():
    task = get_task("arithmetic")
    for ex in task.sft_examples(2000, seed=0):
        a, b = ex["prompt"].removesuffix("=").split("+")
        assert ex["completion"] == str(int(a) + int(b))
        assert int(a) <= 99 and int(b) <= 99 and task.is_wellformed(ex["prompt"], ex["completion"])
    for doc in task.pretrain_corpus(500, seed=0):
        left, right = doc.split("=")
        assert sum(map(int, left.split("+"))) == int(right)
    pairs = task.constructed_pairs(500, seed=0)
    assert all(task.gold_reward([p["prompt"]] * 2, [p["chosen"], p["rejected"]]) == [1.0, 0.0] for p in pairs)
    assert all(task.is_wellformed(p["prompt"], p["rejected"]) for p in pairs)
    assert task.gold_reward(task.eval_prompts(), ["0"] * 16) == [0.0] * 16
    assert (
        not task.is_wellformed("1+1=", "two")
        and not task.is_wellformed("1+1=", "")
        and not task.is_wellformed("1+1=", "٣")
    )
    assert task.is_wellformed("1+1=", " 2 ") and task.is_wellformed("9+9=", "1 8")  # spacing as in the reward


# ---------------------------------------------------------------------------------------------------- never raises


@pytest.mark.parametrize("name", ALL_TASKS)
@settings(max_examples=100, deadline=None)
@given(prompt=st.text(max_size=40), completion=st.text(max_size=40))
def test_gold_reward_never_raises(name, prompt, completion):
    task = get_task(name)
    for p in (prompt, task.eval_prompts()[0]):
        [reward] = task.gold_reward([p], [completion])
        assert isinstance(reward, float)
        assert isinstance(task.is_wellformed(p, completion), bool)
    assert task.gold_reward([prompt], [task.eval_prompts()[0] + "9 " * 3000]) in ([0.0], [PENALTY])
