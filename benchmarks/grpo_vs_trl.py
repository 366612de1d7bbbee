"""GRPO steps/s of rlhflab vs TRL's GRPOTrainer (no vLLM) on the same model folder, prompts and reward.

Setup (issue 4): a ≈4.5M-parameter Llama (hidden 256, 4 layers, MLP 1024, vocab 512, random init, so
nearly every completion runs to the limit), one prompt of ≈21 tokens × 8 completions per step (`--prompts N`:
N prompts × 8), 32 new tokens, beta 0.04 (so both sides run a reference forward), token_mean loss (TRL's default "dapo"), the
reviews gold reward as the reward function, one torch thread. Each side runs in its own process
(peak RSS = that process's ru_maxrss); steps/s excludes the first `--warmup` steps and counts CPU
seconds (`time.process_time()`: with one thread the wall time of an idle machine, and robust to other
jobs sharing the cores).

Precision: TRL's default is bf16=True, which on a CPU with bf16 instructions (avx512_bf16, AMX) runs
every forward, generation included, under bf16 autocast. Each precision is compared with its own:
rlhflab (fp32) with `trl-fp32` (bf16=False), `rlhflab-bf16` (--precision bf16) with `trl` (default).

    pip install trl --no-deps   (plus its missing dependencies with --no-deps; torch stays as it is)
    .venv/bin/python benchmarks/grpo_vs_trl.py [--steps 12] [--warmup 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

GROUP, NEW_TOKENS, BETA, LR = 8, 32, 0.04, 1e-5


def build_model_folder(folder: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhflab.models.tokenizer import train_tokenizer
    from rlhflab.tasks import get_task

    tokenizer = train_tokenizer(get_task("reviews").pretrain_corpus(3000, seed=0), vocab_size=512)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, intermediate_size=1024, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, attn_implementation="sdpa", tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def prompts(n: int) -> list[str]:
    """Review openings lengthened with a full review in front: ≈21 tokens each."""
    from rlhflab.tasks import get_task

    task = get_task("reviews")
    return [f"{doc} {p}" for doc, p in zip(task.pretrain_corpus(n, seed=1), task.train_prompts(n, seed=2), strict=True)]


def reward(prompts: list, completions: list, **kwargs) -> list[float]:
    from rlhflab.tasks import reviews_reward

    return reviews_reward(prompts, completions)


def run_ours(folder: Path, steps: int, warmup: int, per_step: int, precision: str) -> dict:
    from rlhflab.algorithms import grpo
    from rlhflab.algorithms.grpo import GRPOConfig, run_grpo
    from rlhflab.models.loading import load_causal_lm, load_tokenizer
    from rlhflab.training.metrics import read_metrics

    stamps = []  # CPU clock at the start of each step, and at the end of the run
    plan_step = grpo.GRPORecipe.plan_step
    grpo.GRPORecipe.plan_step = lambda self, step: stamps.append(time.process_time()) or plan_step(self, step)
    out = Path(tempfile.mkdtemp())
    cfg = GRPOConfig(out=str(out), max_steps=steps, batch_size=per_step, group_size=GROUP, max_new_tokens=NEW_TOKENS, beta=BETA,
                     lr=LR, loss_agg="token_mean", threads=1, progress=False, max_prompt_tokens=256, precision=precision)
    run_grpo(cfg, load_causal_lm(str(folder)), load_tokenizer(str(folder)), prompts(steps * per_step), reward_fn=reward,
             reference=load_causal_lm(str(folder)))
    stamps.append(time.process_time())  # includes the final checkpoint and model save: counted against us
    rows = read_metrics(out)
    elapsed = stamps[-1] - stamps[warmup]
    tokens = sum(r["num_tokens"] for r in rows[warmup:])
    return {"steps_per_s": (steps - warmup) / elapsed, "tokens_per_s": tokens / elapsed}


def run_trl(folder: Path, steps: int, warmup: int, per_step: int, bf16: bool) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    stamps, lengths = [], []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.process_time())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    cfg = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=GROUP * per_step, num_generations=GROUP,
                     max_completion_length=NEW_TOKENS, beta=BETA, learning_rate=LR, use_cpu=True, max_steps=steps,
                     logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True, bf16=bf16,
                     temperature=1.0, seed=0)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=Dataset.from_dict({"prompt": prompts(max(64, steps * per_step))}),
                          processing_class=AutoTokenizer.from_pretrained(str(folder)), callbacks=[Clock()])
    trainer.train()
    elapsed = stamps[-1] - stamps[warmup - 1]
    tokens = sum(lengths[warmup:]) * GROUP * per_step
    return {"steps_per_s": (steps - warmup) / elapsed, "tokens_per_s": tokens / elapsed}


def run_sampler(folder: Path, repeats: int = 3) -> dict:
    """Completion tokens/s of `core.sampling.sample` vs `model.generate(do_sample=True)`, one prompt × 8, 32 tokens."""
    from rlhflab.core.sampling import sample
    from rlhflab.models.loading import load_causal_lm, load_tokenizer

    model, tokenizer = load_causal_lm(str(folder)).eval(), load_tokenizer(str(folder))
    ids = [tokenizer.bos_token_id, *tokenizer(prompts(1)[0], add_special_tokens=False)["input_ids"]]
    never = len(tokenizer) + 1  # an EOS the model never emits: both sides generate every token

    def ours() -> int:
        s = sample(model, [ids], GROUP, NEW_TOKENS, 1.0, stop_token_ids=[never], pad_token_id=tokenizer.pad_token_id)
        return int(s.response_mask.sum())

    def generate() -> int:
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids] * GROUP), attention_mask=torch.ones(GROUP, len(ids), dtype=torch.long),
                                 do_sample=True, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=never, top_k=0)
        return (out.shape[1] - len(ids)) * GROUP

    best = {}
    for name, fn in (("sample", ours), ("generate", generate)):
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            tokens = fn()
            times.append(time.perf_counter() - start)
        best[f"{name}_tokens_per_s"] = tokens / min(times)
    return best


def run_floor(folder: Path, per_step: int, precision: str, repeats: int = 20) -> dict:
    """Steps/s if a GRPO step were nothing but its matmuls, run by the same kernels (MKL / oneDNN).

    One step of the benchmark multiplies by every weight matrix: 31 decode steps of 8 rows a prompt
    (plus a 22-token prefill a prompt), then the reference forward, the policy forward and its
    backward over a packed row of 288 tokens a prompt (prompt once + 8 x 32 completion tokens,
    rounded up to 16). The
    backward multiplies twice per weight (input and weight gradient). Attention, norms, sampling
    and Python are left out, so no implementation of this step can beat this rate on this machine
    with these kernels: floor_steps_per_s / TRL steps/s bounds the achievable ratio.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(folder))
    hidden, inner = config.hidden_size, config.intermediate_size
    head_dim = hidden // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    # (out, in) of each weight of a layer, separate as in the model; the decode step stacks q/k/v and gate/up
    layer = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (inner, hidden), (inner, hidden), (hidden, inner)]
    decode_layer = [(hidden + 2 * kv, hidden), (hidden, hidden), (2 * inner, hidden), (hidden, inner)]
    lm_head = (config.vocab_size, hidden)

    def weights(shapes: list[tuple[int, int]]) -> list[torch.Tensor]:
        return [torch.randn(*shape, dtype=dtype) / shape[1] ** 0.5 for shape in shapes]

    train_w = weights(layer * config.num_hidden_layers + [lm_head])
    decode_w = weights(decode_layer * config.num_hidden_layers + [lm_head])
    tokens = 288 * per_step
    inputs = {(rows, width): torch.randn(rows, width, dtype=dtype)
              for rows in (GROUP * per_step, 22 * per_step, tokens) for width in {hidden, inner, config.vocab_size}}

    def step() -> None:
        for rows, count in ((22 * per_step, 1), (GROUP * per_step, NEW_TOKENS - 1)):  # prefill, then one decode step per new token but the last
            for _ in range(count):
                for w in decode_w:
                    torch.nn.functional.linear(inputs[rows, w.shape[1]], w)
        for _ in range(2):  # reference forward, policy forward
            for w in train_w:
                torch.nn.functional.linear(inputs[tokens, w.shape[1]], w)
        for w in train_w:  # backward: input gradient [T, out] @ [out, in], weight gradient [out, T] @ [T, in]
            inputs[tokens, w.shape[0]] @ w
            inputs[tokens, w.shape[0]].t() @ inputs[tokens, w.shape[1]]

    with torch.inference_mode():
        step()
        times = []
        for _ in range(repeats):
            start = time.process_time()
            step()
            times.append(time.process_time() - start)
    return {"steps_per_s": 1 / statistics.median(times)}


SIDES = {  # name -> f(folder, steps, warmup, prompts per step)
    "rlhflab": lambda *a: run_ours(*a, precision="fp32"),
    "trl-fp32": lambda *a: run_trl(*a, bf16=False),
    "rlhflab-bf16": lambda *a: run_ours(*a, precision="bf16"),
    "trl": lambda *a: run_trl(*a, bf16=True),
    "floor": lambda folder, steps, warmup, per_step: run_floor(folder, per_step, "fp32"),
    "floor-bf16": lambda folder, steps, warmup, per_step: run_floor(folder, per_step, "bf16"),
}
SAME_PRECISION = {"trl-fp32": "rlhflab", "trl": "rlhflab-bf16"}  # each TRL side and the rlhflab side it is compared with
FLOOR = {"trl-fp32": "floor", "trl": "floor-bf16"}  # each TRL side and the matmul floor at its precision


def side(name: str, folder: Path, steps: int, warmup: int, per_step: int) -> None:
    torch.set_num_threads(1)
    result = SIDES[name](folder, steps, warmup, per_step) if name != "sampler" else run_sampler(folder)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=1, help="prompts per step, each with a group of 8 completions")
    parser.add_argument("--side", choices=[*SIDES, "sampler"], default=None)
    parser.add_argument("--sides", default="sampler,floor,floor-bf16,rlhflab,trl-fp32,rlhflab-bf16,trl")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over all sides, interleaved; medians are reported")
    parser.add_argument("--folder", type=Path, default=None)
    args = parser.parse_args()
    if args.side:
        side(args.side, args.folder, args.steps, args.warmup, args.prompts)
        return
    folder = Path(tempfile.mkdtemp()) / "model"
    build_model_folder(folder)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    rounds: dict[str, list[dict]] = {}
    for _ in range(args.repeats):  # interleaved, so a slow spell of the shared machine hits every side
        for name in args.sides.split(","):
            proc = subprocess.run([sys.executable, __file__, "--side", name, "--folder", str(folder), "--steps",
                                   str(args.steps), "--warmup", str(args.warmup), "--prompts", str(args.prompts)],
                                  capture_output=True, text=True, env=env)  # fmt: skip
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if not line:
                raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
            rounds.setdefault(name, []).append(json.loads(line[0][len("RESULT "):]))
    results = {name: {key: statistics.median(r[key] for r in runs) for key in runs[0]} for name, runs in rounds.items()}
    print(f"medians of {args.repeats} interleaved rounds; per-round ratios in brackets")
    for trl_side, ours_side in SAME_PRECISION.items():
        if trl_side not in results or ours_side not in results:
            continue
        ours, trl = results[ours_side], results[trl_side]
        print(f"\n| | {ours_side} | {trl_side} | ratio |\n|---|---|---|---|")
        for key, label in (("steps_per_s", "steps/s"), ("tokens_per_s", "completion tokens/s"), ("peak_rss_mb", "peak RSS (MB)")):
            per_round = ", ".join(f"{a[key] / b[key]:.2f}" for a, b in zip(rounds[ours_side], rounds[trl_side], strict=True))
            print(f"| {label} | {ours[key]:.2f} | {trl[key]:.2f} | {ours[key] / trl[key]:.2f}× ({per_round}) |")
    for trl_side, floor_side in FLOOR.items():
        if trl_side in results and floor_side in results:
            floor, trl = results[floor_side]["steps_per_s"], results[trl_side]["steps_per_s"]
            print(f"\nmatmul floor ({floor_side}): {floor:.2f} steps/s, {floor / trl:.2f}× {trl_side}: "
                  "no implementation with these kernels gets a higher ratio")
    if "sampler" in results:
        s = results["sampler"]
        print(f"\nsampler: {s['sample_tokens_per_s']:.0f} tokens/s vs model.generate {s['generate_tokens_per_s']:.0f} "
              f"tokens/s ({s['sample_tokens_per_s'] / s['generate_tokens_per_s']:.2f}×)")


if __name__ == "__main__":
    main()
