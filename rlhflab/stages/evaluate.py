"""The evaluation suite as a command (`rlhflab eval`) and as the one ending of every policy-training command.

Both load the models from folders and call `evaluation.suite.evaluate` through `run_suite`, so a model
evaluated after training and one evaluated later by `rlhflab eval` are measured by the same code.

The gold column is a built-in task's exact reward, or, for your own model and data, a reward function
(`--reward-fn FILE.py:NAME`, TRL's conventions, as GRPO calls it; the prompt file's other fields reach it as
keyword arguments). `eval` takes `--reward-fn` before the task's; the training commands (PPO/GRPO with
`--reward-fn`) and `study` use theirs when there is no task. eval.json names it under "gold".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from rlhflab.algorithms.rewards import load_reward_fns, reward_fns_as_gold, short_spec
from rlhflab.config import RunConfig, TaskConfig, opt
from rlhflab.data.loading import load_prompts
from rlhflab.errors import InputError
from rlhflab.evaluation import suite
from rlhflab.models.loading import load_causal_lm, load_scalar_model, load_tokenizer
from rlhflab.models.scoring import RewardFn
from rlhflab.stages import artefacts
from rlhflab.tasks import get_task
from rlhflab.tasks.base import Task

console = Console(stderr=True)


@dataclass
class EvalCommandConfig(TaskConfig):
    """`rlhflab eval`: the shared evaluation suite on one model."""

    out: str = opt("runs/eval", "eval.json goes here")
    model: str | None = opt(None, "the policy to evaluate (default: the task's SFT model)")
    reference: str | None = opt(None, "reference for the KL (default: the task's SFT model)")
    reward_model: str | None = opt(None, "reward model folder (default: the task's reward model)")
    reward_fn: str | None = opt(
        None, "FILE.py:NAME or package.module:NAME (several: comma-separated): the gold reward, as GRPO calls it; "
              "default: the task's")
    reward_weights: list[float] | None = opt(None, "one per reward function (the gold is their weighted sum)")
    data: str | None = opt(None, "prompt-only file instead of the task's evaluation prompts")
    temperatures: list[float] = opt([0.3, 0.7, 1.0], "sampling temperatures", minimum=0.0)
    samples_per_prompt: int = opt(8, "samples per prompt and temperature", minimum=1)
    max_new_tokens: int | None = opt(None, "completion budget (default: the task's, else 256)", minimum=1)
    seed: int = opt(1234, "sampling seed: the same for every model, so comparisons are paired", minimum=0)
    threads: int = opt(0, "torch threads; 0: all cores", minimum=0)
    trust_remote_code: bool = opt(False, "allow custom model code from a model folder / hub id")
    progress: bool = opt(True, "rich progress bar")


def evaluation_prompts(data: str | None, task: Task | None) -> tuple[list[Any] | None, dict[str, list[Any]]]:
    """(prompts, their other fields {name: one value per prompt}) of a prompt-only file, else the task's 16
    evaluation prompts (no fields), else (None, {})."""
    if data:
        examples = load_prompts(data)
        names = dict.fromkeys(name for ex in examples for name in ex.extra)  # first-seen order
        return [ex.prompt for ex in examples], {name: [ex.extra.get(name) for ex in examples] for name in names}
    return (task.eval_prompts() if task else None), {}


def gold_source(task: str | None, reward_fn: str | None) -> str | None:
    """What the gold column is, as eval.json and study.json name it: the reward function(s), else the task's."""
    if reward_fn:
        return f"reward function {short_spec(reward_fn)}"
    return f"task {task}" if task else None


def gold_reward(task: Task | None, reward_fn: str | None, weights: list[float] | None, prompts: list[Any],
                columns: dict[str, list[Any]]) -> RewardFn | None:
    """The reward function(s) `reward_fn` as the gold reward when given, else the task's gold reward, else None."""
    if reward_fn:
        return reward_fns_as_gold(load_reward_fns(reward_fn), weights, prompts, columns)
    return task.gold_reward if task else None


def run_suite(policy: str, prompts: list[Any], settings: suite.EvalConfig, task: Task | None, *,
              reference: str | None, reward_model: str | None, trust_remote_code: bool = False,
              gold: RewardFn | None = None, gold_name: str | None = None) -> dict[str, Any]:
    """Load the models from their folders and run the evaluation suite; the results name the policy and, under
    "gold", what the gold column is. `gold`: the gold reward (default: the task's)."""
    results = suite.evaluate(
        load_causal_lm(policy, trust_remote_code), load_tokenizer(policy, trust_remote_code), prompts, settings,
        reward_model=load_scalar_model(reward_model) if reward_model else None,
        gold_reward=gold or (task.gold_reward if task else None),
        is_wellformed=task.is_wellformed if task else None,
        reference=load_causal_lm(reference) if reference else None,
    )  # fmt: skip
    results["model"] = policy
    if gold_name or task:
        results["gold"] = gold_name or gold_source(task.name, None)
    return results


def write_eval(out: Path, results: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(results, indent=1))
    print_eval(results, results["model"])
    console.print(f"evaluation: {out / 'eval.json'}")
    return out / "eval.json"


# Generated tokens when a command sets none and runs no built-in task: a chat model's answer (TRL's GRPO default
# max_completion_length); a task's answers are a few tokens (Task.max_new_tokens).
CHAT_COMPLETION_BUDGET = 256


def completion_budget(task: Task | None) -> int:
    """Completion tokens when a command does not set them: the task's budget, else CHAT_COMPLETION_BUDGET."""
    return task.max_new_tokens if task else CHAT_COMPLETION_BUDGET


def evaluate_model(cfg: EvalCommandConfig) -> dict[str, Any]:
    """`rlhflab eval`: the policy (default: the task's SFT model) against the task's SFT reference."""
    from rlhflab.training.loop import set_threads

    set_threads(cfg.threads)
    task = get_task(cfg.task) if cfg.task else None
    cached = artefacts.TaskArtefacts.of(cfg) if task else None
    prompts, columns = evaluation_prompts(cfg.data, task)
    if prompts is None:
        raise InputError("give --task or --data (a prompt-only file)", field="data")
    gold = gold_reward(task, cfg.reward_fn, cfg.reward_weights, prompts, columns)  # a bad spec fails before sampling
    if cfg.model is None and cached is None:
        raise InputError("give --model, or --task reviews|arithmetic", field="model")
    policy = artefacts.model_folder(cfg.model, cfg.cache_dir) if cfg.model else str(artefacts.sft_model(cached))
    if cfg.reference:
        reference = artefacts.model_folder(cfg.reference, cfg.cache_dir)
    else:
        reference = str(artefacts.sft_model(cached)) if cached else None
    reward_model = cfg.reward_model or (str(artefacts.reward_model(cached)) if cached else None)
    settings = suite.EvalConfig(temperatures=cfg.temperatures, samples_per_prompt=cfg.samples_per_prompt,
                                seed=cfg.seed, max_new_tokens=cfg.max_new_tokens or completion_budget(task))
    results = run_suite(policy, prompts, settings, task, reference=reference, reward_model=reward_model,
                        trust_remote_code=cfg.trust_remote_code, gold=gold,
                        gold_name=gold_source(cfg.task, cfg.reward_fn))
    write_eval(Path(cfg.out), results)
    return results


def evaluate_final_model(cfg: RunConfig, policy: Path, *, reference: str, max_new_tokens: int | None = None,
                         reward_model: str | None = None, reward_fn: str | None = None,
                         reward_weights: list[float] | None = None) -> dict[str, Any] | None:
    """The end of sft, dpo, ppo and grpo: with evaluation prompts (the task's or --eval-prompts) and
    --eval-temperatures, the suite on the final model against the starting one, into OUT/eval.json.

    `max_new_tokens`: the run's completion budget (PPO/GRPO), else `completion_budget`. The reward model is
    the run's own (PPO/GRPO); no reward model is built for an evaluation. The gold reward is the task's;
    without a task, the run's reward function(s) `reward_fn` (PPO/GRPO), summed with `reward_weights`."""
    task = get_task(cfg.task) if cfg.task else None
    prompts, columns = evaluation_prompts(cfg.eval_prompts, task)
    if prompts is None or not cfg.eval_temperatures:
        return None
    settings = suite.EvalConfig(temperatures=cfg.eval_temperatures, samples_per_prompt=cfg.eval_samples_per_prompt,
                                max_new_tokens=max_new_tokens or completion_budget(task))
    gold_fn = None if task else reward_fn
    results = run_suite(str(policy), prompts, settings, task, reference=reference, reward_model=reward_model,
                        trust_remote_code=cfg.trust_remote_code,
                        gold=gold_reward(task, gold_fn, reward_weights, prompts, columns),
                        gold_name=gold_source(cfg.task, gold_fn))
    write_eval(Path(cfg.out), results)
    return results


def print_eval(results: dict[str, Any], title: str) -> None:
    table = Table(title=title)
    for column in ("temperature", "metric", "mean [95% CI]"):
        table.add_column(column)
    for row in suite.format_table(results):
        table.add_row(*row)
    Console().print(table)
