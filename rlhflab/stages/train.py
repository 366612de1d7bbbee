"""What each training command runs: resolve its inputs (a user's model and data, or a built-in task's
cached artefacts), call the one algorithm function, and end every policy-training command the same way
(the final model, then the shared end-of-run evaluation of `stages.evaluate`). No training logic here."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Console

from rlhflab.algorithms.dpo import DPOConfig, run_dpo
from rlhflab.algorithms.grpo import GRPOConfig, run_grpo
from rlhflab.algorithms.ppo import PPOConfig, run_ppo
from rlhflab.algorithms.pretrain import PretrainConfig, run_pretrain
from rlhflab.algorithms.reward_model import RewardModelConfig, run_reward_model
from rlhflab.algorithms.rewards import RewardFn, check_reward_weights, load_reward_fns
from rlhflab.algorithms.sft import SFTConfig, run_sft
from rlhflab.config import RunConfig
from rlhflab.data.collate import TruncationCounter, tokenize_preference, tokenize_sft
from rlhflab.data.loading import from_records, load_preferences, load_prompts, load_sft
from rlhflab.errors import InputError
from rlhflab.models.loading import load_causal_lm, load_scalar_model, load_tokenizer
from rlhflab.stages import artefacts
from rlhflab.stages.evaluate import completion_budget, evaluate_final_model
from rlhflab.tasks import get_task
from rlhflab.tasks.base import Task
from rlhflab.training.distributed import data_parallel
from rlhflab.training.metrics import json_lines

console = Console(stderr=True)


def task_artefacts(cfg: Any) -> artefacts.TaskArtefacts:
    if not cfg.task:
        raise InputError("give --model and --data, or --task reviews|arithmetic", field="task")
    return artefacts.TaskArtefacts.of(cfg)


def resolve_model(cfg: RunConfig, build_default) -> str:
    """--model if given (a registered name resolves to its converted folder), else the task's artefact built by
    `build_default(task artefacts)`."""
    if cfg.model:
        return artefacts.model_folder(cfg.model, cfg.cache_dir)
    return str(build_default(task_artefacts(cfg)))


def _tokenize_all(tokenize, tokenizer: Any, examples: list, cfg: Any) -> list:
    """Tokenize loaded examples with the command's budgets; truncations are counted in one warning."""
    counter = TruncationCounter()
    out = [tokenize(tokenizer, ex, cfg.max_prompt_tokens, cfg.max_completion_tokens, counter=counter) for ex in examples]
    if counter.message():
        console.print(f"[yellow]warning:[/] {counter.message()}")
    return out


def write_merged(cfg: RunConfig, adapter: Path, load: Any = load_causal_lm) -> Path | None:
    """With --merge-lora, OUT/model_merged: the adapter folder's base with the adapter merged in, a plain
    transformers folder (safetensors) with the tokenizer; `load` reads the adapter folder merged. The end-of-run
    evaluation then reads that folder (`write_merged(...) or path`) instead of merging the adapter a second time."""
    if not cfg.merge_lora:
        return None
    if not cfg.lora_r:
        console.print("[yellow]warning:[/] --merge-lora does nothing without --lora-r: model/ is the whole model")
        return None
    target = Path(cfg.out) / "model_merged"
    merged = load(str(adapter), cfg.trust_remote_code)
    merged.save_pretrained(target, safe_serialization=True)
    load_tokenizer(str(adapter), cfg.trust_remote_code).save_pretrained(target)
    console.print(f"merged model: {target}")
    return target


def pretrain(cfg: PretrainConfig) -> Path:
    if cfg.data:
        documents = [ex.completion for ex in load_sft(cfg.data) if ex.format == "language_modeling"]
        if not documents:
            raise InputError("pretraining needs documents in the `text` format", file=cfg.data, field="text")
    else:
        documents = get_task(task_artefacts(cfg).task).pretrain_corpus(cfg.num_documents, seed=cfg.seed)
    with data_parallel():
        path = run_pretrain(cfg, documents)
    console.print(f"base model: {path}")
    return path


def sft(cfg: SFTConfig) -> Path:
    model_path = resolve_model(cfg, artefacts.base_model)
    tokenizer = load_tokenizer(model_path, cfg.trust_remote_code)
    if cfg.data:
        loaded = load_sft(cfg.data)
    else:
        loaded = from_records(get_task(cfg.task).sft_examples(cfg.num_examples, seed=cfg.seed), "sft", source=f"task {cfg.task}")
    examples = _tokenize_all(tokenize_sft, tokenizer, loaded, cfg)
    with data_parallel():  # under torchrun; prerequisites above were built by one process
        path = run_sft(cfg, load_causal_lm(model_path, cfg.trust_remote_code), tokenizer, examples)
    console.print(f"SFT model: {path}")
    evaluate_final_model(cfg, write_merged(cfg, path) or path, reference=model_path)
    return path


def _preference_inputs(cfg: DPOConfig | RewardModelConfig) -> tuple[str, Any, list]:
    """(SFT model path, tokenizer, tokenized pairs) from --model/--data, else the task's SFT model and pairs."""
    model_path = resolve_model(cfg, artefacts.sft_model)
    tokenizer = load_tokenizer(model_path, cfg.trust_remote_code)
    data = cfg.data or str(artefacts.preference_pairs(task_artefacts(cfg)))
    return model_path, tokenizer, _tokenize_all(tokenize_preference, tokenizer, load_preferences(data), cfg)


def final_metrics(out: Path) -> dict[str, Any]:
    """The last metrics line of a run folder (the loop's end-of-run held-out metrics join it)."""
    lines = json_lines(out / "metrics.jsonl")
    return lines[-1][1] if lines else {}


def train_reward_model(cfg: RewardModelConfig) -> Path:
    model_path, tokenizer, pairs = _preference_inputs(cfg)
    with data_parallel():
        path = run_reward_model(cfg, load_scalar_model(model_path, cfg.trust_remote_code), tokenizer, pairs)
    accuracy = final_metrics(path.parent).get("eval/accuracy")
    console.print(f"reward model: {path}" + (f" (held-out pairwise accuracy {accuracy:.3f})" if isinstance(accuracy, float) else ""))
    write_merged(cfg, path, load_scalar_model)
    return path


def dpo(cfg: DPOConfig) -> Path:
    """DPO from the SFT model (--model, else the task's) on --data, else the task's cached preference pairs."""
    model_path, tokenizer, pairs = _preference_inputs(cfg)

    def load_reference() -> Any:  # the reference is the starting policy, loaded only while needed (never with LoRA)
        return load_causal_lm(model_path, cfg.trust_remote_code)

    shared = artefacts.reference_logps_dir(cfg.cache_dir) if cfg.share_reference_cache else None
    with data_parallel():
        path = run_dpo(cfg, load_reference(), tokenizer, pairs, load_reference, shared_reference_cache=shared)
    accuracy = final_metrics(path.parent).get("eval/rewards/accuracies")
    if isinstance(accuracy, float):
        console.print(f"held-out implicit-reward accuracy {accuracy:.3f}")
    console.print(f"DPO policy: {path}")
    evaluate_final_model(cfg, write_merged(cfg, path) or path, reference=model_path)
    return path


@dataclass
class RLInputs:
    """What PPO and GRPO start from. The reward is --reward-fn, else --reward-model, else the task's reward
    model; `columns` holds the prompt file's other fields for reward functions ({name: one value per prompt},
    None where a record lacks the field)."""

    policy_path: str
    tokenizer: Any
    prompts: list[Any]
    columns: dict[str, list[Any]]
    reward_fn: list[RewardFn] | None
    reward_model_path: str | None
    task: Task | None

    def reward_model(self) -> Any:
        return load_scalar_model(self.reward_model_path) if self.reward_model_path else None


def _rl_inputs(cfg: PPOConfig | GRPOConfig) -> tuple[Any, RLInputs]:
    """(cfg with the task's completion budget filled in, the run's RLInputs)."""
    task = get_task(cfg.task) if cfg.task else None
    reward_fn = load_reward_fns(cfg.reward_fn) if cfg.reward_fn else None  # a bad spec fails before any build
    if reward_fn:
        check_reward_weights(cfg.reward_weights, len(reward_fn))
    policy_path = resolve_model(cfg, artefacts.sft_model)
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
    rm_path = None if reward_fn else cfg.reward_model or (str(artefacts.reward_model(task_artefacts(cfg))) if task else None)
    if reward_fn is None and rm_path is None:
        raise InputError("give --reward-fn FILE.py:NAME, --reward-model DIR or --task", field="reward_fn")
    if cfg.max_new_tokens is None:
        cfg = replace(cfg, max_new_tokens=completion_budget(task))
    tokenizer = load_tokenizer(policy_path, cfg.trust_remote_code)
    return cfg, RLInputs(policy_path, tokenizer, prompts, columns, reward_fn, rm_path, task)


def grpo(cfg: GRPOConfig) -> Path:
    cfg, inputs = _rl_inputs(cfg)
    policy = load_causal_lm(inputs.policy_path, cfg.trust_remote_code)
    # with LoRA the reference is the policy with its adapters off: no second copy
    needs_reference = cfg.beta > 0 and not cfg.lora_r
    reference = load_causal_lm(inputs.policy_path, cfg.trust_remote_code) if needs_reference else None
    with data_parallel():  # under torchrun: each process samples its share of every step's prompts
        path = run_grpo(cfg, policy, inputs.tokenizer, inputs.prompts, reward_fn=inputs.reward_fn,
                        reward_model=inputs.reward_model(), reference=reference,
                        gold_fn=inputs.task.gold_reward if inputs.task else None, prompt_columns=inputs.columns)
    console.print(f"GRPO policy: {path}")
    evaluate_final_model(cfg, write_merged(cfg, path) or path, reference=inputs.policy_path,
                         reward_model=inputs.reward_model_path, max_new_tokens=cfg.max_new_tokens,
                         reward_fn=cfg.reward_fn, reward_weights=cfg.reward_weights)
    return path


def ppo(cfg: PPOConfig) -> Path:
    cfg, inputs = _rl_inputs(cfg)
    use_rm = cfg.value_init == "reward_model" and inputs.reward_model_path
    value_from = inputs.reward_model_path if use_rm else inputs.policy_path
    # with LoRA the reference is the policy with its adapters off: no second copy
    reference = None if cfg.lora_r else load_causal_lm(inputs.policy_path, cfg.trust_remote_code)
    with data_parallel():  # under torchrun: each process samples its share of every step's prompts
        path = run_ppo(cfg, load_causal_lm(inputs.policy_path, cfg.trust_remote_code), load_scalar_model(value_from),
                       reference, inputs.tokenizer, inputs.prompts,
                       reward_fn=inputs.reward_fn, reward_model=inputs.reward_model(),
                       gold_fn=inputs.task.gold_reward if inputs.task else None, prompt_columns=inputs.columns)
    console.print(f"PPO policy: {path}")
    evaluate_final_model(cfg, write_merged(cfg, path) or path, reference=inputs.policy_path,
                         reward_model=inputs.reward_model_path, max_new_tokens=cfg.max_new_tokens,
                         reward_fn=cfg.reward_fn, reward_weights=cfg.reward_weights)
    return path
