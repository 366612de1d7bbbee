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

Real model (`--model FOLDER`, e.g. a converted SmolLM2-135M-Instruct): that folder instead of the random
Llama, chat prompts (a user message asking for a long review, so completions run to the limit on both sides)
and a cheap length reward on the completion's text; the issue's sizes are `--prompts 2 --new-tokens 64`.
A `-lora` suffix on an rlhflab or TRL side adds LoRA (rlhflab's `--lora-*` options, peft's LoraConfig for TRL;
LORA below; with --model the -lora sides run by default). `floor` / `floor-bf16`: the step's matmuls alone
(`run_floor`); `sampler` / `sampler-bf16`: rlhflab's sampler against `model.generate` (`run_sampler`).

    pip install trl --no-deps   (plus its missing dependencies with --no-deps; torch stays as it is)
    .venv/bin/python benchmarks/grpo_vs_trl.py [--steps 12] [--warmup 2] [--repeats 3]
    .venv/bin/python benchmarks/grpo_vs_trl.py --model FOLDER --prompts 2 --new-tokens 64 --steps 6 --warmup 1
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

GROUP, BETA, LR = 8, 0.04, 1e-5
LORA = {"r": 16, "alpha": 32, "dropout": 0.05,  # the same adapters on both sides (q, k, v, o, gate, up, down)
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
ITEMS = ("phone", "laptop", "camera", "blender", "movie", "book", "game", "headphones")


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


def prompts(n: int, chat: bool = False) -> list:
    """Review openings lengthened with a full review in front (≈21 tokens each); `chat`: user messages
    asking for a long review (≈40 tokens with SmolLM2's template and default system message)."""
    from rlhflab.tasks import get_task

    if chat:
        return [[{"role": "user", "content": f"Write a long, detailed review of the {ITEMS[i % len(ITEMS)]} you bought "
                  f"last month ({i}): what you liked, what you did not, and whether you would recommend it."}]
                for i in range(n)]  # fmt: skip
    task = get_task("reviews")
    return [f"{doc} {p}" for doc, p in zip(task.pretrain_corpus(n, seed=1), task.train_prompts(n, seed=2), strict=True)]


def reward(prompts: list, completions: list, **kwargs) -> list[float]:
    """The reviews gold reward; for chat completions (TRL's [{"role": "assistant", ...}]) a cheap length reward."""
    from rlhflab.tasks import reviews_reward

    if completions and isinstance(completions[0], list):
        return [min(len(c[-1]["content"]), 400) / 400 for c in completions]
    return reviews_reward(prompts, completions)


def prompt_file(args: argparse.Namespace, n: int) -> Path:
    """The run's prompts as a prompt-only JSONL (strings, or chat messages with --model)."""
    path = Path(tempfile.mkdtemp()) / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts(n, args.chat)))
    return path


def run_ours(args: argparse.Namespace, precision: str) -> dict:
    """`rlhflab grpo` as a user runs it (the stage function: model folder, prompt file, --reward-fn)."""
    from rlhflab.algorithms import grpo
    from rlhflab.algorithms.grpo import GRPOConfig
    from rlhflab.stages.train import grpo as grpo_stage
    from rlhflab.training.metrics import read_metrics

    stamps = []  # CPU clock at the start of each step, and at the end of the run
    plan_step = grpo.GRPORecipe.plan_step
    grpo.GRPORecipe.plan_step = lambda self, step: stamps.append(time.process_time()) or plan_step(self, step)
    out = Path(tempfile.mkdtemp())
    lora = {f"lora_{k}": v for k, v in LORA.items()} if args.lora else {}
    cfg = GRPOConfig(out=str(out), model=str(args.folder), data=str(prompt_file(args, args.steps * args.prompts)),
                     reward_fn=f"{Path(__file__).resolve()}:reward", max_steps=args.steps, batch_size=args.prompts, group_size=GROUP,
                     max_new_tokens=args.new_tokens, beta=BETA, lr=LR, loss_agg="token_mean", threads=1,
                     progress=False, max_prompt_tokens=256, precision=precision, eval_temperatures=[],
                     packed_row_tokens=max(512, 256 + GROUP * args.new_tokens), **lora)  # one group a row at most
    grpo_stage(cfg)
    stamps.append(time.process_time())  # includes the final checkpoint and model save: counted against us
    rows = [r for r in read_metrics(out) if "completions/mean_length" in r]
    elapsed = stamps[-1] - stamps[args.warmup]
    # completion tokens counted as TRL's side counts them (the loop's num_tokens is cumulative and has the prompts)
    tokens = sum(r["completions/mean_length"] for r in rows[args.warmup :]) * GROUP * args.prompts
    return {"steps_per_s": (args.steps - args.warmup) / elapsed, "tokens_per_s": tokens / elapsed}


def run_trl(args: argparse.Namespace, bf16: bool) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    stamps, lengths = [], []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.process_time())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    per_step, warmup = args.prompts, args.warmup
    cfg = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=GROUP * per_step, num_generations=GROUP,
                     max_completion_length=args.new_tokens, beta=BETA, learning_rate=LR, use_cpu=True,
                     max_steps=args.steps, logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
                     bf16=bf16, temperature=1.0, seed=0)
    peft = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules=LORA["target_modules"], task_type="CAUSAL_LM") if args.lora else None
    model = AutoModelForCausalLM.from_pretrained(str(args.folder), dtype=torch.float32)
    dataset = Dataset.from_list([{"prompt": p} for p in prompts(max(64, args.steps * per_step), args.chat)])
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=dataset, peft_config=peft,
                          processing_class=AutoTokenizer.from_pretrained(str(args.folder)), callbacks=[Clock()])
    trainer.train()
    elapsed = stamps[-1] - stamps[warmup - 1]
    tokens = sum(lengths[warmup:]) * GROUP * per_step
    return {"steps_per_s": (args.steps - warmup) / elapsed, "tokens_per_s": tokens / elapsed}


def first_prompt_ids(args: argparse.Namespace, tokenizer) -> list[int]:
    """The first prompt's ids as rlhflab's collator builds them (chat template and BOS rule): both sides use them."""
    from rlhflab.data.collate import tokenize_prompt

    return tokenize_prompt(tokenizer, prompts(1, args.chat)[0], None).prompt_ids


def run_sampler(args: argparse.Namespace, repeats: int = 3) -> dict:
    """Completion tokens/s of `core.sampling.sample` vs `model.generate(do_sample=True)`, one prompt × 8, full length."""
    from rlhflab.core.sampling import sample
    from rlhflab.models.loading import load_causal_lm, load_tokenizer

    model, tokenizer = load_causal_lm(str(args.folder)).eval(), load_tokenizer(str(args.folder))
    ids, new = first_prompt_ids(args, tokenizer), args.new_tokens
    never = len(tokenizer) + 1  # an EOS the model never emits: both sides generate every token
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16)  # TRL's bf16=True, our --precision bf16

    def ours() -> int:
        with autocast:
            s = sample(model, [ids], GROUP, new, 1.0, stop_token_ids=[never], pad_token_id=tokenizer.pad_token_id)
        return int(s.response_mask.sum())

    def generate() -> int:
        with torch.inference_mode(), autocast:
            out = model.generate(torch.tensor([ids] * GROUP), attention_mask=torch.ones(GROUP, len(ids), dtype=torch.long),
                                 do_sample=True, max_new_tokens=new, min_new_tokens=new,
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


def layer_shapes(config, stacked: bool = False) -> list[tuple[int, int]]:
    """(out, in) of each weight of one decoder layer, separate as in the model, or as the decode step stacks
    them (q/k/v and gate/up)."""
    hidden, inner = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    if stacked:
        return [(q + 2 * kv, hidden), (hidden, q), (2 * inner, hidden), (hidden, inner)]
    return [(q, hidden), (kv, hidden), (kv, hidden), (hidden, q), (inner, hidden), (inner, hidden), (hidden, inner)]


class Matmuls:
    """Random weights of a model's shapes and random inputs, to time nothing but its matmuls (the `floor` sides)."""

    def __init__(self, config, precision: str):
        self.config, self.dtype = config, torch.bfloat16 if precision == "bf16" else torch.float32
        self.head = self.weights([(config.vocab_size, config.hidden_size)])[0]
        self.layers = self.weights(layer_shapes(config) * config.num_hidden_layers)
        self.inputs: dict[tuple[int, int], torch.Tensor] = {}

    def weights(self, shapes: list[tuple[int, int]]) -> list[torch.Tensor]:
        return [torch.randn(*shape, dtype=self.dtype) / shape[1] ** 0.5 for shape in shapes]

    def x(self, rows: int, width: int) -> torch.Tensor:
        if (rows, width) not in self.inputs:
            self.inputs[rows, width] = torch.randn(rows, width, dtype=self.dtype)
        return self.inputs[rows, width]

    def forward(self, weights: list[torch.Tensor], tokens: int, head_rows: int) -> None:
        for w in weights:
            torch.nn.functional.linear(self.x(tokens, w.shape[1]), w)
        torch.nn.functional.linear(self.x(head_rows, self.head.shape[1]), self.head)

    def backward(self, tokens: int, head_rows: int) -> None:
        """Input gradient [T, out] @ [out, in] and weight gradient [out, T] @ [T, in] of every weight."""
        for w, rows in [*((w, tokens) for w in self.layers), (self.head, head_rows)]:
            self.x(rows, w.shape[0]) @ w
            self.x(rows, w.shape[0]).t() @ self.x(rows, w.shape[1])

    def seconds(self, step, repeats: int = 20) -> float:
        """Median CPU seconds of `step()`, after one warm-up call."""
        with torch.inference_mode():
            step()
            times = []
            for _ in range(repeats):
                start = time.process_time()
                step()
                times.append(time.process_time() - start)
        return statistics.median(times)


def run_floor(args: argparse.Namespace, precision: str) -> dict:
    """Steps/s if a GRPO step were nothing but its matmuls, run by the same kernels (MKL / oneDNN).

    One step multiplies by every weight matrix: a prefill of each prompt (LM head on its last position), then
    new_tokens − 1 decode steps of 8 rows a prompt (q/k/v and gate/up stacked, as rlhflab's decode step does), then
    the reference forward, the policy forward and its backward over one packed row a prompt (prompt once +
    8 × new_tokens completion tokens, rounded up to 16), with the LM head only on the completion positions
    (as rlhflab's packed forward does). The backward multiplies twice per weight (input and weight gradient).
    Attention, norms, sampling and Python are left out, so no implementation of this step can beat this rate on
    this machine with these kernels: floor_steps_per_s / TRL steps/s bounds the achievable ratio.
    """
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(str(args.folder))
    prompt = len(first_prompt_ids(args, AutoTokenizer.from_pretrained(str(args.folder))))
    m = Matmuls(config, precision)
    decode = m.weights(layer_shapes(config, stacked=True) * config.num_hidden_layers)
    rows, completion = GROUP * args.prompts, GROUP * args.new_tokens * args.prompts
    tokens = -(-(prompt + GROUP * args.new_tokens) // 16) * 16 * args.prompts

    def step() -> None:
        m.forward(decode, prompt * args.prompts, args.prompts)  # prefill
        for _ in range(args.new_tokens - 1):  # one decode step per new token but the last
            m.forward(decode, rows, rows)
        for _ in range(2):  # reference forward, policy forward
            m.forward(m.layers, tokens, completion)
        m.backward(tokens, completion)

    return {"steps_per_s": 1 / m.seconds(step)}


SIDES = {  # name -> f(args)
    "rlhflab": lambda a: run_ours(a, precision="fp32"),
    "trl-fp32": lambda a: run_trl(a, bf16=False),
    "rlhflab-bf16": lambda a: run_ours(a, precision="bf16"),
    "trl": lambda a: run_trl(a, bf16=True),
    "floor": lambda a: run_floor(a, "fp32"),
    "floor-bf16": lambda a: run_floor(a, "bf16"),
    "sampler": run_sampler,
}
SAME_PRECISION = {"trl-fp32": "rlhflab", "trl": "rlhflab-bf16"}  # each TRL side and the rlhflab side it is compared with
FLOOR = {"trl-fp32": "floor", "trl": "floor-bf16"}  # each TRL side and the matmul floor at its precision


def side(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    result = SIDES[args.side](args)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def side_command(args: argparse.Namespace, name: str, folder: Path) -> list[str]:
    """The child's command line: one side, with the run's settings (a `-lora` side adds --lora, a `sampler-bf16`
    side --bf16)."""
    base = name.removesuffix("-lora")
    flags = ["--lora"] if name.endswith("-lora") else []
    flags += ["--chat"] if args.model else []
    if base == "sampler-bf16":
        base, flags = "sampler", [*flags, "--bf16"]
    return [sys.executable, __file__, "--side", base, "--folder", str(folder), "--steps", str(args.steps), "--warmup",
            str(args.warmup), "--prompts", str(args.prompts), "--new-tokens", str(args.new_tokens), *flags]


def print_tables(results: dict[str, dict], rounds: dict[str, list[dict]], repeats: int) -> None:
    print(f"medians of {repeats} interleaved rounds; per-round ratios in brackets")
    pairs = {**SAME_PRECISION, **{f"{t}-lora": f"{o}-lora" for t, o in SAME_PRECISION.items()}}
    for trl_side, ours_side in pairs.items():
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
    for name in ("sampler", "sampler-bf16"):
        if name in results:
            s = results[name]
            print(f"\n{name}: {s['sample_tokens_per_s']:.0f} tokens/s vs model.generate {s['generate_tokens_per_s']:.0f} "
                  f"tokens/s ({s['sample_tokens_per_s'] / s['generate_tokens_per_s']:.2f}×)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=1, help="prompts per step, each with a group of 8 completions")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--model", type=Path, default=None, help="a model folder with a chat template (chat prompts)")
    parser.add_argument("--sides", default=None, help="comma-separated; a `-lora` suffix on rlhflab/trl sides adds LoRA")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over all sides, interleaved; medians are reported")
    parser.add_argument("--out", type=Path, default=None, help="write the medians and every round here as JSON")
    parser.add_argument("--side", choices=list(SIDES), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, default=None, help=argparse.SUPPRESS)
    for flag in ("--chat", "--lora", "--bf16"):
        parser.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        side(args)
        return
    default_sides = "sampler,floor,floor-bf16,rlhflab,trl-fp32,rlhflab-bf16,trl"
    if args.model:  # the real model: LoRA sides and the bf16 sampler too
        default_sides += ",sampler-bf16,rlhflab-lora,trl-fp32-lora,rlhflab-bf16-lora,trl-lora"
    folder = args.model
    if folder is None:
        folder = Path(tempfile.mkdtemp()) / "model"
        build_model_folder(folder)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    rounds: dict[str, list[dict]] = {}
    for _ in range(args.repeats):  # interleaved, so a slow spell of the shared machine hits every side
        for name in (args.sides or default_sides).split(","):
            proc = subprocess.run(side_command(args, name, folder), capture_output=True, text=True, env=env)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if not line:
                raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
            rounds.setdefault(name, []).append(json.loads(line[0][len("RESULT "):]))
            print(name, line[0][len("RESULT "):], flush=True)
    results = {name: {key: statistics.median(r[key] for r in runs) for key in runs[0]} for name, runs in rounds.items()}
    print_tables(results, rounds, args.repeats)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "medians": results,
                                        "rounds": rounds}, indent=1))


if __name__ == "__main__":
    main()
