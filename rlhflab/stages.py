"""What each CLI command runs: resolve its inputs (a user's model and data, or a built-in task's
cached artefacts), then call the one algorithm function. No training logic lives here."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from rlhflab.algorithms.pretrain import PretrainConfig, run_pretrain
from rlhflab.algorithms.reward_model import RewardModelConfig, run_reward_model
from rlhflab.algorithms.sft import SFTConfig, run_sft
from rlhflab.data.collate import TruncationCounter, tokenize_prompt_completion
from rlhflab.errors import InputError
from rlhflab.evaluation.suite import EvalConfig, format_table
from rlhflab.evaluation.suite import evaluate as run_evaluation
from rlhflab.models.loading import load_causal_lm, load_scalar_model, load_tokenizer
from rlhflab.pipeline import TaskArtefacts, base_model, preference_pairs, sft_model
from rlhflab.pipeline import reward_model as task_reward_model
from rlhflab.tasks import get_task

console = Console(stderr=True)

__all__ = ["PretrainConfig", "SFTConfig", "RewardModelConfig", "EvalStageConfig", "DemoConfig"]


def artefacts(cfg: Any) -> TaskArtefacts:
    if not cfg.task:
        raise InputError("give --model and --data, or --task reviews|arithmetic", field="task")
    return TaskArtefacts(task=cfg.task, size=getattr(cfg, "task_size", "small"), cache_dir=cfg.cache_dir, progress=cfg.progress)


def resolve_model(cfg: Any, default) -> str:
    """--model if given, else the task's artefact built by `default(artefacts)`."""
    return cfg.model or str(default(artefacts(cfg)))


def _tokenize_all(tokenizer: Any, pairs: list[tuple[Any, Any]], cfg: Any) -> list:
    counter = TruncationCounter()
    out = [
        tokenize_prompt_completion(tokenizer, prompt, completion, cfg.max_prompt_tokens, cfg.max_completion_tokens, counter=counter)
        for prompt, completion in pairs
    ]
    if counter.message():
        console.print(f"[yellow]warning:[/] {counter.message()}")
    return out


def pretrain(cfg: PretrainConfig) -> Path:
    if cfg.data:
        from rlhflab.data.loading import load_sft

        documents = [ex.completion for ex in load_sft(cfg.data) if isinstance(ex.completion, str)]
    else:
        documents = get_task(artefacts(cfg).task).pretrain_corpus(cfg.num_documents, seed=cfg.seed)
    path = run_pretrain(cfg, documents)
    console.print(f"base model: {path}")
    return path


def sft(cfg: SFTConfig) -> Path:
    model_path = resolve_model(cfg, base_model)
    tokenizer = load_tokenizer(model_path, cfg.trust_remote_code)
    if cfg.data:
        from rlhflab.data.loading import load_sft

        pairs = [(ex.prompt, ex.completion) for ex in load_sft(cfg.data)]
    else:
        pairs = [(ex["prompt"], ex["completion"]) for ex in get_task(cfg.task).sft_examples(cfg.num_examples, seed=cfg.seed)]
    examples = _tokenize_all(tokenizer, pairs, cfg)
    path = run_sft(cfg, load_causal_lm(model_path, cfg.trust_remote_code), tokenizer, examples)
    console.print(f"SFT model: {path}")
    return path


def reward_model(cfg: RewardModelConfig) -> Path:
    from rlhflab.data.loading import load_preferences

    model_path = resolve_model(cfg, sft_model)
    tokenizer = load_tokenizer(model_path, cfg.trust_remote_code)
    data = cfg.data or str(preference_pairs(artefacts(cfg)))
    examples = load_preferences(data)
    chosen = _tokenize_all(tokenizer, [(ex.prompt, ex.chosen) for ex in examples], cfg)
    rejected = _tokenize_all(tokenizer, [(ex.prompt, ex.rejected) for ex in examples], cfg)
    path, result = run_reward_model(cfg, load_scalar_model(model_path, cfg.trust_remote_code), tokenizer,
                                    list(zip(chosen, rejected, strict=True)))
    console.print(f"reward model: {path} (held-out pairwise accuracy {result['eval/accuracy']:.3f})")
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
        from rlhflab.data.loading import load_prompts

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
    out: str = "runs/demo"  # run folder of the demo
    task: str = "reviews"
    task_size: str = "small"  # small: ≈3M-parameter models (the demo); tiny: a fast smoke run
    cache_dir: str | None = None
    threads: int = 0
    progress: bool = True


def demo(cfg: DemoConfig) -> None:
    """pretrain → SFT → reward model → evaluate the SFT model on the task's 16 evaluation prompts."""
    import time

    from rlhflab.training.loop import set_threads

    set_threads(cfg.threads)
    started = time.perf_counter()
    a = TaskArtefacts(task=cfg.task, size=cfg.task_size, cache_dir=cfg.cache_dir, progress=cfg.progress)
    sft_path = sft_model(a)
    rm_path = task_reward_model(a)
    rm_eval = json.loads((rm_path.parent / "eval.json").read_text())
    results = evaluate(EvalStageConfig(out=str(Path(cfg.out) / "sft-eval"), task=cfg.task, task_size=cfg.task_size,
                                       cache_dir=cfg.cache_dir, temperatures=[1.0], progress=cfg.progress))
    block = results["temperatures"]["1"]["aggregate"]
    summary = {
        "wall_seconds": round(time.perf_counter() - started, 1),
        "sft_wellformed_at_t1": 1 - block["malformed"]["mean"],
        "sft_gold_reward_at_t1": block["gold"]["mean"],
        "rm_heldout_accuracy": rm_eval["eval/accuracy"],
        "sft_model": str(sft_path),
        "reward_model": str(rm_path),
    }
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    (Path(cfg.out) / "summary.json").write_text(json.dumps(summary, indent=1))
    Console().print(summary)
