"""`--task NAME`: build a command's prerequisites for a built-in task on first use, and cache them.

    tokenizer + base model (pretrain) ─► SFT model ─► preference pairs (SFT samples × gold labels)
                                                   └► reward model (Bradley-Terry on those pairs)

Each artefact lives in `CACHE/TASK/KIND-KEY/`, where KEY hashes the settings that produced it and
those of everything it was built from, so a change of settings builds a new artefact and an
unchanged one is reused (a second `rlhflab dpo --task reviews` starts training at once). Builds
happen in a temporary folder that is renamed when complete: a killed build is never reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhflab.algorithms.pretrain import PretrainConfig, run_pretrain
from rlhflab.algorithms.reward_model import RewardModelConfig, run_reward_model
from rlhflab.algorithms.sft import SFTConfig, run_sft
from rlhflab.core.sampling import sample
from rlhflab.data.collate import tokenize_preference, tokenize_prompt, tokenize_sft
from rlhflab.data.loading import from_records, load_preferences
from rlhflab.models.loading import (
    decode_completion,
    load_causal_lm,
    load_scalar_model,
    load_tokenizer,
    stop_token_ids,
)
from rlhflab.models.pretrained import resolve_model
from rlhflab.tasks import get_task


def cache_root(cache_dir: str | None = None) -> Path:
    """Where task artefacts and shared reference log-probs live: --cache-dir, else $RLHFLAB_CACHE, else
    ~/.cache/rlhflab. The one place that decides it."""
    return Path(cache_dir or os.environ.get("RLHFLAB_CACHE") or Path.home() / ".cache" / "rlhflab")


def model_folder(name_or_path: str, cache_dir: str | None = None) -> str:
    """What `--model` (or `--reference`) names: a registered real model (e.g. smollm2-135m-instruct) becomes its
    converted folder in the cache (models.pretrained); a local folder or a hub id stays as given."""
    return resolve_model(name_or_path, cache_root(cache_dir))


def reference_logps_dir(cache_dir: str | None = None) -> Path:
    """DPO's reference log-probs shared by runs of one reference model (keyed inside by a fingerprint)."""
    return cache_root(cache_dir) / "reference-logps"


@dataclass
class TaskArtefacts:
    """Settings of a task's shared artefacts. `size="tiny"` is a fast variant for tests and smoke runs."""

    task: str = "reviews"
    size: str = "small"  # small: the demo (≈3M parameters; arithmetic ≈0.9M); tiny: ≈1M parameters, few steps
    seed: int = 0
    cache_dir: str | None = None  # see cache_root
    pair_prompts: int = 4800  # preference pairs: prompts sampled twice each by the SFT model (ties dropped)
    pair_temperature: float = 1.0
    progress: bool = True

    @classmethod
    def of(cls, cfg: Any) -> TaskArtefacts:
        """The artefacts a command's config names (its task, task_size, cache_dir and progress)."""
        return cls(task=cfg.task, size=cfg.task_size, cache_dir=cfg.cache_dir, progress=cfg.progress)

    def root(self) -> Path:
        return cache_root(self.cache_dir) / self.task

    def pretrain_config(self) -> PretrainConfig:
        if self.size == "tiny":
            return PretrainConfig(preset="tiny", max_steps=60, num_documents=2000, batch_size=32, seed=self.seed)
        # arithmetic: the ≈1M model learns carries within the SFT budget (docs/notes_tasks.md, "Arithmetic in the pipeline")
        return PretrainConfig(preset="tiny" if self.task == "arithmetic" else "small", seed=self.seed)

    def sft_config(self) -> SFTConfig:
        if self.size == "tiny":
            return SFTConfig(max_steps=20, num_examples=1000, seed=self.seed)
        if self.task == "arithmetic":
            # sized to leave the SFT model partly right, with room for RL, off the steep part of the learning
            # curve (docs/notes_tasks.md, "Arithmetic in the pipeline")
            return SFTConfig(max_steps=450, batch_size=64, lr=2e-3, adam_beta2=0.98, weight_decay=0.01, seed=self.seed)
        return SFTConfig(seed=self.seed)

    def rm_config(self) -> RewardModelConfig:
        if self.size == "tiny":
            return RewardModelConfig(max_steps=20, seed=self.seed)
        return RewardModelConfig(seed=self.seed)

    def num_pair_prompts(self) -> int:
        return min(self.pair_prompts, 200) if self.size == "tiny" else self.pair_prompts


def _key(*parts: Any) -> str:
    blob = json.dumps([dataclasses.asdict(p) if dataclasses.is_dataclass(p) else p for p in parts], sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def _build(target: Path, build) -> Path:
    """Run `build(tmp_folder)` unless `target` exists; publish the folder atomically.

    A file lock makes concurrent builders of the same artefact (parallel tests, study arms) wait
    for the first one instead of building it twice.
    """
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if target.exists():
            return target
        tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        build(tmp)
        os.replace(tmp, target)
    return target


def _stage_config(cfg, out: Path, progress: bool):
    return dataclasses.replace(cfg, out=str(out), progress=progress, checkpoint_every=0, keep_checkpoints=1)


def base_model(a: TaskArtefacts) -> Path:
    """Tokenizer + pretrained base model (a save_pretrained folder)."""
    cfg = a.pretrain_config()
    task = get_task(a.task)

    def build(tmp: Path) -> None:
        run_pretrain(_stage_config(cfg, tmp, a.progress), task.pretrain_corpus(cfg.num_documents, seed=a.seed))

    return _build(a.root() / f"base-{_key(a.task, cfg)}", build) / "model"


def sft_model(a: TaskArtefacts) -> Path:
    cfg = a.sft_config()
    parent = base_model(a)
    task = get_task(a.task)

    def build(tmp: Path) -> None:
        tokenizer = load_tokenizer(str(parent))
        model = load_causal_lm(str(parent))
        records = from_records(task.sft_examples(cfg.num_examples, seed=a.seed + 1), "sft", source=f"task {a.task}")
        examples = [tokenize_sft(tokenizer, ex, cfg.max_prompt_tokens, cfg.max_completion_tokens) for ex in records]
        run_sft(_stage_config(cfg, tmp, a.progress), model, tokenizer, examples)

    return _build(a.root() / f"sft-{_key(parent.parent.name, cfg)}", build) / "model"


@torch.no_grad()
def sample_preference_pairs(policy_path: Path, task_name: str, prompts: list[str], temperature: float, seed: int,
                            max_new_tokens: int) -> list[dict[str, str]]:
    """Sample the policy twice per prompt and label each pair with the gold reward; ties and pairs with an
    empty completion are dropped.

    This is how the DPO paper built its IMDb sentiment pairs (a classifier playing the gold reward).
    """
    task = get_task(task_name)
    tokenizer = load_tokenizer(str(policy_path))
    model = load_causal_lm(str(policy_path))
    generator = torch.Generator().manual_seed(seed)
    stops = stop_token_ids(tokenizer)
    pairs = []
    for start in range(0, len(prompts), 128):
        chunk = prompts[start : start + 128]
        ids = [tokenize_prompt(tokenizer, p, None).prompt_ids for p in chunk]
        samples = sample(model, ids, num_samples=2, max_new_tokens=max_new_tokens, temperature=temperature,
                         stop_token_ids=stops, pad_token_id=tokenizer.pad_token_id, generator=generator)
        texts = [decode_completion(tokenizer, c, stops) for c in samples.completions()]
        rewards = task.gold_reward([p for p in chunk for _ in range(2)], texts)
        for i, prompt in enumerate(chunk):
            (a_text, b_text), (a_reward, b_reward) = texts[2 * i : 2 * i + 2], rewards[2 * i : 2 * i + 2]
            # ties say nothing; an empty completion (EOS at once) has no place in TRL's format
            if a_reward == b_reward or a_text == b_text or not a_text.strip() or not b_text.strip():
                continue
            chosen, rejected = (a_text, b_text) if a_reward > b_reward else (b_text, a_text)
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def preference_pairs(a: TaskArtefacts) -> Path:
    """TRL-format preference JSONL (prompt/chosen/rejected) sampled from the SFT model."""
    parent = sft_model(a)
    task = get_task(a.task)
    n = a.num_pair_prompts()

    def build(tmp: Path) -> None:
        pairs = sample_preference_pairs(parent, a.task, task.train_prompts(n, seed=a.seed + 2), a.pair_temperature,
                                        a.seed + 3, task.max_new_tokens)
        with (tmp / "pairs.jsonl").open("w", encoding="utf-8") as f:
            for pair in pairs:
                f.write(json.dumps(pair) + "\n")

    key = _key(parent.parent.name, n, a.pair_temperature, a.seed)
    return _build(a.root() / f"pairs-{key}", build) / "pairs.jsonl"


def reward_model(a: TaskArtefacts) -> Path:
    cfg = a.rm_config()
    parent = sft_model(a)
    pairs_file = preference_pairs(a)

    def build(tmp: Path) -> None:
        tokenizer = load_tokenizer(str(parent))
        model = load_scalar_model(str(parent))
        pairs = [
            tokenize_preference(tokenizer, ex, cfg.max_prompt_tokens, cfg.max_completion_tokens)
            for ex in load_preferences(str(pairs_file))
        ]
        run_reward_model(_stage_config(cfg, tmp, a.progress), model, tokenizer, pairs)

    return _build(a.root() / f"rm-{_key(parent.parent.name, pairs_file.parent.name, cfg)}", build) / "model"
