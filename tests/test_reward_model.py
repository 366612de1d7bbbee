"""Reward-model scoring: packed pairs score exactly as unpadded rows and as padded batches, for each pooling."""

import pytest
import torch
from helpers import assert_stops_on_mask_mismatch, forget_the_label_shift, tiny_llama
from transformers import LlamaForSequenceClassification

from rlhflab.algorithms.reward_model import pair_scores
from rlhflab.data.collate import TokenizedExample, collate_sequences, pack_pairs
from rlhflab.models.scoring import sequence_scores

PAIRS = [  # (chosen, rejected) share a prompt; lengths differ within and across pairs
    (TokenizedExample([1, 5, 6, 7], [8, 9, 2]), TokenizedExample([1, 5, 6, 7], [10, 2])),
    (TokenizedExample([1, 11], [13, 14, 15, 16, 2]), TokenizedExample([1, 11], [17, 2])),
    (TokenizedExample([1, 3, 4, 5, 6, 7, 8], [9, 2]), TokenizedExample([1, 3, 4, 5, 6, 7, 8], [20, 21, 22, 2])),
]


def scalar_model(attn: str) -> LlamaForSequenceClassification:
    config = tiny_llama(attn).config
    config.num_labels, config.pad_token_id = 1, 0
    torch.manual_seed(1)
    model = LlamaForSequenceClassification(config).eval()
    model.set_attn_implementation(attn)
    return model


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("pooling", ["last", "mean"])
@pytest.mark.parametrize("max_row_tokens", [16, 256])
def test_packed_pair_scores_equal_padded_rows(attn, pooling, max_row_tokens):
    model = scalar_model(attn)
    model.config.score_pooling = pooling
    with torch.no_grad():
        chosen, rejected = pair_scores(model, pack_pairs(PAIRS, max_row_tokens, pad_token_id=0))
        # reference: each row alone, unpadded, pooled by hand
        alone = []
        for example in [c for c, _ in PAIRS] + [r for _, r in PAIRS]:
            ids = torch.tensor([example.prompt_ids + example.completion_ids])
            scores = model.score(model.model(input_ids=ids).last_hidden_state)[0, :, 0]
            alone.append(scores[-1] if pooling == "last" else scores[len(example.prompt_ids) :].mean())
        expected = torch.stack(alone)
        padded = sequence_scores(model, collate_sequences([c for c, _ in PAIRS] + [r for _, r in PAIRS], pad_token_id=0))
    n = len(PAIRS)
    torch.testing.assert_close(chosen, expected[:n], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rejected, expected[n:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded, expected, atol=1e-5, rtol=1e-5)


def test_a_wrong_label_shift_stops_the_run(tmp_path, monkeypatch):
    """logps.mask_mismatch on the reward model's first micro-batch (its packer is DPO's)."""
    import rlhflab.data.collate as collate
    from rlhflab.algorithms.reward_model import RewardModelConfig, run_reward_model

    forget_the_label_shift(monkeypatch, collate)
    cfg = RewardModelConfig(out=str(tmp_path / "rm"), max_steps=2, batch_size=2, progress=False, threads=1)
    tokenizer = type("Tok", (), {"pad_token_id": 0})()
    model = scalar_model("sdpa")
    assert_stops_on_mask_mismatch(lambda: run_reward_model(cfg, model, tokenizer, PAIRS * 2), model, tmp_path / "rm")


def test_evaluate_is_the_held_out_accuracy_of_padded_scores(tmp_path):
    """`evaluate()` (eval/accuracy, eval/margin, logged by the loop) against unpacked, padded scoring."""
    from rlhflab.algorithms.reward_model import RewardModelConfig, RewardModelRecipe
    from rlhflab.models.scoring import reward_model_scores

    model = scalar_model("sdpa")
    model.config.score_pooling = "mean"
    recipe = RewardModelRecipe(model, PAIRS, RewardModelConfig(out=str(tmp_path)), 0, eval_pairs=PAIRS)
    got = recipe.evaluate()
    prompts = [c.prompt_ids for c, _ in PAIRS]
    chosen = reward_model_scores(model, prompts, [c.completion_ids for c, _ in PAIRS], 0)
    rejected = reward_model_scores(model, prompts, [r.completion_ids for _, r in PAIRS], 0)
    assert got["eval/accuracy"] == (chosen > rejected).float().mean().item()
    assert got["eval/margin"] == pytest.approx((chosen - rejected).mean().item(), abs=1e-5)
    assert RewardModelRecipe(model, PAIRS, RewardModelConfig(out=str(tmp_path)), 0).evaluate() == {}
