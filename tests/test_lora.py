"""LoRA via peft (issue 13, item 3): the reference is the base with the adapters off, bit for bit; only the adapters
train; the sampler samples the adapted policy on its fast path; checkpoints restore the adapters exactly; the final
model/ is an adapter folder that rlhflab (and PEFT) loads, and --merge-lora writes a plain transformers folder."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from fault_launcher import Faults
from helpers import golden_dpo, golden_grpo, golden_ppo, tiny_llama, tiny_lm, tiny_tokenizer, without_timing
from safetensors.torch import load_file

from rlhflab.algorithms.reference_cache import weights_fingerprint
from rlhflab.cli import app
from rlhflab.core.packing import pack_groups, packed_forward
from rlhflab.core.sampling import _has_llama_layout, sample
from rlhflab.models.loading import load_causal_lm, load_scalar_model
from rlhflab.models.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapters_disabled, add_lora, base_state_dict
from rlhflab.training.activations import enable_gradient_checkpointing
from rlhflab.training.hooks import installed
from rlhflab.training.metrics import read_metrics

GROUPS = [([1, 2, 3], [[4, 5, 6, 7], [8, 9]]), ([10, 11], [[12, 13, 14]])]
LORA = ["--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0"]


def adapted(seed: int = 0, **config) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(a tiny Llama with LoRA adapters whose B is random, so the adapters change the outputs; its base, a copy)."""
    model = tiny_llama(seed=seed, **config)
    base = copy.deepcopy(model)
    add_lora(model, 4, 8, 0.0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(1))
    return model, base


def test_adapters_off_is_the_base_model_bit_for_bit():
    model, base = adapted()
    packed = pack_groups(GROUPS, max_row_tokens=32)
    with torch.no_grad():
        with adapters_disabled(model):
            reference = packed_forward(model, packed).token_logps
        expected = packed_forward(base, packed).token_logps
        adapted_logps = packed_forward(model, packed).token_logps
    assert torch.equal(reference, expected)
    assert (adapted_logps - expected).abs().max() > 1e-3  # the adapters do change the policy
    assert not any(p.requires_grad is False for n, p in model.named_parameters() if "lora_" in n)  # restored
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [n for n, _ in model.named_parameters()
                                                                           if "lora_" in n]  # only adapters train
    # the reference's fingerprint is the base's: LoRA and full runs of one SFT model share cached reference log-probs
    assert weights_fingerprint(model) == weights_fingerprint(base)
    assert base_state_dict(model).keys() == base.state_dict().keys()


def test_sampler_keeps_its_fast_path_and_samples_the_adapted_policy():
    model, _ = adapted()
    assert _has_llama_layout(model, 32)  # peft's lora.Linear used to send it to the generic path
    prompts = [[1, 2, 3], [4, 5]]
    samples = sample(model, prompts, num_samples=3, max_new_tokens=8, stop_token_ids=[0], pad_token_id=0, seeds=[1, 2])
    groups = [(p, samples.completions()[i * 3 : i * 3 + 3]) for i, p in enumerate(prompts)]
    with torch.no_grad():
        forward = packed_forward(model, pack_groups(groups, max_row_tokens=64)).token_logps  # the PEFT forward
    sampled = samples.logps[samples.response_mask.bool()]
    torch.testing.assert_close(sampled, forward, atol=2e-5, rtol=0)
    greedy = sample(model, prompts, num_samples=1, max_new_tokens=8, temperature=0.0, stop_token_ids=[0], pad_token_id=0)
    for prompt, completion in zip(prompts, greedy.completions(), strict=True):  # greedy = argmax of the PEFT forward
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1 : -1]
        assert logits.argmax(-1).tolist() == completion
    assert all(torch.equal(p, q) for p, q in zip(base_state_dict(model).values(),
                                                 base_state_dict(adapted()[0]).values(), strict=True))


def test_gradient_checkpointing_with_lora_gives_the_plain_gradients():
    plain, _ = adapted()
    checkpointed = copy.deepcopy(plain)
    enable_gradient_checkpointing(checkpointed)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]])
    for model in (plain, checkpointed):
        model.train()
        model(ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    for name, parameter in checkpointed.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(parameter.grad, grads[name], atol=1e-6, rtol=1e-5)


def test_dpo_with_lora_starts_at_ln2_and_trains_only_the_adapters(tmp_path):
    run = golden_dpo(tmp_path, lora_r=4, lora_alpha=8, lora_dropout=0.0)
    first = run.metrics[0]
    assert abs(first["loss"] - math.log(2)) < 1e-6
    assert first["rewards/accuracies"] == 0.0 and first["rewards/margins"] == 0.0
    assert run.metrics[-1]["rewards/margins"] != 0.0
    fresh = tiny_lm(tiny_tokenizer())  # the model golden_dpo starts from
    trained = base_state_dict(run.model)
    assert all(torch.equal(trained[k], v) for k, v in fresh.state_dict().items())  # base weights bit-identical
    assert any(p.abs().sum() > 0 for n, p in run.model.named_parameters() if "lora_B" in n)  # adapters trained
    folder = Path(tmp_path) / "dpo" / "model"
    assert (folder / ADAPTER_CONFIG).is_file() and (folder / ADAPTER_WEIGHTS).is_file()
    assert not (folder / "model.safetensors").exists()


def test_gradient_checkpointing_through_the_loop_with_lora(tmp_path):
    plain = golden_dpo(tmp_path / "plain", lora_r=4, lora_alpha=8, lora_dropout=0.0)
    checkpointed = golden_dpo(tmp_path / "gc", lora_r=4, lora_alpha=8, lora_dropout=0.0, gradient_checkpointing=True)
    assert [m["loss"] for m in plain.metrics] == [m["loss"] for m in checkpointed.metrics]


def test_dpo_with_lora_live_reference_is_the_cached_one(tmp_path):
    """A live reference (recomputed every step, as the policy trains) gives the run of a cached one only when it
    is computed with the adapters off; with them on it would equal the policy (loss ln 2 at every step)."""
    cached = golden_dpo(tmp_path / "cached", lora_r=4, lora_alpha=8, lora_dropout=0.0)
    live = golden_dpo(tmp_path / "live", lora_r=4, lora_alpha=8, lora_dropout=0.0, live_reference=True)
    assert without_timing(cached.metrics) == without_timing(live.metrics)


def test_grpo_and_ppo_with_lora_take_their_kl_to_the_base(tmp_path):
    """The KL to the reference is 0 while the adapters are 0 and grows once they train: a reference taken with the
    adapters on would be the policy itself, with KL 0 at every step."""
    grpo = golden_grpo(tmp_path, lora_r=4, lora_alpha=8, lora_dropout=0.0, lr=3e-2, num_iterations=1)
    assert grpo.metrics[0]["kl"] == 0.0 and grpo.metrics[-1]["kl"] > 0.0
    ppo = golden_ppo(tmp_path, lora_r=4, lora_alpha=8, lora_dropout=0.0, lr=3e-2)
    assert ppo.metrics[0]["kl"] == 0.0 and ppo.metrics[-1]["kl"] != 0.0  # k1: either sign
    assert (Path(tmp_path) / "ppo" / "value_model" / ADAPTER_CONFIG).is_file()  # the value model has adapters too


QUICK = ["--max-steps", "2", "--batch-size", "2", "--threads", "1", "--no-progress", "--eval-temperatures", "",
         *LORA]


def run_cli(*args: str) -> None:
    result = CliRunner().invoke(app, [*args, *QUICK])
    assert result.exit_code == 0, result.output


def test_every_command_runs_with_lora_and_merges(inputs, tmp_path):
    """sft, rm, dpo, grpo and ppo with --lora-r through the CLI; the LoRA reward model scores GRPO and starts PPO's
    value model; --merge-lora folders load in plain transformers with the adapted model's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    sft = tmp_path / "sft"
    run_cli("sft", "--task", "reviews", "--model", inputs["sft"], "--num-examples", "8", "--out", str(sft),
            "--merge-lora")
    rm = tmp_path / "rm"
    run_cli("rm", "--model", inputs["sft"], "--data", inputs["pairs"], "--out", str(rm), "--merge-lora")
    run_cli("dpo", "--model", inputs["sft"], "--data", inputs["pairs"], "--out", str(tmp_path / "dpo"),
            "--cache-dir", inputs["cache"])
    rl = ["--model", inputs["sft"], "--task", "reviews", "--reward-model", str(rm / "model"), "--num-prompts", "8",
          "--max-new-tokens", "4"]
    run_cli("grpo", *rl, "--group-size", "2", "--out", str(tmp_path / "grpo"))
    run_cli("ppo", *rl, "--ppo-epochs", "1", "--out", str(tmp_path / "ppo"))
    for name in ("sft", "rm", "dpo", "grpo", "ppo"):
        folder = tmp_path / name / "model"
        assert (folder / ADAPTER_CONFIG).is_file() and not (folder / "model.safetensors").exists(), name
        assert [line["step"] for line in read_metrics(tmp_path / name)] == [0, 1], name
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        base = load_causal_lm(inputs["sft"])
        peft_logits = PeftModel.from_pretrained(base, str(sft / "model"))(ids).logits  # adapters unmerged
        merged = AutoModelForCausalLM.from_pretrained(sft / "model_merged")(ids).logits  # plain transformers
        rlhflab_loaded = load_causal_lm(str(sft / "model"))(ids).logits
    torch.testing.assert_close(merged, peft_logits, atol=1e-5, rtol=0)
    assert torch.equal(merged, rlhflab_loaded)
    assert (merged - load_causal_lm(inputs["sft"])(ids).logits).abs().max() > 0  # SFT with LoRA changed the model
    reward_model = load_scalar_model(str(rm / "model"))
    plain_rm = AutoModelForSequenceClassification.from_pretrained(rm / "model_merged")
    assert reward_model.config.score_pooling == plain_rm.config.score_pooling == "mean"
    with torch.no_grad():
        # the same merged weights, loaded two ways (bit-equal in one process, float rounding apart across thread counts)
        torch.testing.assert_close(reward_model(ids).logits, plain_rm(ids).logits, atol=1e-6, rtol=0)
        assert reward_model.score.weight.abs().sum() > 0


def lora_dpo(inputs, out: Path, *extra: str) -> list[str]:
    return ["dpo", "--model", inputs["sft"], "--data", inputs["pairs"], "--batch-size", "4", "--cache-dir",
            inputs["cache"], "--out", str(out), "--seed", "1", "--threads", "1", "--no-progress", "--max-steps", "6",
            "--checkpoint-every", "2", "--eval-temperatures", "", "--lora-r", "4", "--lora-alpha", "8",
            "--lora-dropout", "0.05", *extra]  # dropout on: resume must restore the RNG state too


class SimulatedKill(BaseException):
    pass


def _kill() -> None:
    raise SimulatedKill


def test_lora_resume_is_bit_exact(inputs, tmp_path):
    """Killed after step 3 (last checkpoint at 2), resumed: the metrics and the adapter of the uninterrupted run
    (with lora_dropout 0.05 on, so the RNG state is restored too). Checkpoints hold only the trainable weights."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert CliRunner().invoke(app, lora_dpo(inputs, straight)).exit_code == 0
    with installed(Faults("kill@3", kill=_kill)), pytest.raises(SimulatedKill):
        CliRunner().invoke(app, lora_dpo(inputs, resumed))
    result = CliRunner().invoke(app, lora_dpo(inputs, resumed, "--resume", "auto"))
    assert result.exit_code == 0 and "resuming from" in result.output, result.output
    lines = [without_timing(read_metrics(out)) for out in (straight, resumed)]
    assert lines[0] == lines[1] and len(lines[0]) == 6
    a, b = (load_file(out / "model" / ADAPTER_WEIGHTS) for out in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    checkpoint = load_file(straight / "checkpoints" / "step-000006" / "model.safetensors")
    assert checkpoint and all(".lora_" in name for name in checkpoint)
    assert json.loads((straight / "model" / ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == str(
        Path(inputs["sft"]).resolve())


def test_checkpoint_holds_only_the_adapters_and_refuses_other_lora_settings(tmp_path):
    from rlhflab.errors import InputError
    from rlhflab.training.checkpoint import load_checkpoint, save_checkpoint

    model, _ = adapted()
    path = save_checkpoint(tmp_path, 1, model, {"step": 1})
    saved = load_file(path / "model.safetensors")
    assert set(saved) == {n for n, p in model.named_parameters() if p.requires_grad}
    restored = add_lora(tiny_llama(), 4, 8, 0.0)  # fresh adapters: B = 0
    load_checkpoint(path, restored)
    assert all(torch.equal(a, b) for a, b in zip(restored.state_dict().values(), model.state_dict().values(),
                                                 strict=True))
    with pytest.raises(InputError, match="trainable parameters"):
        load_checkpoint(path, add_lora(tiny_llama(), 4, 8, 0.0, ["q_proj"]))
