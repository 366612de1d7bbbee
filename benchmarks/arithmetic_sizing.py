"""How hard should the built-in `arithmetic` task be? Train a tiny Llama from scratch for a fixed wall time and
measure greedy exact match on held-out prompts.

Standalone on purpose (char-level tokenizer written here, plain loop): it sizes the task, it does not test rlhflab.
Loss is on the answer (and EOS) only, as SFT would do. The learning rate follows a warm-up + cosine schedule over
the *time* budget, since the step count is not known in advance.

    .venv/bin/python benchmarks/arithmetic_sizing.py --scheme 1+2 --seconds 60
    .venv/bin/python benchmarks/arithmetic_sizing.py --scheme task --steps 600   # shipped task, fixed step count
"""

from __future__ import annotations

import argparse
import hashlib
import math
import random
import time

import torch
import transformers

CHARS = "0123456789+="
PAD, BOS, EOS = 0, 1, 2
CHAR_ID = {c: i + 3 for i, c in enumerate(CHARS)}
ID_CHAR = {i: c for c, i in CHAR_ID.items()}


def encode(text: str) -> list[int]:
    return [CHAR_ID[c] for c in text]


def is_held_out(a: int, b: int) -> bool:
    """About 10% of (a, b) pairs never appear in training."""
    return hashlib.sha256(f"{a}+{b}".encode()).digest()[0] < 26


def all_pairs(scheme: str) -> list[tuple[int, int]]:
    """Every (a, b) the scheme can ask, in both orders where operand widths differ."""
    one, two = range(10), range(10, 100)
    if scheme == "1+1":
        pairs = [(a, b) for a in one for b in one]
    elif scheme == "1+2":
        pairs = [(a, b) for a in one for b in two] + [(b, a) for a in one for b in two]
    elif scheme == "2+2":
        pairs = [(a, b) for a in range(100) for b in range(100)]
    elif scheme == "mix":
        pairs = all_pairs("1+2") + all_pairs("2+2")
    elif scheme == "2+3":
        three = range(100, 1000)
        pairs = [(a, b) for a in range(100) for b in three] + [(b, a) for a in range(100) for b in three]
    elif scheme == "3+3":
        pairs = [(a, b) for a in range(1000) for b in range(1000)]
    else:
        raise ValueError(scheme)
    return sorted(set(pairs))


def task_split(n_train: int, seed: int) -> tuple[list[str], list[str]]:
    """Train prompts and held-out prompts from the shipped task (its own split)."""
    from rlhflab.tasks import get_task

    task = get_task("arithmetic")
    train = sorted(set(task.train_prompts(n_train, seed)))
    train_set = set(train)
    held = [p for p in sorted(set(task.train_prompts(n_train, seed + 1))) if p not in train_set]
    return train, held


def make_batch(prompts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids [B, T] and labels [B, T] with -100 everywhere but the answer and EOS."""
    ids = torch.full((len(prompts), max_len), PAD, dtype=torch.long)
    labels = torch.full((len(prompts), max_len), -100, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        a, b = prompt[:-1].split("+")
        prompt_ids = [BOS] + encode(prompt)
        answer_ids = encode(str(int(a) + int(b))) + [EOS]
        seq = prompt_ids + answer_ids
        ids[row, : len(seq)] = torch.tensor(seq)
        labels[row, len(prompt_ids) : len(seq)] = torch.tensor(answer_ids)
    return ids, labels


@torch.no_grad()
def greedy_exact_match(model: torch.nn.Module, prompts: list[str], max_new: int = 5) -> float:
    """Greedy decode, prompts grouped by length so no padding is needed."""
    model.eval()
    by_len: dict[int, list[str]] = {}
    for p in prompts:
        by_len.setdefault(len(p), []).append(p)
    correct = 0
    for group in by_len.values():
        ids = torch.tensor([[BOS] + encode(p) for p in group])
        out = [""] * len(group)
        done = [False] * len(group)
        for _ in range(max_new):
            nxt = model(input_ids=ids).logits[:, -1].argmax(-1)
            for i, t in enumerate(nxt.tolist()):
                if t == EOS or t not in ID_CHAR:
                    done[i] = True
                elif not done[i]:
                    out[i] += ID_CHAR[t]
            ids = torch.cat([ids, nxt[:, None]], dim=1)
        for p, o in zip(group, out, strict=True):
            a, b = p[:-1].split("+")
            correct += o == str(int(a) + int(b))
    model.train()
    return correct / len(prompts)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scheme", default="1+2", choices=["1+1", "1+2", "2+2", "mix", "2+3", "3+3", "task"])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument(
        "--steps", type=int, default=0, help="train this many steps instead (load-independent)"
    )
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)

    if args.scheme == "task":
        train, held = task_split(20000, args.seed)
    else:
        pairs = all_pairs(args.scheme)
        train = [f"{a}+{b}=" for a, b in pairs if not is_held_out(a, b)]
        held = [f"{a}+{b}=" for a, b in pairs if is_held_out(a, b)]
    held = rng.sample(held, min(400, len(held)))

    config = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=int(2.75 * args.hidden),
        max_position_embeddings=64,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        tie_word_embeddings=True,
    )
    model = transformers.LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))

    start, step, loss_ema = time.time(), 0, None
    while True:
        elapsed = time.time() - start
        # progress in [0, 1): by wall time, or by steps when --steps is given (other processes then cannot change it)
        frac = step / args.steps if args.steps else elapsed / args.seconds
        if frac >= 1:
            break
        lr = args.lr * min(1.0, frac / 0.05) * 0.5 * (1 + math.cos(math.pi * frac))
        for group in opt.param_groups:
            group["lr"] = lr
        ids, labels = make_batch(rng.choices(train, k=args.batch), max_len=14)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        loss_ema = loss.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.item()
    train_time = time.time() - start

    held_em = greedy_exact_match(model, held)
    train_em = greedy_exact_match(model, rng.sample(train, min(400, len(train))))
    print(
        f"scheme={args.scheme} params={n_params / 1e6:.2f}M hidden={args.hidden} layers={args.layers} "
        f"lr={args.lr} batch={args.batch} seed={args.seed} steps={step} train_s={train_time:.0f} "
        f"loss_ema={loss_ema:.3f} n_train_prompts={len(train)} n_held={len(held)} "
        f"held_exact={held_em:.3f} train_exact={train_em:.3f}"
    )


if __name__ == "__main__":
    main()
