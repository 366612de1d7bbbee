"""Reproduce the RL stories of issue 4 on the built-in tasks (numbers go to docs/notes_rl.md).

    (a) GRPO on arithmetic (exact-match reward): k = 4 at temperature 0.3 vs k = 8 at temperature 1.0 —
        share of zero-std groups, `grpo.zero_std_groups` findings, gold exact-match on the 16 eval prompts.
    (b) PPO on reviews with the task's reward model: kl_coef 0.01 vs 0.1 — final KL to the reference.
    (c) PPO and GRPO (reward model) raise the reviews gold reward over SFT on the 16 eval prompts;
        GRPO raises arithmetic exact-match (from (a)).

    .venv/bin/python benchmarks/rl_story.py [--size tiny] [--steps 40] [--out runs/rl_story] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from rlhflab.algorithms.grpo import GRPOConfig
from rlhflab.algorithms.ppo import PPOConfig
from rlhflab.diagnostics.findings import read_findings
from rlhflab.stages.evaluate import EvalCommandConfig, evaluate_model
from rlhflab.stages.train import grpo, ppo
from rlhflab.training.metrics import read_metrics


def gold_at(model: str | None, task: str, args, out: Path) -> dict[str, float]:
    """Gold reward (mean and 95% CI) on the task's 16 eval prompts, 8 samples each, per temperature."""
    results = evaluate_model(EvalCommandConfig(out=str(out), task=task, task_size=args.size, model=model,
                                              cache_dir=args.cache_dir, temperatures=[0.7, 1.0], threads=1, progress=False))
    return {t: round(block["aggregate"]["gold"]["mean"], 3) for t, block in results["temperatures"].items()}


def tail_mean(rows: list[dict], key: str, n: int = 5) -> float:
    values = [float(r[key]) for r in rows[-n:]]
    return round(sum(values) / len(values), 4)


def common(args, name: str) -> dict:
    return {"out": str(args.out / name), "task_size": args.size, "cache_dir": args.cache_dir, "threads": 1,
            "progress": False, "max_steps": args.steps, "eval_temperatures": []}  # gold_at evaluates


def story_a(args) -> dict:
    rows = {}
    for k, temperature in ((4, 0.3), (8, 1.0)):
        name = f"grpo-arith-k{k}-t{temperature}"
        # the 0.86M arithmetic model needs a far smaller lr than reviews: at 1e-4 exact match falls (docs/notes_rl.md)
        cfg = GRPOConfig(task="arithmetic", reward_fn="rlhflab.tasks:arithmetic_reward", group_size=k,
                         temperature=temperature, batch_size=8, **{**common(args, name), "lr": args.arith_lr,
                                                                   "max_steps": args.arith_steps})
        path = grpo(cfg)
        metrics = read_metrics(args.out / name)
        rows[name] = {
            "frac_reward_zero_std (mean over run)": round(sum(m["frac_reward_zero_std"] for m in metrics) / len(metrics), 3),
            "zero_std findings": sum(f.code == "grpo.zero_std_groups" for f in read_findings(args.out / name / "diagnostics.jsonl")),
            "train reward (last 5 steps)": tail_mean(metrics, "reward"),
            "eval exact-match": gold_at(str(path), "arithmetic", args, args.out / f"{name}-eval"),
        }
    rows["sft"] = {"eval exact-match": gold_at(None, "arithmetic", args, args.out / "sft-arith-eval")}
    return rows


def story_bc(args) -> dict:
    rows = {"sft": {"eval gold": gold_at(None, "reviews", args, args.out / "sft-reviews-eval")}}
    for kl_coef in (0.01, 0.1):
        name = f"ppo-reviews-kl{kl_coef}"
        path = ppo(PPOConfig(task="reviews", kl_coef=kl_coef, batch_size=16, lr=args.ppo_lr, **common(args, name)))
        metrics = read_metrics(args.out / name)
        rows[name] = {"objective/kl (last 5)": tail_mean(metrics, "objective/kl"),
                      "reward (last 5)": tail_mean(metrics, "reward"),
                      "train gold (last 5)": tail_mean(metrics, "gold/reward"),
                      "eval gold": gold_at(str(path), "reviews", args, args.out / f"{name}-eval")}
    name = "grpo-reviews-rm"
    path = grpo(GRPOConfig(task="reviews", batch_size=8, lr=args.grpo_lr, **common(args, name)))
    metrics = read_metrics(args.out / name)
    rows[name] = {"kl (last 5)": tail_mean(metrics, "kl"), "reward (last 5)": tail_mean(metrics, "reward"),
                  "train gold (last 5)": tail_mean(metrics, "gold/reward"),
                  "eval gold": gold_at(str(path), "reviews", args, args.out / f"{name}-eval")}
    return rows


def story_c_gold(args) -> dict:
    """(c) with the task's gold reward as the reward function (no learned proxy to over-optimise)."""
    rows = {}
    gold_fn = "rlhflab.tasks:reviews_reward"
    for name, run in (
        ("ppo-reviews-gold", lambda c: ppo(PPOConfig(task="reviews", reward_fn=gold_fn, value_init="policy",
                                                     batch_size=16, lr=args.ppo_lr, **c))),
        ("grpo-reviews-gold", lambda c: grpo(GRPOConfig(task="reviews", reward_fn=gold_fn, batch_size=8,
                                                        lr=args.grpo_lr, **c))),
    ):
        path = run(common(args, name))
        metrics = read_metrics(args.out / name)
        rows[name] = {"train gold (first 5)": round(sum(m["gold/reward"] for m in metrics[:5]) / 5, 4),
                      "train gold (last 5)": tail_mean(metrics, "gold/reward"),
                      "eval gold": gold_at(str(path), "reviews", args, args.out / f"{name}-eval")}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--grpo-lr", type=float, default=1e-4)
    parser.add_argument("--ppo-lr", type=float, default=5e-5)
    parser.add_argument("--arith-lr", type=float, default=1e-5)
    parser.add_argument("--arith-steps", type=int, default=150)
    parser.add_argument("--out", type=Path, default=Path("runs/rl_story"))
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--only", choices=["a", "bc", "c"], default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = {}
    if args.only in (None, "bc"):
        result["reviews (b, c)"] = story_bc(args)
    if args.only in (None, "c"):
        result["reviews, gold reward fn (c)"] = story_c_gold(args)
    if args.only in (None, "a"):
        result["arithmetic (a, c)"] = story_a(args)
    print(json.dumps(result, indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"story-{args.only or 'all'}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
