"""Data parallelism (training/distributed.py): N processes with a global batch B train as one process with B.

The multi-process test is one torchrun launch of 2 processes (gloo, one thread each) that runs, one
after another: SFT, SFT stopped by a SIGTERM sent to rank 1 alone and then resumed, a reward model,
DPO (2 micro-batches per process), GRPO (a reward function) and PPO (a reward model; 2 minibatches ×
2 epochs), where each process samples half of every step's prompts. Each is checked against the same
command run as one process here (the independent reference): the same losses and metrics step by
step, the same findings and the same final weights, to float tolerance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from helpers import task_tokenizer
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from rlhflab.cli import app
from rlhflab.config import RunConfig
from rlhflab.errors import InputError
from rlhflab.training import distributed
from rlhflab.training.data_order import split_micro_batches
from rlhflab.training.loop import train
from rlhflab.training.metrics import is_wall_clock, read_metrics

# Wall time (`is_wall_clock`) differs between any two runs; packing efficiency and the reward model's reward_std (a standard
# deviation within each micro-batch) depend on how a step is cut into micro-batches. PPO's clip fractions count
# tokens past a clip boundary: after the first update a token at the boundary may fall on either side under the
# float rounding of gradients summed in another order (one token of 64 in a run here).
UNCOMPARABLE = {"packing/efficiency", "reward_std", "clip_ratio/region", "value/clip_frac"}

# One torchrun worker: rlhflab commands one after another. Processes other than rank 0 leave a command
# with RunContinuesOnMain when its training is done; a fault is injected into one rank only.
WORKER = r"""
import json, os, sys
sys.path.insert(0, sys.argv[2])  # tests/, for fault_launcher
from fault_launcher import Faults
from rlhflab.cli import app
from rlhflab.training.distributed import RunContinuesOnMain
from rlhflab.training.hooks import RunHooks, installed

for run in json.loads(sys.argv[1]):
    faults = Faults(run["fault"]) if run.get("fault_rank") == os.environ["RANK"] else RunHooks()
    try:
        with installed(faults):
            code = app(run["args"], standalone_mode=False)
    except RunContinuesOnMain:
        code = "left"
    os.write(1, f"RESULT {os.environ['RANK']} {run['name']} {code or 0}\n".encode())  # one write: lines stay whole
"""


@pytest.fixture
def world(monkeypatch):
    """Pretend to be rank 1 of 2 inside data_parallel(), without a process group."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with distributed.data_parallel():
        yield


def test_one_process_is_untouched(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    items = list(range(5))
    with distributed.data_parallel():
        assert distributed.world_size() == 1 and distributed.is_main()
        assert distributed.share(items) is items
        assert distributed.share_indices(5) == [0, 1, 2, 3, 4]
        assert distributed.all_reduce([1.5, 2.0]) == [1.5, 2.0]
        assert distributed.default_threads(16) == 16


def test_torchrun_outside_data_parallel_is_one_process(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert distributed.launched()
    assert distributed.world_size() == 1 and distributed.is_main()  # e.g. prerequisites built before training


def test_the_world_lasts_for_the_data_parallel_block(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with distributed.data_parallel():
        with distributed.data_parallel():
            assert (distributed.world_size(), distributed.rank()) == (2, 1)
        assert (distributed.world_size(), distributed.rank()) == (2, 1)  # the inner block restored the outer world
    assert (distributed.world_size(), distributed.rank()) == (1, 0)  # nothing outlives the block
    recipe = SimpleNamespace(loss=lambda micro_batch: (torch.tensor(float(micro_batch)), {}))
    with distributed.process_group(recipe) as group:  # outside data_parallel: one process, no group, no DDP
        assert group.size == 1 and group.ddp is None and group.loss(3)[0].item() == 3.0


def test_each_process_takes_its_block_of_the_step(world):
    assert distributed.world_size() == 2 and not distributed.is_main()
    # grad_accum micro-batches per process: the step is planned whole, rank 1 trains on the second half
    step = split_micro_batches(list(range(8)), grad_accum=2)
    assert step == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert distributed.share(step) == [[4, 5], [6, 7]]
    assert distributed.share_indices(len(step)) == [2, 3]  # the same block, as indices
    with pytest.raises(ValueError, match="3 micro-batches"):
        distributed.share([[0], [1], [2]])
    assert distributed.default_threads(16) == 8
    assert distributed.default_threads(1) == 1


def test_batch_must_split_evenly_over_processes(world, tmp_path):
    cfg = RunConfig(out=str(tmp_path / "run"), batch_size=6, grad_accum=2, progress=False)
    with pytest.raises(InputError, match="multiple of 4"):
        train(cfg, recipe=None)  # refused before anything is built


def test_cli_refuses_commands_that_are_not_data_parallel(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = CliRunner().invoke(app, ["eval", "--task", "arithmetic"])
    assert result.exit_code == 2
    assert "eval under torchrun is not supported yet" in " ".join(result.output.split())


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    """A tiny Llama with its tokenizer (save_pretrained), the same as a scalar model (its head saved, not drawn
    at load time), 16 SFT examples and 24 preference pairs."""
    from rlhflab.tasks.reviews import ReviewsTask

    root = tmp_path_factory.mktemp("dp-inputs")
    task = ReviewsTask()
    tokenizer = task_tokenizer(("reviews",), documents=400, vocab_size=160)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=64, max_position_embeddings=256, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(root / "model")
    LlamaForSequenceClassification(LlamaConfig(**config.to_dict(), num_labels=1)).save_pretrained(root / "scalar")
    for folder in ("model", "scalar"):
        tokenizer.save_pretrained(root / folder)
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in task.sft_examples(16, seed=0)))
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in task.constructed_pairs(24, seed=0)))
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in task.train_prompts(16, seed=0)))
    # a reward that varies within a group of the untrained model's samples, so that GRPO has advantages to follow
    (root / "reward.py").write_text("def vowels(prompts, completions, **kwargs):\n"
                                    "    return [float(sum(c.count(v) for v in 'aeiou')) for c in completions]\n")
    return {"model": str(root / "model"), "scalar": str(root / "scalar"), "sft": str(root / "sft.jsonl"),
            "pairs": str(root / "pairs.jsonl"), "prompts": str(root / "prompts.jsonl"),
            "reward_fn": f"{root / 'reward.py'}:vowels"}


def _args(command: str, inputs: dict[str, str], out: Path, *extra: str) -> list[str]:
    """6 steps of 4 examples (16 SFT examples: the run crosses an epoch boundary), checkpoints every 2;
    RL: 4 steps of 4 prompts × 4 (GRPO) or × 2 (PPO) samples of 8 tokens."""
    data = {"sft": inputs["sft"], "grpo": inputs["prompts"], "ppo": inputs["prompts"]}.get(command, inputs["pairs"])
    model = inputs["scalar"] if command == "rm" else inputs["model"]
    rl = command in ("grpo", "ppo")
    args = [command, "--model", model, "--data", data, "--out", str(out), "--seed", "1", "--threads", "1",
            "--no-progress", "--max-steps", "4" if rl else "6", "--batch-size", "4", "--lr", "1e-3" if rl else "1e-2",
            "--checkpoint-every", "2"]  # fmt: skip
    if command == "dpo":
        args += ["--eval-every", "3", "--cache-dir", str(out.parent / f"cache-{out.name}")]
    if command == "grpo":
        args += ["--reward-fn", inputs["reward_fn"], "--group-size", "4", "--max-new-tokens", "8"]
    if command == "ppo":
        args += ["--reward-model", inputs["scalar"], "--group-size", "2", "--max-new-tokens", "8",
                 "--num-minibatches", "2", "--ppo-epochs", "2"]  # fmt: skip
    return [*args, *extra]


def _assert_same_run(one: Path, two: Path) -> None:
    """Same metrics line by line (to float tolerance), same findings, same final weights."""
    rows_one, rows_two = read_metrics(one), read_metrics(two)
    assert [r["step"] for r in rows_two] == [r["step"] for r in rows_one]  # one line per step: rank 0 alone writes
    for a, b in zip(rows_one, rows_two, strict=True):
        a = {k: v for k, v in a.items() if k not in UNCOMPARABLE and not is_wall_clock(k)}
        b = {k: v for k, v in b.items() if k not in UNCOMPARABLE and not is_wall_clock(k)}
        assert b == pytest.approx(a, rel=1e-4, abs=1e-5), f"step {a['step']}"
    findings = [[json.loads(line)["code"] for line in (run / "diagnostics.jsonl").read_text().splitlines()]
                for run in (one, two)]  # fmt: skip
    assert findings[0] == findings[1]
    w1, w2 = load_file(one / "model" / "model.safetensors"), load_file(two / "model" / "model.safetensors")
    assert w1.keys() == w2.keys()
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=1e-4, atol=1e-4, msg=key)


def _launch(args: list[str], env: dict[str, str], timeout: float = 240) -> tuple[str, str, int]:
    """torchrun with 2 processes. On a timeout torchrun gets SIGTERM, on which it ends its workers (each in a
    session of its own, so killing torchrun alone would leave them running)."""
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return stdout, stderr, proc.returncode


def test_two_processes_train_as_one(inputs, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    for command in ("sft", "rm", "dpo", "grpo", "ppo"):
        result = CliRunner().invoke(app, _args(command, inputs, one / command))
        assert result.exit_code == 0, result.output

    runs = [
        {"name": "sft", "args": _args("sft", inputs, two / "sft")},
        # a signal to one process stops every process after the step, with a checkpoint (exit 130 everywhere)
        {"name": "sft-stopped", "args": _args("sft", inputs, two / "sft-resumed"), "fault": "sigterm@2",
         "fault_rank": "1"},
        {"name": "sft-resumed", "args": _args("sft", inputs, two / "sft-resumed", "--resume", "auto")},
        {"name": "rm", "args": _args("rm", inputs, two / "rm")},
        # 2 micro-batches per process (gradients exchanged on the second only) against 1 in one process
        {"name": "dpo", "args": _args("dpo", inputs, two / "dpo", "--grad-accum", "2")},
        {"name": "grpo", "args": _args("grpo", inputs, two / "grpo")},
        {"name": "ppo", "args": _args("ppo", inputs, two / "ppo")},
    ]
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    stdout, stderr, returncode = _launch([str(worker), json.dumps(runs), str(Path(__file__).parent)], env)
    assert returncode == 0, stdout[-3000:] + stderr[-3000:]
    results = sorted(line.split()[1:] for line in stdout.splitlines() if line.startswith("RESULT "))
    assert results == sorted(
        [["0", "sft", "0"], ["1", "sft", "left"], ["0", "sft-stopped", "130"], ["1", "sft-stopped", "130"],
         ["0", "sft-resumed", "0"], ["1", "sft-resumed", "left"], ["0", "rm", "0"], ["1", "rm", "left"],
         ["0", "dpo", "0"], ["1", "dpo", "left"], ["0", "grpo", "0"], ["1", "grpo", "left"], ["0", "ppo", "0"],
         ["1", "ppo", "left"]]
    ), stdout  # fmt: skip

    _assert_same_run(one / "sft", two / "sft")
    _assert_same_run(one / "sft", two / "sft-resumed")
    start = load_file(Path(inputs["model"]) / "model.safetensors")
    for command in ("grpo", "ppo"):
        _assert_same_run(one / command, two / command)
        # the example completions of rank 0: the whole rollout, as one process sampled and scored it
        logged = [[json.loads(line) for line in (run / command / "completions.jsonl").read_text().splitlines()]
                  for run in (one, two)]
        assert [(r["step"], r["prompt"], r["completion"]) for r in logged[1]] == [
            (r["step"], r["prompt"], r["completion"]) for r in logged[0]]
        assert [r["reward"] for r in logged[1]] == pytest.approx([r["reward"] for r in logged[0]], rel=1e-4, abs=1e-5)
        trained = load_file(two / command / "model" / "model.safetensors")
        moved = max((trained[key] - start[key]).abs().max().item() for key in start)
        assert moved > 1e-3, f"{command}: the policy did not move, so equal weights prove nothing"
    for command in ("rm", "dpo"):  # their held-out metrics end metrics.jsonl, compared line by line
        _assert_same_run(one / command, two / command)
        assert (one / command / "eval.json").is_file() == (two / command / "eval.json").is_file()
        if (one / command / "eval.json").is_file():
            assert json.loads((two / command / "eval.json").read_text()) == pytest.approx(
                json.loads((one / command / "eval.json").read_text()), rel=1e-4, abs=1e-5
            )


@pytest.mark.slow  # a torchrun launch of its own: about 45 s on 2 shared cores
def test_pretrain_under_torchrun_trains_as_one_process(tmp_path):
    """`rlhflab pretrain` under torchrun: every process trains the BPE tokenizer on the same corpus (BPE training
    is deterministic: merges go by count, ties by pair, never by hash order) and builds the same initial model
    from --seed, then trains its share of each step. Checked against one process: the same tokenizer file, the
    same losses step by step and the same final weights. A process with another tokenizer would train on other
    token ids and change the reduced losses."""

    def args(out: Path) -> list[str]:
        return ["pretrain", "--task", "reviews", "--preset", "tiny", "--num-documents", "200", "--vocab-size", "160",
                "--max-steps", "4", "--batch-size", "4", "--checkpoint-every", "2", "--seed", "1", "--threads", "1",
                "--no-progress", "--out", str(out)]  # fmt: skip

    one, two = tmp_path / "one", tmp_path / "two"
    result = CliRunner().invoke(app, args(one))
    assert result.exit_code == 0, result.output
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    stdout, stderr, returncode = _launch([str(worker), json.dumps([{"name": "pretrain", "args": args(two)}]),
                                          str(Path(__file__).parent)], env)
    assert returncode == 0, stdout[-3000:] + stderr[-3000:]
    results = sorted(line.split()[1:] for line in stdout.splitlines() if line.startswith("RESULT "))
    assert results == [["0", "pretrain", "0"], ["1", "pretrain", "left"]], stdout
    assert (two / "model" / "tokenizer.json").read_bytes() == (one / "model" / "tokenizer.json").read_bytes()
    _assert_same_run(one, two)
