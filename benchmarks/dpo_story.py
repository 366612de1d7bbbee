"""The DPO story on `reviews`, reproduced: (a) step-0 loss = ln 2; (b) batch 1, beta 0.1 → loss ≈ 0,
accuracy 1, margins far beyond 10 and `dpo.margin_explosion`; (c) beta 0.3, batch 16 → margins in
range, no finding, and a higher gold reward on the evaluation suite than (b).

    .venv/bin/python benchmarks/dpo_story.py [--task-size tiny|small] [--cache-dir DIR] [--out /tmp/dpo_story]
    .venv/bin/python benchmarks/dpo_story.py --model SFT_FOLDER --data PAIRS.jsonl   # (task still gives the suite)

Each arm is a plain `run_dpo` on the task's cached SFT model and the first `--num-pairs` of its
preference pairs (SFT samples labelled by the gold reward), `--epochs` passes over them: both arms
see every pair equally often, (b) in batches of 1, (c) in batches of 16. Memorising needs repeated
pairs: one pass over thousands of pairs at batch 1 kept margins below 0.1 (docs/notes_dpo.md).
The table shows the mean of the last 20 logged steps, the findings, and the evaluation suite's gold
reward and well-formed share at temperatures 0.7 and 1.0.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path

import torch

from rlhflab.algorithms.dpo import DPOConfig
from rlhflab.diagnostics.findings import read_findings
from rlhflab.stages.artefacts import TaskArtefacts, preference_pairs
from rlhflab.stages.train import dpo, final_metrics
from rlhflab.training.metrics import read_metrics

ARMS = {"b: batch 1, beta 0.1": {"batch_size": 1, "beta": 0.1}, "c: batch 16, beta 0.3": {"batch_size": 16, "beta": 0.3}}


def summarise(out: Path) -> dict[str, float | str]:
    rows = [r for r in read_metrics(out) if "loss" in r]
    last = rows[-20:]
    mean = {k: sum(r[k] for r in last) / len(last) for k in ("loss", "rewards/accuracies", "rewards/margins")}
    suite = json.loads((out / "eval.json").read_text())  # the stage's end-of-run suite
    codes = sorted({f.code for f in read_findings(out / "diagnostics.jsonl") if f.severity != "info"})
    row: dict[str, float | str] = {
        "step0_loss": rows[0]["loss"],
        **mean,
        "max_margin": max(r["rewards/margins"] for r in rows),
        "heldout_acc": final_metrics(out).get("eval/rewards/accuracies", math.nan),
        "findings": ", ".join(codes) or "none",
    }
    for t in ("0.7", "1"):
        aggregate = suite["temperatures"][t]["aggregate"]
        row[f"gold@{t}"] = aggregate["gold"]["mean"]
        row[f"wellformed@{t}"] = 1 - aggregate["malformed"]["mean"]
        row[f"kl@{t}"] = aggregate["kl"]["mean"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task-size", default="small")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--model", default=None, help="an SFT model folder instead of the task's cached one")
    parser.add_argument("--data", default=None, help="a preference JSONL instead of the task's cached pairs")
    parser.add_argument("--out", default="/tmp/dpo_story")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--num-pairs", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = Path(args.data) if args.data else preference_pairs(TaskArtefacts("reviews", args.task_size, cache_dir=args.cache_dir))
    subset = Path(args.out) / f"pairs-{args.num_pairs}.jsonl"
    subset.parent.mkdir(parents=True, exist_ok=True)
    subset.write_text("".join(data.read_text().splitlines(keepends=True)[: args.num_pairs]))
    base = DPOConfig(task="reviews", task_size=args.task_size, cache_dir=args.cache_dir, model=args.model,
                     data=str(subset), threads=1, progress=False,
                     lr=args.lr, eval_temperatures=[0.7, 1.0], eval_every=25)  # fmt: skip
    results = {}
    for name, overrides in ARMS.items():
        out = Path(args.out) / name.split(":")[0]
        steps = args.num_pairs * args.epochs // overrides["batch_size"]  # the same passes over the pairs
        dpo(replace(base, out=str(out), max_steps=steps, **overrides))
        results[name] = summarise(out)
        print(name, json.dumps(results[name]), flush=True)
    keys = list(next(iter(results.values())))
    print("| arm | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for name, row in results.items():
        cells = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
