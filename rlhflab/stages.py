"""What each CLI command runs: resolve its inputs (a user's model and data, or a built-in task's
cached artefacts), then call the one algorithm function. No training logic lives here."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from rlhflab.algorithms.pretrain import PretrainConfig, run_pretrain
from rlhflab.algorithms.reward_model import RewardModelConfig, run_reward_model
from rlhflab.algorithms.sft import SFTConfig, run_sft
from rlhflab.data.collate import TruncationCounter, tokenize_preference, tokenize_sft
from rlhflab.data.loading import from_records, load_preferences, load_prompts, load_sft
from rlhflab.errors import InputError
from rlhflab.evaluation.suite import EvalConfig, format_table
from rlhflab.evaluation.suite import evaluate as run_evaluation
from rlhflab.models.loading import load_causal_lm, load_scalar_model, load_tokenizer
from rlhflab.pipeline import TaskArtefacts, base_model, preference_pairs, sft_model
from rlhflab.pipeline import reward_model as task_reward_model
from rlhflab.tasks import get_task
from rlhflab.training.distributed import data_parallel

console = Console(stderr=True)

__all__ = ["PretrainConfig", "SFTConfig", "RewardModelConfig", "EvalStageConfig", "DemoConfig"]


def artefacts(cfg: Any) -> TaskArtefacts:
    if not cfg.task:
        raise InputError("give --model and --data, or --task reviews|arithmetic", field="task")
    return TaskArtefacts(task=cfg.task, size=getattr(cfg, "task_size", "small"), cache_dir=cfg.cache_dir, progress=cfg.progress)


def resolve_model(cfg: Any, default) -> str:
    """--model if given, else the task's artefact built by `default(artefacts)`."""
    return cfg.model or str(default(artefacts(cfg)))


def _tokenize_all(tokenize, tokenizer: Any, examples: list, cfg: Any) -> list:
    """Tokenize loaded examples with the stage's budgets; truncations are counted in one warning."""
    counter = TruncationCounter()
    out = [tokenize(tokenizer, ex, cfg.max_prompt_tokens, cfg.max_completion_tokens, counter=counter) for ex in examples]
    if counter.message():
        console.print(f"[yellow]warning:[/] {counter.message()}")
    return out


def pretrain(cfg: PretrainConfig) -> Path:
    if cfg.data:
        documents = [ex.completion for ex in load_sft(cfg.data) if ex.format == "language_modeling"]
        if not documents:
            raise InputError("pretraining needs documents in the `text` format", file=cfg.data, field="text")
    else:
        documents = get_task(artefacts(cfg).task).pretrain_corpus(cfg.num_documents, seed=cfg.seed)
    with data_parallel():
        path = run_pretrain(cfg, documents)
    console.print(f"base model: {path}")
    return path


def sft(cfg: SFTConfig) -> Path:
    model_path = resolve_model(cfg, base_model)
    tokenizer = load_tokenizer(model_path, cfg.trust_remote_code)
    if cfg.data:
        loaded = load_sft(cfg.data)
    else:
        loaded = from_records(get_task(cfg.task).sft_examples(cfg.num_examples, seed=cfg.seed), "sft", source=f"task {cfg.task}")
    examples = _tokenize_all(tokenize_sft, tokenizer, loaded, cfg)
    with data_parallel():  # under torchrun; prerequisites above were built by one process
        path = run_sft(cfg, load_causal_lm(model_path, cfg.trust_remote_code), tokenizer, examples)
    console.print(f"SFT model: {path}")
    return path


def _preference_inputs(cfg: Any) -> tuple[str, Any, list]:
    """(SFT model path, tokenizer, tokenized pairs) from --model/--data, else the task's SFT model and pairs."""
    model_path = resolve_model(cfg, sft_model)
    tokenizer = load_tokenizer(model_path, cfg.trust_remote_code)
    data = cfg.data or str(preference_pairs(artefacts(cfg)))
    return model_path, tokenizer, _tokenize_all(tokenize_preference, tokenizer, load_preferences(data), cfg)


def reward_model(cfg: RewardModelConfig) -> Path:
    model_path, tokenizer, pairs = _preference_inputs(cfg)
    with data_parallel():
        model = load_scalar_model(model_path, cfg.trust_remote_code)
        path = run_reward_model(cfg, model, tokenizer, pairs)
    console.print(f"reward model: {path}")
    return path


@dataclass
class EvalStageConfig:
    out: str = "runs/eval"  # eval.json goes here
    task: str | None = None  # built-in task: its 16 evaluation prompts, gold reward, SFT reference and reward model
    task_size: str = "small"  # small | tiny: which cached task artefacts to use
    model: str | None = None  # the policy to evaluate (default: the task's SFT model)
    reference: str | None = None  # reference for the KL (default: the task's SFT model)
    reward_model: str | None = None  # reward model folder (default: the task's reward model)
    data: str | None = None  # prompt-only file instead of the task's evaluation prompts
    cache_dir: str | None = None
    temperatures: list[float] = field(default_factory=lambda: [0.3, 0.7, 1.0])
    samples_per_prompt: int = 8
    max_new_tokens: int | None = None  # default: the task's budget, else 32
    seed: int = 1234
    threads: int = 0
    trust_remote_code: bool = False
    progress: bool = True


def evaluate(cfg: EvalStageConfig) -> dict[str, Any]:
    from rlhflab.training.loop import set_threads

    set_threads(cfg.threads)
    task = get_task(cfg.task) if cfg.task else None
    policy_path = cfg.model or str(sft_model(artefacts(cfg)))
    reference_path = cfg.reference or (str(sft_model(artefacts(cfg))) if task else None)
    rm_path = cfg.reward_model or (str(task_reward_model(artefacts(cfg))) if task else None)
    if cfg.data:
        prompts = [ex.prompt for ex in load_prompts(cfg.data)]
    elif task:
        prompts = task.eval_prompts()
    else:
        raise InputError("give --task or --data (a prompt-only file)", field="data")
    tokenizer = load_tokenizer(policy_path, cfg.trust_remote_code)
    eval_cfg = EvalConfig(
        temperatures=cfg.temperatures, samples_per_prompt=cfg.samples_per_prompt, seed=cfg.seed,
        max_new_tokens=cfg.max_new_tokens or (task.max_new_tokens if task else 32),
    )  # fmt: skip
    results = run_evaluation(
        load_causal_lm(policy_path, cfg.trust_remote_code), tokenizer, prompts, eval_cfg,
        reward_model=load_scalar_model(rm_path) if rm_path else None,
        gold_reward=task.gold_reward if task else None,
        is_wellformed=task.is_wellformed if task else None,
        reference=load_causal_lm(reference_path) if reference_path else None,
    )  # fmt: skip
    results["model"] = policy_path
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(results, indent=1))
    print_eval(results, policy_path)
    console.print(f"evaluation: {out / 'eval.json'}")
    return results


def print_eval(results: dict[str, Any], title: str) -> None:
    table = Table(title=title)
    for column in ("temperature", "metric", "mean [95% CI]"):
        table.add_column(column)
    for row in format_table(results):
        table.add_row(*row)
    Console().print(table)


@dataclass
class DemoConfig:
    out: str = "runs/demo"  # study folder of the demo: runs/, study.json, report.html, report.md
    task: str = "reviews"
    task_size: str = "small"  # small: ≈3M-parameter models (the demo); tiny: a fast smoke run
    cache_dir: str | None = None
    threads: int = 0
    progress: bool = True
    study: str = "demo"  # a built-in study (demo | phases | frontier) or a study YAML file
    seeds: list[int] = field(default_factory=lambda: [0])  # training seeds of every arm


def demo(cfg: DemoConfig) -> Path:
    """The default study: SFT baseline, DPO, PPO and GRPO from the same SFT model and reward model, evaluated on
    the task's 16 prompts; prints the report's path at the end."""
    import time

    from rlhflab.study.config import builtin_path, load_study
    from rlhflab.study.runner import run_study

    started = time.perf_counter()
    source = cfg.study if cfg.study.endswith((".yaml", ".yml")) else str(builtin_path(cfg.study))
    overrides = {"out": cfg.out, "task": cfg.task, "task_size": cfg.task_size, "cache_dir": cfg.cache_dir,
                 "threads": cfg.threads, "progress": cfg.progress, "seeds": cfg.seeds}  # fmt: skip
    report = run_study(load_study(source, overrides))
    Console().print(f"demo finished in {time.perf_counter() - started:.0f} s; report: {report}")
    return report


def _rl_inputs(cfg: Any) -> tuple[Any, dict[str, Any]]:
    """PPO/GRPO inputs: (cfg with the task's completion budget, {policy_path, tokenizer, prompts, columns,
    reward_fn, reward_model, gold_fn}). The reward is --reward-fn, else --reward-model, else the task's reward
    model; `columns` holds the prompt file's other fields for the reward function ({name: one value per prompt},
    None where a record lacks the field)."""
    from dataclasses import replace

    from rlhflab.algorithms.rewards import check_reward_weights, load_reward_fns

    task = get_task(cfg.task) if cfg.task else None
    reward_fn = load_reward_fns(cfg.reward_fn) if cfg.reward_fn else None  # a bad spec fails before any build
    if reward_fn:
        check_reward_weights(cfg.reward_weights, len(reward_fn))
    policy_path = resolve_model(cfg, sft_model)
    columns: dict[str, list[Any]] = {}
    if cfg.data:
        examples = load_prompts(cfg.data)
        prompts = [ex.prompt for ex in examples]
        names = dict.fromkeys(name for ex in examples for name in ex.extra)  # first-seen order
        columns = {name: [ex.extra.get(name) for ex in examples] for name in names}
    elif task:
        prompts = task.train_prompts(cfg.num_prompts, seed=cfg.seed)
    else:
        raise InputError("give --data (a prompt-only file) or --task", field="data")
    rm_path = None if reward_fn else cfg.reward_model or (str(task_reward_model(artefacts(cfg))) if task else None)
    if reward_fn is None and rm_path is None:
        raise InputError("give --reward-fn FILE.py:NAME, --reward-model DIR or --task", field="reward_fn")
    if cfg.max_new_tokens is None:
        cfg = replace(cfg, max_new_tokens=task.max_new_tokens if task else 32)
    return cfg, {
        "policy_path": policy_path, "tokenizer": load_tokenizer(policy_path, cfg.trust_remote_code), "prompts": prompts,
        "columns": columns, "reward_fn": reward_fn, "reward_model": load_scalar_model(rm_path) if rm_path else None,
        "rm_path": rm_path, "gold_fn": task.gold_reward if task else None,
    }  # fmt: skip


def grpo(cfg: Any) -> Path:
    from rlhflab.algorithms.grpo import run_grpo

    cfg, a = _rl_inputs(cfg)
    reference = load_causal_lm(a["policy_path"], cfg.trust_remote_code) if cfg.beta > 0 else None
    with data_parallel():  # under torchrun: each process samples its share of every step's prompts
        path = run_grpo(cfg, load_causal_lm(a["policy_path"], cfg.trust_remote_code), a["tokenizer"], a["prompts"],
                        reward_fn=a["reward_fn"], reward_model=a["reward_model"], reference=reference,
                        gold_fn=a["gold_fn"], prompt_columns=a["columns"])
    console.print(f"GRPO policy: {path}")
    return path


def ppo(cfg: Any) -> Path:
    from rlhflab.algorithms.ppo import run_ppo

    cfg, a = _rl_inputs(cfg)
    if cfg.value_init not in ("reward_model", "policy"):
        raise InputError("value_init must be reward_model or policy", field="value_init")
    value_from = a["rm_path"] if cfg.value_init == "reward_model" and a["rm_path"] else a["policy_path"]
    with data_parallel():  # under torchrun: each process samples its share of every step's prompts
        path = run_ppo(cfg, load_causal_lm(a["policy_path"], cfg.trust_remote_code), load_scalar_model(value_from),
                       load_causal_lm(a["policy_path"], cfg.trust_remote_code), a["tokenizer"], a["prompts"],
                       reward_fn=a["reward_fn"], reward_model=a["reward_model"], gold_fn=a["gold_fn"],
                       prompt_columns=a["columns"])
    console.print(f"PPO policy: {path}")
    return path


def dpo(cfg: Any) -> Path:
    """DPO from the SFT model (--model, else the task's) on --data, else the task's cached preference pairs."""
    from rlhflab.algorithms.dpo import run_dpo

    model_path, tokenizer, pairs = _preference_inputs(cfg)

    def load_reference() -> Any:  # the reference is the starting policy, loaded only while needed
        return load_causal_lm(model_path, cfg.trust_remote_code)

    shared = Path(cfg.cache_dir or os.environ.get("RLHFLAB_CACHE") or Path.home() / ".cache" / "rlhflab")
    with data_parallel():
        path = run_dpo(cfg, load_reference(), tokenizer, pairs, load_reference, shared / "reference-logps")
    console.print(f"DPO policy: {path}")
    return path
