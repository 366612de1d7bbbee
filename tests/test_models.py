"""Tokenizer and model presets of the embedded default."""

import pytest
import torch
from helpers import task_tokenizer

from rlhflab.data.collate import TokenizedExample, collate_sequences
from rlhflab.errors import InputError
from rlhflab.models.loading import (
    PRESETS,
    build_model,
    load_causal_lm,
    load_scalar_model,
)
from rlhflab.models.scoring import sequence_scores, token_scores
from rlhflab.tasks import get_task

BOTH_TASKS = {"tasks": ("reviews", "arithmetic"), "documents": 600}  # the tokenizers' corpus


def test_prompt_plus_completion_ids_are_additive():
    tokenizer = task_tokenizer(**BOTH_TASKS, vocab_size=512)
    assert len(tokenizer) <= 512
    for name in ("reviews", "arithmetic"):
        for ex in get_task(name).sft_examples(200, seed=1):
            whole = tokenizer(ex["prompt"] + ex["completion"], add_special_tokens=False)["input_ids"]
            parts = tokenizer(ex["prompt"], add_special_tokens=False)["input_ids"]
            parts += tokenizer(ex["completion"], add_special_tokens=False)["input_ids"]
            assert whole == parts, ex
            assert tokenizer.decode(parts) == ex["prompt"] + ex["completion"]
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3


def test_presets_sizes_and_round_trip(tmp_path):
    tokenizer = task_tokenizer(**BOTH_TASKS, vocab_size=256)
    sizes = {name: sum(p.numel() for p in build_model(name, tokenizer).parameters()) for name in PRESETS}
    assert 0.7e6 < sizes["tiny"] < 1.3e6 and 2.5e6 < sizes["small"] < 3.8e6
    model = build_model("tiny", tokenizer)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reloaded = load_causal_lm(str(tmp_path))
    ids = tokenizer("the plot was great", return_tensors="pt")["input_ids"]
    assert (reloaded(ids).logits - model(ids).logits).abs().max() < 1e-6
    scalar = load_scalar_model(str(tmp_path))
    assert token_scores(scalar, ids, ids.new_ones(ids.shape)).abs().max() == 0  # fresh head starts at 0


def test_pickle_weights_are_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not safetensors")
    with pytest.raises(InputError, match="safetensors"):
        load_causal_lm(str(tmp_path))


def test_sequence_scores_pool_as_the_model_config_says(tmp_path):
    tokenizer = task_tokenizer(**BOTH_TASKS, vocab_size=256)
    build_model("tiny", tokenizer).save_pretrained(tmp_path)
    scalar = load_scalar_model(str(tmp_path)).eval()
    torch.nn.init.normal_(scalar.score.weight)  # a trained head (a fresh one is zero: every score 0)
    rows = [TokenizedExample([1, 7, 8, 9], [10, 11, 2]), TokenizedExample([1, 7], [12, 2]), TokenizedExample([1], [2])]
    batch = collate_sequences(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        # reference: each row alone, unpadded; its per-token scores over the completion positions
        ids = [torch.tensor([r.prompt_ids + r.completion_ids]) for r in rows]
        alone = [token_scores(scalar, i, torch.ones_like(i))[0] for i in ids]
        last = torch.stack([s[-1] for s in alone])
        mean = torch.stack([s[len(r.prompt_ids):].mean() for s, r in zip(alone, rows, strict=True)])
        assert torch.allclose(sequence_scores(scalar, batch), last, atol=1e-5)  # no config: transformers' rule
        scalar.config.score_pooling = "mean"
        assert torch.allclose(sequence_scores(scalar, batch), mean, atol=1e-5)
        assert not torch.allclose(mean, last, atol=1e-3)
    scalar.save_pretrained(tmp_path / "rm")
    assert load_scalar_model(str(tmp_path / "rm")).config.score_pooling == "mean"  # saved with the model
    scalar.config.score_pooling = "cls"
    with pytest.raises(InputError, match="score_pooling"):
        sequence_scores(scalar, batch)
