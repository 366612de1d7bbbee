"""The DPO and GRPO stories of issue 13 on a real pretrained chat model (e.g. a converted SmolLM2-135M-Instruct).

    .venv/bin/python benchmarks/real_story.py --model FOLDER [--only dpo|grpo] [--out runs/real_story]
    # more steps: --epochs 10 (DPO), --grpo-steps 60; LoRA arms need rlhflab's --lora-* options

(a) DPO, the seed reproduced: 16 chat pairs built from the `reviews` grammar. The system message asks the model
    to finish a review in the grammar's style, the user message is a review opening; chosen is a positive
    continuation and rejected a negative one (gold valence > 0 / < 0, both well-formed). Arms: batch 1 / β 0.1 /
    lr 5e-5 constant (the seed) against batch 16 / β 0.3, each with full fine-tuning and with LoRA (`--lora-lr`),
    over the same passes (`--epochs`) of the 16 pairs. Reported: the margin trajectory, the final loss and
    accuracy, the step at which `dpo.margin_explosion` fired (diagnostics.jsonl), and on the task's 16 held-out
    openings (rendered the same way; 4 samples each at T 0.7, rlhflab's evaluation suite) before and after:
    - gold: the task's gold reward of the reply (lower-cased, punctuation spaced out as the grammar writes it;
      -4 when the grammar cannot parse it) and the share the grammar parses (well-formed);
    - valence: a sentence-level judge for free text: the mean valence of the grammar's sentiment words in the
      reply, a "not"/"n't"/"never" in the three words before one flipping and halving it (as the grammar does);
      0 without one. A pretrained model's replies rarely parse, so this is the judge that sees sentiment there.
(b) GRPO on arithmetic as chat ("What is 37 + 48?", system "Reply with the number only.") with an exact-answer
    reward (1 when the reply's last number is the answer): the share of zero-std groups (`frac_reward_zero_std`,
    TRL's name) at k 4 / T 0.3 against k 8 / T 1.0, and exact match on the task's 16 held-out sums before and after.

Each arm is the `rlhflab dpo` / `rlhflab grpo` stage as a user runs it (a model folder, a JSONL, --reward-fn);
the results go to OUT/real_story-{dpo,grpo}.json and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from rlhflab.algorithms.dpo import DPOConfig
from rlhflab.algorithms.grpo import GRPOConfig
from rlhflab.diagnostics.findings import read_findings
from rlhflab.evaluation.suite import EvalConfig, evaluate
from rlhflab.models.loading import load_causal_lm, load_tokenizer
from rlhflab.stages.train import dpo, grpo
from rlhflab.tasks.arithmetic import ArithmeticTask
from rlhflab.tasks.reviews import (
    ADJECTIVES,
    MALFORMED_PENALTY,
    NEGATION,
    OPINION_BASES,
    OPINIONS,
    RECOMMEND,
    ReviewsTask,
    reviews_reward,
)
from rlhflab.training.metrics import read_metrics

REVIEW_SYSTEM = ("You finish reviews. Reply with the rest of the review only: lower case, words separated by spaces, "
                 "ending with ' .'.")  # fmt: skip
SUM_SYSTEM = "Reply with the number only."
LEXICON = {**ADJECTIVES, **OPINIONS, **OPINION_BASES, "recommend": RECOMMEND}
NEGATORS = ("not", "never", "n't")
LORA = {"lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05,
        "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}  # fmt: skip
DPO_ARMS = {"batch 1, β 0.1": {"batch_size": 1, "beta": 0.1}, "batch 16, β 0.3": {"batch_size": 16, "beta": 0.3}}
GRPO_ARMS = {"k 4, T 0.3": {"group_size": 4, "temperature": 0.3}, "k 8, T 1.0": {"group_size": 8, "temperature": 1.0}}


def text_of(completion: Any) -> str:
    """A reply's text: a decoded string, or TRL's conversational completion [{"role": "assistant", ...}]."""
    return completion[-1]["content"] if isinstance(completion, list) else completion


def user_text(prompt: Any) -> str:
    return prompt[-1]["content"] if isinstance(prompt, list) else prompt


# ---------------------------------------------------------------------------------------------------------------
# (a) DPO on reviews rendered as chat


def review_chat(opening: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": REVIEW_SYSTEM}, {"role": "user", "content": opening}]


def as_grammar(reply: str) -> str:
    """A free-text reply written as the grammar writes: lower case, "!" as ".", "." a word of its own, no commas."""
    text = reply.lower().replace("!", ".").replace(",", " ")
    return " " + " ".join(re.sub(r"\.", " . ", text).split())


def review_gold(prompts: list[Any], replies: list[Any]) -> list[float]:
    """The reviews gold reward of each reply to its opening (-4 when the grammar cannot parse it)."""
    return reviews_reward([user_text(p) for p in prompts], [as_grammar(text_of(r)) for r in replies])


def review_valence(prompts: list[Any], replies: list[Any]) -> list[float]:
    """Mean valence of the grammar's sentiment words in each reply (negated ones × NEGATION); 0 without one."""
    scores = []
    for reply in replies:
        words = re.findall(r"[a-z]+|n't", text_of(reply).lower())
        values = [LEXICON[w] * (NEGATION if any(x in NEGATORS for x in words[max(0, i - 3) : i]) else 1.0)
                  for i, w in enumerate(words) if w in LEXICON]  # fmt: skip
        scores.append(sum(values) / len(values) if values else 0.0)
    return scores


def review_pairs(path: Path, n: int) -> None:
    """`n` chat pairs: chosen a positive continuation of the opening, rejected a negative one, both well-formed."""
    rows = []
    for pair in ReviewsTask().constructed_pairs(50 * n, seed=0):
        chosen, rejected = reviews_reward([pair["prompt"]] * 2, [pair["chosen"], pair["rejected"]])
        if chosen > 0 > rejected and len(rows) < n:
            rows.append({"prompt": review_chat(pair["prompt"]),
                         "chosen": [{"role": "assistant", "content": pair["chosen"].strip()}],
                         "rejected": [{"role": "assistant", "content": pair["rejected"].strip()}]})  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def judge_reviews(model_dir: str, args: argparse.Namespace) -> dict[str, float]:
    """Gold, well-formed share and valence on the 16 held-out openings, 4 samples each at T 0.7."""
    prompts = [review_chat(p) for p in ReviewsTask().eval_prompts()]
    valence: list[float] = []

    def gold(prompts: list[Any], replies: list[str]) -> list[float]:  # the suite calls this once per temperature
        valence.extend(review_valence(prompts, replies))
        return review_gold(prompts, replies)

    wellformed = lambda p, c: review_gold([p], [c])[0] > MALFORMED_PENALTY  # noqa: E731
    aggregate = suite(model_dir, prompts, gold, args, temperature=0.7, max_new_tokens=32, wellformed=wellformed)
    return {"gold": aggregate["gold"]["mean"], "wellformed": 1 - aggregate["malformed"]["mean"],
            "valence": sum(valence) / len(valence)}  # fmt: skip


def suite(model_dir: str, prompts: list[Any], gold, args: argparse.Namespace, temperature: float,
          max_new_tokens: int, wellformed=None) -> dict[str, Any]:  # fmt: skip
    """rlhflab's evaluation suite (fixed seeds, so every model sees the same random stream) with `gold` as the judge."""
    settings = EvalConfig(temperatures=[temperature], samples_per_prompt=args.samples, max_new_tokens=max_new_tokens)
    results = evaluate(load_causal_lm(model_dir), load_tokenizer(model_dir), prompts, settings, gold_reward=gold,
                       is_wellformed=wellformed)  # fmt: skip
    return results["temperatures"][f"{temperature:g}"]["aggregate"]


def dpo_arm(out: Path, data: Path, overrides: dict[str, Any], lora: bool, args: argparse.Namespace) -> dict[str, Any]:
    cfg = DPOConfig(model=args.model, data=str(data), out=str(out), lr=args.lora_lr if lora else args.lr,
                    lr_schedule="constant", warmup_ratio=0.0, eval_fraction=0.0, eval_temperatures=[],
                    share_reference_cache=False, max_prompt_tokens=128, max_completion_tokens=64, threads=1,
                    progress=False, max_steps=args.pairs * args.epochs // overrides["batch_size"], **overrides)  # fmt: skip
    if lora:
        cfg = replace(cfg, **LORA)  # a TypeError here: this rlhflab has no LoRA options yet
    path = dpo(cfg)
    rows = [r for r in read_metrics(out) if "rewards/margins" in r]
    every = max(1, len(rows) // 8)
    explosions = [f.step for f in read_findings(out / "diagnostics.jsonl") if f.code == "dpo.margin_explosion"]
    return {"steps": len(rows),
            "margins": {r["step"]: round(r["rewards/margins"], 2) for r in rows[every - 1 :: every]},
            "max margin": max(r["rewards/margins"] for r in rows), "final loss": rows[-1]["loss"],
            "final accuracy": rows[-1]["rewards/accuracies"],
            "margin_explosion at step": explosions[0] if explosions else None,
            **{f"held-out {k}": v for k, v in judge_reviews(str(path), args).items()}}  # fmt: skip


def story_dpo(args: argparse.Namespace) -> dict[str, Any]:
    data = args.out / f"review-pairs-{args.pairs}.jsonl"
    review_pairs(data, args.pairs)
    result = {"starting model": {f"held-out {k}": v for k, v in judge_reviews(args.model, args).items()}}
    for name, overrides in DPO_ARMS.items():
        for tuning in args.tuning.split(","):
            arm = f"{name}, {tuning}"
            out = args.out / ("dpo-" + re.sub(r"[^a-z0-9]+", "-", arm.replace("β", "beta")).strip("-"))
            result[arm] = dpo_arm(out, data, overrides, tuning == "lora", args)
            print(arm, json.dumps(result[arm]), flush=True)
    return result


# ---------------------------------------------------------------------------------------------------------------
# (b) GRPO on arithmetic rendered as chat


def sum_chat(prompt: str) -> list[dict[str, str]]:
    """"37+48=" as a question."""
    a, b = prompt.rstrip("=").split("+")
    return [{"role": "system", "content": SUM_SYSTEM}, {"role": "user", "content": f"What is {a} + {b}?"}]


def answer_of(prompt: Any) -> str:
    a, b = re.findall(r"\d+", user_text(prompt))[:2]
    return str(int(a) + int(b))


def exact_answer(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
    """1.0 when the reply's last number is exactly the sum the question asks for, else 0.0 (TRL's conventions)."""
    rewards = []
    for prompt, completion in zip(prompts, completions, strict=True):
        numbers = re.findall(r"\d+", text_of(completion))
        rewards.append(1.0 if numbers and numbers[-1] == answer_of(prompt) else 0.0)
    return rewards


def exact_match(model_dir: str, args: argparse.Namespace) -> float:
    """Mean exact-answer reward on the task's 16 held-out sums, 4 samples each at T 0.3."""
    prompts = [sum_chat(p) for p in ArithmeticTask().eval_prompts()]
    return suite(model_dir, prompts, exact_answer, args, temperature=0.3, max_new_tokens=args.new_tokens)["gold"]["mean"]


def story_grpo(args: argparse.Namespace) -> dict[str, Any]:
    data = args.out / "sum-prompts.jsonl"
    prompts = ArithmeticTask().train_prompts(args.grpo_steps * args.grpo_batch, seed=0)
    data.write_text("".join(json.dumps({"prompt": sum_chat(p)}) + "\n" for p in prompts))
    result: dict[str, Any] = {"starting model": {"held-out exact match": exact_match(args.model, args)}}
    for name, overrides in GRPO_ARMS.items():
        out = args.out / f"grpo-k{overrides['group_size']}-t{overrides['temperature']}"
        path = grpo(GRPOConfig(model=args.model, data=str(data), out=str(out), reward_fn=f"{Path(__file__).resolve()}:exact_answer",
                               max_steps=args.grpo_steps, batch_size=args.grpo_batch, max_new_tokens=args.new_tokens,
                               lr=args.grpo_lr, eval_temperatures=[], threads=1, progress=False, **overrides))  # fmt: skip
        rows = [r for r in read_metrics(out) if "frac_reward_zero_std" in r]
        findings = read_findings(out / "diagnostics.jsonl")
        result[name] = {"steps": len(rows),
                        "frac_reward_zero_std (mean)": sum(r["frac_reward_zero_std"] for r in rows) / len(rows),
                        "reward (first 5 steps)": sum(r["reward"] for r in rows[:5]) / len(rows[:5]),
                        "reward (last 5 steps)": sum(r["reward"] for r in rows[-5:]) / len(rows[-5:]),
                        "grpo.zero_std_groups findings": sum(f.code == "grpo.zero_std_groups" for f in findings),
                        "held-out exact match": exact_match(str(path), args)}  # fmt: skip
        print(name, json.dumps(result[name]), flush=True)
    return result


def markdown(result: dict[str, dict[str, Any]]) -> str:
    keys = list(dict.fromkeys(k for row in result.values() for k in row))
    cell = lambda v: f"{v:.3g}" if isinstance(v, float) else "–" if v is None else str(v)  # noqa: E731
    lines = ["| arm | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {arm} | " + " | ".join(cell(row.get(k)) for k in keys) + " |" for arm, row in result.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a model folder with a chat template")
    parser.add_argument("--out", type=Path, default=Path("runs/real_story"))
    parser.add_argument("--only", choices=["dpo", "grpo"], default=None)
    parser.add_argument("--samples", type=int, default=4, help="evaluation samples per held-out prompt")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3, help="passes over the pairs (batch 1: pairs × epochs steps)")
    parser.add_argument("--lr", type=float, default=5e-5, help="DPO, full fine-tuning")
    parser.add_argument("--lora-lr", type=float, default=5e-4,
                        help="DPO with LoRA: adapters start at zero and are low-rank, so ~10× full fine-tuning's")
    parser.add_argument("--tuning", default="full,lora", help="full, lora or both (comma-separated)")
    parser.add_argument("--grpo-steps", type=int, default=20)
    parser.add_argument("--grpo-batch", type=int, default=4, help="prompts per GRPO step")
    parser.add_argument("--grpo-lr", type=float, default=1e-5)
    parser.add_argument("--new-tokens", type=int, default=16, help="GRPO completion budget")
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    for story, run in (("dpo", story_dpo), ("grpo", story_grpo)):
        if args.only in (None, story):
            result = run(args)
            (args.out / f"real_story-{story}.json").write_text(json.dumps(result, indent=1))
            print(f"\n{story}:\n{markdown(result)}\n", flush=True)


if __name__ == "__main__":
    main()
