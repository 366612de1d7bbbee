"""Tokens/s of `rlhflab.core.sampling.sample` vs `transformers` `generate(do_sample=True)`.

A ~5M-parameter Llama (hidden 256, 4 layers, vocab 512), one thread, full length (EOS is an
id the model never emits, so both generate every token). `sample` prefills each prompt once
and expands its KV cache; `generate` is given the prompts already repeated (its
`num_return_sequences` does the same repetition before prefill).

    .venv/bin/python benchmarks/sampler.py [--prompts 8] [--group 8] [--new-tokens 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rlhflab.core.sampling import sample

VOCAB, PAD = 512, 0
NEVER_EMITTED = VOCAB  # an id outside the vocabulary: no row ever stops early


def build_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=1024,
        max_position_embeddings=512,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).eval()


def best_times(fns: dict, repeats: int) -> dict[str, float]:
    """Fastest of `repeats` runs of each function, interleaved so that load from other processes
    hits both alike; one warm-up run each."""
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)

    model = build_model()
    num_params = sum(p.numel() for p in model.parameters())
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(1, VOCAB, (args.prompts, args.prompt_length), generator=generator)
    num_tokens = args.prompts * args.group * args.new_tokens

    def run_sample():
        out = sample(
            model,
            prompts.tolist(),
            num_samples=args.group,
            max_new_tokens=args.new_tokens,
            stop_token_ids=[NEVER_EMITTED],
            pad_token_id=PAD,
            generator=generator,
        )
        assert out.completion_ids.shape == (args.prompts * args.group, args.new_tokens)

    def run_generate():
        with torch.inference_mode():
            out = model.generate(
                input_ids=prompts,
                attention_mask=torch.ones_like(prompts),
                do_sample=True,
                num_return_sequences=args.group,
                max_new_tokens=args.new_tokens,
                min_new_tokens=0,
                top_k=0,
                top_p=1.0,
                temperature=1.0,
                stop_token_ids=[NEVER_EMITTED],
                pad_token_id=PAD,
            )
        assert out.shape == (args.prompts * args.group, args.prompt_length + args.new_tokens)

    best = best_times({"sample": run_sample, "generate": run_generate}, args.repeats)
    sample_s, generate_s = best["sample"], best["generate"]
    print(
        f"model: {num_params / 1e6:.1f}M parameters, {args.prompts} prompts x group {args.group}, "
        f"prompt {args.prompt_length} tokens, {args.new_tokens} new tokens, threads {torch.get_num_threads()}"
    )
    print(
        f"rlhflab sample:                  {num_tokens / sample_s:9.0f} tokens/s  ({sample_s * 1e3:.0f} ms)"
    )
    print(
        f"transformers generate(do_sample): {num_tokens / generate_s:9.0f} tokens/s  ({generate_s * 1e3:.0f} ms)"
    )
    print(f"speed-up: {generate_s / sample_s:.2f}x")


if __name__ == "__main__":
    main()
