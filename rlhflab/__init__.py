"""rlhflab: DPO, PPO and GRPO on the same model, tokenizer and evaluation suite."""

__version__ = "0.1.0"
