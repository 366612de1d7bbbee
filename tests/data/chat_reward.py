"""Reward functions for tests/data/chat_prompts.jsonl, in TRL's conventions: conversational completions arrive as
[{"role": "assistant", "content": text}], the records' `answer` field as a keyword argument."""


def contains_answer(completions, answer, **kwargs):
    """1 when the completion's text contains the record's answer, else 0."""
    return [float(want in completion[0]["content"]) for completion, want in zip(completions, answer, strict=True)]


def brevity(completions, **kwargs):
    """Shorter is better: 1 for an empty answer, falling linearly to 0 at 200 characters."""
    return [max(0.0, 1.0 - len(completion[0]["content"]) / 200) for completion in completions]
