"""rlhflab DPO vs TRL's DPOTrainer: same model folder, same JSONL pairs, same steps, one thread each.

    .venv/bin/python benchmarks/dpo_vs_trl.py --size 5m --steps 30 [--batch-size 8] [--out /tmp/dpo_bench]

Builds (once, under --out) a Llama of the given size with the `reviews` tokenizer and a JSONL of
`reviews` preference pairs (each prompt + chosen + rejected, responses two reviews long), then
runs each side as its own command, one after the other, with OMP_NUM_THREADS=1:

    rlhflab:  rlhflab dpo --model M --data D --max-steps S --batch-size B --threads 1 [--precision bf16] ...
    TRL:      DPOTrainer(DPOConfig(per_device_train_batch_size=B, max_steps=S, max_length=128, ...))
              with its default live reference, and with precompute_ref_log_probs=True (--trl-precompute)

Sides (--sides): rlhflab, rlhflab-bf16, trl, trl-fp32, trl-precompute; a `-lora` suffix on any of the first
four trains LoRA adapters on both sides (rlhflab's --lora-* flags, peft's LoraConfig for TRL, the same r, alpha,
dropout and targets: grpo_vs_trl.LORA; the reference is the base with adapters off on both), and a `-gc` suffix
(last) turns on gradient checkpointing on both (rlhflab's --gradient-checkpointing, TRL's gradient_checkpointing). `floor` and
`floor-bf16` time nothing but the step's matmuls (`floor_side`). TRL's default is bf16=True:
on a CPU with bf16 instructions (avx512_bf16 / AMX) accelerate runs every forward under bf16
autocast, so `trl` is compared with `rlhflab-bf16` and `trl-fp32` (bf16=False) with `rlhflab`.

Real model (`--model FOLDER`, a save_pretrained folder with a chat template, e.g. a converted
SmolLM2-135M-Instruct): that folder instead of the random Llama, and conversational pairs instead
(`chat_pairs`: a user message of ≈100 tokens, chosen and rejected assistant messages of ≈100 tokens
each, built from the `reviews` grammar; one JSONL for every side), max 128 prompt + 128 response tokens:

    .venv/bin/python benchmarks/dpo_vs_trl.py --model FOLDER --steps 10 --max-row-tokens 1024

and reports per side: the training loop's steps/s and pairs/s, pair tokens/s (|x| + |y_c| + |y_r|
per pair: the same count for both sides), the whole command's time (start to exit: imports,
tokenization, reference pass, training, saving) and its peak RSS (`os.wait4` of that child).
Loop speeds are per CPU second of the loop (`time.process_time()` around rlhflab's `train` and
TRL's `trainer.train()`): with one thread that is the wall time of an idle machine, and it does
not depend on what else shares the cores. Command times are given as wall and CPU seconds. Both sides save the final
model. TRL is needed only for its side (`pip install trl --no-deps` plus accelerate).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from grpo_vs_trl import LORA

SIZES = {  # hidden, layers, heads, MLP width (vocab 512, tied embeddings)
    "5m": {"hidden_size": 256, "num_hidden_layers": 6, "num_attention_heads": 4, "intermediate_size": 768},
    "30m": {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, "intermediate_size": 1728},
}


def prepare(root: Path, args: argparse.Namespace) -> tuple[Path, Path, dict[str, float]]:
    """The model folder (--model, else a Llama of --size built under `root`) and a pairs JSONL (reused when present)."""
    if args.model:
        data = root / f"chat-pairs-{args.num_pairs}.jsonl"
        if not data.exists():
            chat_pairs(data, Path(args.model), args.num_pairs)
        return Path(args.model), data, data_stats(Path(args.model), data)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhflab.models.tokenizer import train_tokenizer
    from rlhflab.tasks.reviews import ReviewsTask

    task = ReviewsTask()
    model_dir, data = root / f"model-{args.size}", root / "pairs.jsonl"
    if not data.exists():
        pairs = task.constructed_pairs(2 * args.num_pairs, seed=0)
        with data.open("w") as f:  # a longer prompt and responses (≈ the issue's 21 / 34 tokens)
            for a, b in zip(pairs[0::2], pairs[1::2], strict=True):
                row = {"prompt": a["prompt"] + " ." + a["chosen"] + " " + b["prompt"],
                       "chosen": b["chosen"] + a["chosen"], "rejected": b["rejected"] + a["rejected"]}  # fmt: skip
                f.write(json.dumps(row) + "\n")
    if not model_dir.exists():
        tokenizer = train_tokenizer(task.pretrain_corpus(4000, seed=0), vocab_size=512)
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=len(tokenizer), max_position_embeddings=256, tie_word_embeddings=True,
            num_key_value_heads=SIZES[args.size]["num_attention_heads"], bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **SIZES[args.size],
        )  # fmt: skip
        LlamaForCausalLM(config).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    return model_dir, data, data_stats(model_dir, data)


def chat_pairs(path: Path, model: Path, n: int, tokens: int = 100) -> None:
    """`n` conversational pairs, deterministic: the user shows `reviews` grammar reviews and asks for a longer
    one (the prompt with the chat template's own tokens ≈ `tokens`); chosen: positive reviews, rejected: negative
    ones (gold valence > 0 / < 0), each ≈ `tokens` tokens."""
    from itertools import cycle

    from transformers import AutoTokenizer

    from rlhflab.tasks.reviews import ReviewsTask, reviews_reward

    tokenizer = AutoTokenizer.from_pretrained(model)
    docs, shown = ReviewsTask().pretrain_corpus(30 * n, seed=0), ReviewsTask().pretrain_corpus(10 * n, seed=1)
    gold = reviews_reward([""] * len(docs), [" " + d for d in docs])
    size = {d: len(tokenizer.encode(" " + d, add_special_tokens=False)) for d in docs + shown}
    pools = {"any": cycle(shown), "positive": cycle([d for d, g in zip(docs, gold, strict=True) if g > 0]),
             "negative": cycle([d for d, g in zip(docs, gold, strict=True) if g < 0])}  # fmt: skip

    def text(pool: str, budget: int) -> str:
        chosen: list[str] = []
        while sum(size[d] for d in chosen) < budget:
            chosen.append(next(pools[pool]))
        return " ".join(chosen)

    frame = [{"role": "user", "content": "Some customer reviews:\n\nWrite a longer review in the same style."}]
    overhead = len(tokenizer.encode(tokenizer.apply_chat_template(frame, tokenize=False, add_generation_prompt=True),
                                    add_special_tokens=False))  # fmt: skip
    with path.open("w") as f:
        for _ in range(n):
            user = f"Some customer reviews:\n{text('any', tokens - overhead)}\nWrite a longer review in the same style."
            row = {"prompt": [{"role": "user", "content": user}],
                   "chosen": [{"role": "assistant", "content": text("positive", tokens)}],
                   "rejected": [{"role": "assistant", "content": text("negative", tokens)}]}  # fmt: skip
            f.write(json.dumps(row) + "\n")


def data_stats(model_dir: Path, data: Path) -> dict[str, float]:
    """Mean tokens per pair as rlhflab's collator builds them (chat template, BOS, EOS), no truncation."""
    from transformers import AutoModelForCausalLM

    from rlhflab.data.collate import tokenize_preference
    from rlhflab.data.loading import load_preferences
    from rlhflab.models.loading import load_tokenizer

    tokenizer = load_tokenizer(str(model_dir))
    pairs = [tokenize_preference(tokenizer, ex, None, None) for ex in load_preferences(data)]
    n = [(len(c.prompt_ids), len(c.completion_ids), len(r.completion_ids)) for c, r in pairs]
    return {
        "pairs": len(n),
        "prompt_tokens": sum(x for x, _, _ in n) / len(n),
        "response_tokens": sum(c + r for _, c, r in n) / (2 * len(n)),
        "pair_tokens": sum(x + c + r for x, c, r in n) / len(n),
        "parameters": AutoModelForCausalLM.from_pretrained(model_dir).num_parameters(),
    }


def run_child(cmd: list[str], log: Path) -> tuple[float, float, float, int]:
    """(wall seconds, CPU seconds, peak RSS MiB, exit code) of one command, measured from here."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    with log.open("w") as f:
        process = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
    cpu = usage.ru_utime + usage.ru_stime  # robust to other processes sharing the cores; wall is not
    return time.perf_counter() - started, cpu, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status)


def run_rlhflab(model: Path, data: Path, out: Path, args: argparse.Namespace, precision: str, lora: bool,
                checkpointing: bool = False) -> dict[str, float]:  # fmt: skip
    cmd = [sys.executable, __file__, "--rlhflab-child", "dpo", "--model", str(model),
           "--data", str(data), "--out", str(out), "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--lr", str(args.lr), "--threads", "1", "--eval-fraction", "0", "--no-progress",
           "--max-prompt-tokens", str(args.max_prompt_tokens), "--max-completion-tokens", str(args.max_completion_tokens),
           "--no-share-reference-cache", "--max-row-tokens", str(args.max_row_tokens), "--precision", precision,
           "--eval-temperatures", ""]  # fmt: skip
    if lora:
        cmd += ["--lora-r", str(LORA["r"]), "--lora-alpha", str(LORA["alpha"]), "--lora-dropout", str(LORA["dropout"]),
                "--lora-target-modules", ",".join(LORA["target_modules"])]  # fmt: skip
    cmd += ["--gradient-checkpointing"] if checkpointing else []
    wall, cpu, rss, code = run_child(cmd, out.with_suffix(".log"))
    if code != 0:
        raise SystemExit(f"{out.name} failed:\n{out.with_suffix('.log').read_text()[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    loop = json.loads((out / "loop_cpu.json").read_text())
    return {"loop_seconds": rows[-1]["time"], "loop_cpu": loop["loop_cpu"], "wall": wall, "cpu": cpu, "rss": rss,
            "exit": code, "first_loss": rows[0]["loss"]}  # fmt: skip


def rlhflab_child(cli_args: list[str]) -> None:
    """`rlhflab dpo ...` as the CLI runs it, with the CPU seconds of the training loop recorded."""
    import rlhflab.algorithms.dpo as dpo
    from rlhflab.cli import app

    train = dpo.train

    def timed_train(cfg, *a, **kw):
        started = time.process_time()
        try:
            return train(cfg, *a, **kw)
        finally:
            Path(cfg.out, "loop_cpu.json").write_text(json.dumps({"loop_cpu": time.process_time() - started}))

    dpo.train = timed_train
    app(cli_args, standalone_mode=False)


def run_trl(model: Path, data: Path, out: Path, args: argparse.Namespace, precompute: bool, bf16: bool, lora: bool,
            checkpointing: bool = False) -> dict[str, float]:  # fmt: skip
    cmd = [sys.executable, __file__, "--trl-child", "--model", str(model), "--data", str(data), "--out", str(out),
           "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
           "--max-prompt-tokens", str(args.max_prompt_tokens), "--max-completion-tokens", str(args.max_completion_tokens)]  # fmt: skip
    cmd += (["--trl-precompute"] if precompute else []) + ([] if bf16 else ["--trl-fp32"]) + (["--lora"] if lora else [])
    cmd += ["--gradient-checkpointing"] if checkpointing else []
    wall, cpu, rss, code = run_child(cmd, out.with_suffix(".log"))
    result = json.loads((out / "trl_result.json").read_text()) if code == 0 else {"loop_cpu": float("nan")}
    return {**result, "wall": wall, "cpu": cpu, "rss": rss, "exit": code}


def trl_child(args: argparse.Namespace) -> None:
    """TRL's side, in its own process: load, train with DPOTrainer, save, write the loop time."""
    import torch

    torch.set_num_threads(1)
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    config = DPOConfig(
        output_dir=args.out, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
        learning_rate=args.lr, max_length=args.max_prompt_tokens + args.max_completion_tokens, logging_steps=1,
        report_to=[], save_strategy="no", use_cpu=True, dataloader_num_workers=0,
        precompute_ref_log_probs=args.trl_precompute, lr_scheduler_type="cosine", disable_tqdm=True, seed=0,
        bf16=not args.trl_fp32, gradient_checkpointing=args.gradient_checkpointing,
    )  # fmt: skip
    peft = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules=LORA["target_modules"], task_type="CAUSAL_LM") if args.lora else None
    dataset = load_dataset("json", data_files=args.data, split="train")
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=peft)
    started = time.process_time()
    output = trainer.train()
    loop_cpu = time.process_time() - started
    trainer.save_model(args.out + "/model")
    logs = [h for h in trainer.state.log_history if "loss" in h]
    result = {"loop_seconds": output.metrics["train_runtime"], "loop_cpu": loop_cpu, "first_loss": logs[0]["loss"]}
    Path(args.out, "trl_result.json").write_text(json.dumps(result))


def floor_side(model: Path, stats: dict[str, float], args: argparse.Namespace, precision: str) -> dict[str, float]:
    """The loop's CPU seconds if each DPO step were nothing but its matmuls (same kernels: MKL / oneDNN).

    A step over `batch_size` pairs of the data's mean size, packed (each prompt once, each response's last token
    left out of the rows, as rlhflab packs them): the reference forward and the policy forward over those tokens,
    the LM head only on the positions that predict a response token, and the policy's backward (input and weight
    gradient of every weight). Attention, norms, the loss, the optimizer and Python are left out; run in this
    process (no command, so its command time and RSS are not a side's).
    """
    import torch
    from grpo_vs_trl import Matmuls
    from transformers import AutoConfig

    torch.set_num_threads(1)
    m = Matmuls(AutoConfig.from_pretrained(model), precision)
    tokens = round(args.batch_size * (stats["pair_tokens"] - 2))
    head_rows = round(args.batch_size * 2 * stats["response_tokens"])

    def step() -> None:
        for _ in range(2):  # reference forward, policy forward
            m.forward(m.layers, tokens, head_rows)
        m.backward(tokens, head_rows)

    seconds = m.seconds(step, repeats=5) * args.steps
    return {"loop_seconds": seconds, "loop_cpu": seconds, "wall": float("nan"), "cpu": float("nan"),
            "rss": float("nan"), "exit": 0}  # fmt: skip


def same_precision(name: str) -> str:
    """The rlhflab side a side is compared with: the same precision and the same LoRA setting."""
    gc = "-gc" if name.endswith("-gc") else ""
    name = name.removesuffix("-gc")
    lora = "-lora" if name.endswith("-lora") else ""
    bf16 = name.removesuffix("-lora") in ("trl", "rlhflab-bf16", "floor-bf16")
    return "rlhflab" + ("-bf16" if bf16 else "") + lora + gc


def shown(value: float, spec: str) -> str:
    return "–" if math.isnan(value) else format(value, spec)  # a floor side has no command, a missing base no ratio


def ratio(a: float, b: float) -> str:
    return shown(a / b, ".2f")


def table(results: dict[str, dict[str, float]], stats: dict[str, float], args: argparse.Namespace) -> str:
    """Ratios are rlhflab's over the side's, at the same precision (bf16: rlhflab-bf16 vs trl) and LoRA setting."""
    pairs = args.steps * args.batch_size
    lines = ["| side | steps/s | pairs/s | pair tokens/s | command s (CPU s) | peak RSS MiB | rlhflab pairs/s × | "
             "command × (CPU ×) | RSS × |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in results.items():
        nan = {"loop_cpu": math.nan, "wall": math.nan, "cpu": math.nan, "rss": math.nan}
        base = results.get(same_precision(name), nan)  # no rlhflab side of its kind in this run: no ratios
        pps = pairs / r["loop_cpu"]
        lines.append(
            f"| {name} | {args.steps / r['loop_cpu']:.2f} | {pps:.1f} | {pps * stats['pair_tokens']:.0f} | "
            f"{shown(r['wall'], '.1f')} ({shown(r['cpu'], '.1f')}) | {shown(r['rss'], '.0f')} | "
            f"{ratio(pairs / base['loop_cpu'], pps)} | "
            f"{ratio(base['wall'], r['wall'])} ({ratio(base['cpu'], r['cpu'])}) | {ratio(base['rss'], r['rss'])} |"
        )
    return "\n".join(lines)


def run_side(side: str, model: Path, data: Path, stats: dict[str, float], root: Path, args: argparse.Namespace
             ) -> dict[str, float]:  # fmt: skip
    checkpointing, side_kind = side.endswith("-gc"), side.removesuffix("-gc")
    lora, base = side_kind.endswith("-lora"), side_kind.removesuffix("-lora")
    if base.startswith("floor"):
        return floor_side(model, stats, args, "bf16" if base.endswith("bf16") else "fp32")
    out = root / f"{side}-{Path(args.model).name if args.model else args.size}"
    shutil.rmtree(out, ignore_errors=True)  # a cold start: no reference log-probs cached by an earlier run
    if base.startswith("rlhflab"):
        return run_rlhflab(model, data, out, args, "bf16" if base.endswith("bf16") else "fp32", lora, checkpointing)
    return run_trl(model, data, out, args, precompute=base == "trl-precompute", bf16=base != "trl-fp32", lora=lora,
                   checkpointing=checkpointing)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="5m")
    parser.add_argument("--model", default=None, help="a model folder with a chat template: chat pairs (see above)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--max-row-tokens", type=int, default=256)
    parser.add_argument("--max-prompt-tokens", type=int, default=None, help="default 64, with --model 128")
    parser.add_argument("--max-completion-tokens", type=int, default=None, help="default 64, with --model 128")
    parser.add_argument("--num-pairs", type=int, default=None, help="default 1000, with --model steps × batch size")
    parser.add_argument("--out", default="/tmp/dpo_bench")
    parser.add_argument("--sides", default=None, help="default rlhflab,trl-fp32,rlhflab-bf16,trl; with --model "
                        "also floor, floor-bf16 and the -lora sides")  # fmt: skip
    parser.add_argument("--trl-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--trl-precompute", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--trl-fp32", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--lora", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--gradient-checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    if sys.argv[1:2] == ["--rlhflab-child"]:
        return rlhflab_child(sys.argv[2:])
    args = parser.parse_args()
    real = 128 if args.model else 64
    args.max_prompt_tokens = args.max_prompt_tokens or real
    args.max_completion_tokens = args.max_completion_tokens or real
    if args.trl_child:
        return trl_child(args)
    args.num_pairs = args.num_pairs or (args.steps * args.batch_size if args.model else 1000)
    sides = args.sides or "rlhflab,trl-fp32,rlhflab-bf16,trl" + (
        ",floor,rlhflab-lora,trl-fp32-lora,floor-bf16,rlhflab-bf16-lora,trl-lora" if args.model else "")
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    model, data, stats = prepare(root, args)
    print(json.dumps(stats), flush=True)
    results = {}
    for side in sides.split(","):
        results[side] = run_side(side, model, data, stats, root, args)
        print(side, json.dumps(results[side]), flush=True)
    name = Path(args.model).name if args.model else args.size
    print(f"\n{name}: {stats['parameters'] / 1e6:.2f}M parameters, {args.steps} steps × {args.batch_size} pairs, "
          f"prompt {stats['prompt_tokens']:.1f} tokens, responses {stats['response_tokens']:.1f} tokens, one thread\n")  # fmt: skip
    print(table(results, stats, args))
    (root / f"results-{name}.json").write_text(json.dumps({"stats": stats, "settings": vars(args), "sides": results},
                                                          indent=1))


if __name__ == "__main__":
    main()
