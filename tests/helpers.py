"""Shared builders of the tests: a tiny tokenizer and tiny models, prompt and pair sets, reward functions, and one
golden run per trainer (tests/test_golden.py checks them against tests/golden/*.json).

Each `golden_*` function is the ONE place that calls its algorithm's run function for the golden trajectories (and
for tests/test_invariants.py, which varies their configs through `overrides`): when a run function's signature or
return value changes, adapt it here, and the recorded numbers must still hold.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from rlhflab.data.collate import TokenizedExample, tokenize_preference, tokenize_prompt_completion
from rlhflab.data.loading import from_records
from rlhflab.models.tokenizer import train_tokenizer
from rlhflab.training.metrics import is_wall_clock, read_metrics

PROMPTS = ["a b", "c d e", "f g", "h a b c", "b", "e f"]
LETTERS = "abcdefgh"


# --- tokenizers ------------------------------------------------------------------------------------------------------
# Trained once per process (BPE training is deterministic: same corpus, same tokenizer, in every process). The
# objects are shared between tests: never modify one.

@cache
def tiny_tokenizer():
    """A 40-token BPE over the letters a-h and "."."""
    return train_tokenizer(["a b c d e f g h .", "b c a d . e f g", "h g f e d c b a ."] * 10, vocab_size=40)


@cache
def task_tokenizer(tasks: tuple[str, ...] = ("reviews",), documents: int = 400, vocab_size: int = 200):
    """A BPE of `vocab_size` trained on the first `documents` pretraining documents (seed 0) of each task."""
    from rlhflab.tasks import get_task

    corpus = [doc for task in tasks for doc in get_task(task).pretrain_corpus(documents, seed=0)]
    return train_tokenizer(corpus, vocab_size=vocab_size)


# --- models ----------------------------------------------------------------------------------------------------------

def tiny_causal_lm(architecture: str = "Llama", seed: int = 0, **config) -> torch.nn.Module:
    """A randomly initialised transformers `{architecture}ForCausalLM` for tests of the core (vocabulary 64, width
    64, 2 layers, 4 heads of 16, grouped-query attention with 2 key/value heads), in eval mode; `config`
    overrides any field of its config."""
    import transformers

    torch.manual_seed(seed)
    defaults = {"vocab_size": 64, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "intermediate_size": 128, "max_position_embeddings": 256, "head_dim": 16}
    model_config = getattr(transformers, f"{architecture}Config")(**{**defaults, **config})
    return getattr(transformers, f"{architecture}ForCausalLM")(model_config).eval()


def tiny_llama(attn_implementation: str = "sdpa", seed: int = 0, **config) -> LlamaForCausalLM:
    """`tiny_causal_lm` as a Llama with 4 key/value heads (no grouping) and the given attention kernel."""
    return tiny_causal_lm("Llama", seed, **{"num_key_value_heads": 4, "attn_implementation": attn_implementation,
                                            **config})


class FullLogitsForward(torch.nn.Module):
    """`model` behind a class name outside `core.causal_lm.HEAD_ONLY_WHERE_NEEDED`: log-prob functions take their
    full-logits path on it (the reference for the chunked LM head); same parameters, same forward."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.inner, self.config = model, model.config

    def forward(self, **inputs: Any) -> Any:
        return self.inner(**inputs)


def tiny_lm_config(tokenizer, **overrides) -> LlamaConfig:
    """For models that go with a tokenizer: 2 layers, width 32, 2 heads, tied embeddings, the tokenizer's
    vocabulary and special ids; `overrides` change any field."""
    fields = dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, attn_implementation="sdpa", tie_word_embeddings=True)
    return LlamaConfig(**{**fields, **overrides})


def tiny_lm(tokenizer, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A randomly initialised tiny causal LM (`tiny_lm_config`), seeded; in training mode, as run functions get it."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_lm_config(tokenizer, **overrides))


def tiny_scorer(tokenizer, seed: int = 0, **overrides) -> LlamaForSequenceClassification:
    """A randomly initialised tiny scalar-head model (reward or value model), seeded."""
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(tiny_lm_config(tokenizer, num_labels=1, **overrides))


# --- data and rewards ------------------------------------------------------------------------------------------------

def count_a(prompts: list[str], completions: list[str]) -> list[float]:
    """Reward: share of the completion's words that are "a" (varies across samples of a random model)."""
    return [c.split().count("a") / max(len(c.split()), 1) for c in completions]


def letter_documents(n: int, seed: int = 0) -> list[str]:
    """`n` documents of 3-8 words drawn from a-h, each ending in "." (a pretraining corpus)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 8))) + " ." for _ in range(n)]


def sft_examples(tokenizer, n: int, seed: int = 0) -> list[TokenizedExample]:
    """Prompt "x y", completion: the prompt's letters repeated (a pattern a tiny model can start to learn)."""
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        prompt = " ".join(rng.choice(LETTERS) for _ in range(rng.randint(1, 3)))
        examples.append(tokenize_prompt_completion(tokenizer, prompt, f" {prompt} {prompt} .", 16, 16))
    return examples


def preference_pairs(tokenizer, n: int, seed: int = 0) -> list[tuple[TokenizedExample, TokenizedExample]]:
    """Pairs whose chosen response has more "a"s than the rejected one (lengths vary within and across pairs)."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        prompt = " ".join(rng.choice(LETTERS) for _ in range(rng.randint(1, 3)))
        other = " ".join(rng.choice(LETTERS[1:]) for _ in range(rng.randint(1, 4)))
        records.append({"prompt": prompt, "chosen": f" a {other} a .", "rejected": f" {other} ."})
    return [tokenize_preference(tokenizer, ex, 16, 16) for ex in from_records(records, "preference")]


def without_timing(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Metrics lines without the keys that measure time: two runs of the same steps must agree on the rest."""
    return [{k: v for k, v in row.items() if not is_wall_clock(k)} for row in rows]


def forget_the_label_shift(monkeypatch, module) -> None:
    """Make `module`'s packer deliberately wrong: every token 'predicted' from its own position (a shift bug that
    the policy, the reference and the old log-probs would all share, so no ratio or step-0 check sees it)."""
    pack_groups = module.pack_groups

    def wrong(*args, **kwargs):
        packed = pack_groups(*args, **kwargs)
        return replace(packed, logit_index=packed.logit_index + 1)

    monkeypatch.setattr(module, "pack_groups", wrong)


def assert_stops_on_mask_mismatch(run: Any, model: torch.nn.Module, out: Path) -> None:
    """`run()` stops with logps.mask_mismatch, the only finding in OUT/diagnostics.jsonl, before any update."""
    import pytest

    from rlhflab.diagnostics.findings import read_findings
    from rlhflab.training.loop import TrainingStopped

    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TrainingStopped, match="logps.mask_mismatch"):
        run()
    assert [f.code for f in read_findings(Path(out) / "diagnostics.jsonl")] == ["logps.mask_mismatch"]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# --- golden runs: one per trainer ------------------------------------------------------------------------------------

@dataclass
class GoldenRun:
    """What a golden run produced: its metrics lines, the end-of-run held-out metrics, the trained model."""

    metrics: list[dict[str, Any]]
    model: torch.nn.Module
    final: dict[str, float] = field(default_factory=dict)


def weights_fingerprint(model: torch.nn.Module) -> dict[str, float]:
    """Sum, L2 norm and a fixed random projection of all parameters (float64): cheap, and a change to any
    weight, or two weights swapped, moves the projection."""
    flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    signs = torch.randint(0, 2, flat.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    return {"sum": flat.sum().item(), "norm": flat.norm().item(), "projection": (flat * signs).sum().item(),
            "numel": float(flat.numel())}


def _training_lines(out: str | Path, max_steps: int) -> list[dict[str, Any]]:
    """The metrics lines of training steps (an end-of-run line some trainers append is left out)."""
    return [m for m in read_metrics(Path(out)) if m["step"] < max_steps]


def golden_pretrain(tmp_path: Path, **overrides: Any) -> GoldenRun:
    from transformers import AutoModelForCausalLM

    from rlhflab.algorithms.pretrain import PretrainConfig, run_pretrain

    cfg = PretrainConfig(out=str(tmp_path / "pretrain"), preset="tiny", vocab_size=48, max_steps=4, batch_size=4,
                         lr=3e-3, warmup_ratio=0.25, max_completion_tokens=16, threads=1, progress=False, seed=1)
    cfg = replace(cfg, **overrides)
    path = run_pretrain(cfg, letter_documents(24))
    return GoldenRun(_training_lines(cfg.out, cfg.max_steps), AutoModelForCausalLM.from_pretrained(path))


def golden_sft(tmp_path: Path, **overrides: Any) -> GoldenRun:
    from rlhflab.algorithms.sft import SFTConfig, run_sft

    tokenizer = tiny_tokenizer()
    cfg = SFTConfig(out=str(tmp_path / "sft"), max_steps=4, batch_size=4, lr=1e-2, warmup_ratio=0.25, threads=1,
                    progress=False, seed=2)
    cfg = replace(cfg, **overrides)
    model = tiny_lm(tokenizer)
    run_sft(cfg, model, tokenizer, sft_examples(tokenizer, 24))
    return GoldenRun(_training_lines(cfg.out, cfg.max_steps), model)


def golden_reward_model(tmp_path: Path, **overrides: Any) -> GoldenRun:
    from rlhflab.algorithms.reward_model import RewardModelConfig, run_reward_model

    tokenizer = tiny_tokenizer()
    cfg = RewardModelConfig(out=str(tmp_path / "rm"), max_steps=4, batch_size=4, lr=1e-2, eval_fraction=0.25,
                            threads=1, progress=False, seed=3)
    cfg = replace(cfg, **overrides)
    model = tiny_scorer(tokenizer)
    returned = run_reward_model(cfg, model, tokenizer, preference_pairs(tokenizer, 24))
    return GoldenRun(_training_lines(cfg.out, cfg.max_steps), model, _heldout_metrics(returned, cfg.out))


def golden_dpo(tmp_path: Path, **overrides: Any) -> GoldenRun:
    from rlhflab.algorithms.dpo import DPOConfig, run_dpo

    tokenizer = tiny_tokenizer()
    cfg = DPOConfig(out=str(tmp_path / "dpo"), cache_dir=str(tmp_path / "cache"), max_steps=4, batch_size=4,
                    lr=1e-2, eval_fraction=0.25, eval_every=0, share_reference_cache=False, threads=1,
                    progress=False, seed=4)
    cfg = replace(cfg, **overrides)
    model = tiny_lm(tokenizer)
    reference = copy.deepcopy(model)
    returned = run_dpo(cfg, model, tokenizer, preference_pairs(tokenizer, 24), lambda: copy.deepcopy(reference))
    return GoldenRun(_training_lines(cfg.out, cfg.max_steps), model, _heldout_metrics(returned, cfg.out))


def golden_ppo(tmp_path: Path, **overrides: Any) -> GoldenRun:
    """PPO scored by a (random) reward model: also guards the reward-model scoring of rollouts."""
    from rlhflab.algorithms.ppo import PPOConfig, run_ppo

    tokenizer = tiny_tokenizer()
    cfg = PPOConfig(out=str(tmp_path / "ppo"), max_steps=4, batch_size=4, group_size=1, max_new_tokens=6, lr=1e-3,
                    ppo_epochs=2, num_minibatches=2, threads=1, progress=False, seed=5)
    cfg = replace(cfg, **overrides)
    policy = tiny_lm(tokenizer, seed=0)
    reference = copy.deepcopy(policy)
    value, reward_model = tiny_scorer(tokenizer, seed=1), tiny_scorer(tokenizer, seed=2)
    run_ppo(cfg, policy, value, reference, tokenizer, PROMPTS, reward_model=reward_model)
    return GoldenRun(_training_lines(cfg.out, cfg.max_steps), policy)


def golden_grpo(tmp_path: Path, **overrides: Any) -> GoldenRun:
    """GRPO scored by a reward function, with a KL term to a reference (beta 0.04) and two updates per rollout
    (lr and seed chosen so that no step's rewards all tie: every step trains)."""
    from rlhflab.algorithms.grpo import GRPOConfig, run_grpo

    tokenizer = tiny_tokenizer()
    cfg = GRPOConfig(out=str(tmp_path / "grpo"), max_steps=4, batch_size=3, group_size=4, max_new_tokens=6, lr=3e-3,
                     num_iterations=2, threads=1, progress=False, seed=6)
    cfg = replace(cfg, **overrides)
    policy = tiny_lm(tokenizer)
    reference = copy.deepcopy(policy)
    run_grpo(cfg, policy, tokenizer, PROMPTS, reward_fn=count_a, reference=reference)
    return GoldenRun(_training_lines(cfg.out, cfg.max_steps), policy)


def _heldout_metrics(returned: Any, out: str) -> dict[str, float]:
    """The end-of-run eval/* metrics: returned beside the model folder (RM and DPO at 2dfa8b2), or else on the
    last metrics line (where the loop's final evaluate() puts them)."""
    results = returned[1] if isinstance(returned, tuple) else read_metrics(Path(out))[-1]
    return {k: float(v) for k, v in results.items() if k.startswith("eval/") and isinstance(v, int | float)}


GOLDEN_RUNS = {"pretrain": golden_pretrain, "sft": golden_sft, "rm": golden_reward_model, "dpo": golden_dpo,
               "ppo": golden_ppo, "grpo": golden_grpo}
