"""Conversational DPO rows (system messages included): rlhflab's prompt/chosen/rejected token ids against TRL 1.16's
own tokenization (`DPOTrainer._prepare_dataset`, called with a stand-in trainer; nothing of it is copied here).

They agree on every prompt id and every response id but one: TRL keeps what a ChatML template writes after a turn's
`<|im_end|>` (a newline) as the response's last token; rlhflab ends the response at `<|im_end|>`, where generation
stops (docs/notes.md, "Chat tokenization against TRL"). A tiny ChatML tokenizer in the default suite; the real
SmolLM2 tokenizer in the slow one.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import needs_real_model
from test_losses import import_or_skip
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from rlhflab.data.collate import tokenize_preference
from rlhflab.data.loading import load_preferences

PAIRS = Path(__file__).parent / "data" / "chat_pairs.jsonl"
# ChatML as SmolLM2, Qwen2 and others write it: every turn "<|im_start|>role\ncontent<|im_end|>\n".
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_chatml_tokenizer() -> PreTrainedTokenizerFast:
    """Words of the test pairs, newlines as tokens of their own, <|im_start|> as BOS and <|im_end|> as EOS."""
    rows = [json.loads(line) for line in PAIRS.read_text().splitlines()]
    corpus = [m["content"] for row in rows for m in row["prompt"] + row["chosen"] + row["rejected"]]
    corpus += ["system user assistant \n"]
    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex("\n"), "isolated"),
                                                     pre_tokenizers.Split(" ", "removed")])
    backend.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|im_end|>", unk_token="<unk>")
    tokenizer.chat_template = CHATML
    return tokenizer


def trl_tokenization(tokenizer, rows: list[dict]) -> list[dict]:
    """TRL's prompt_ids / chosen_ids / rejected_ids of each row, by TRL's own dataset preparation."""
    import tempfile

    from datasets import Dataset

    trainer_class = import_or_skip("trl.trainer.dpo_trainer", "DPOTrainer")
    config_class = import_or_skip("trl", "DPOConfig")
    args = config_class(output_dir=tempfile.mkdtemp(), max_length=None, dataset_num_proc=None, report_to=[],
                        bf16=False, use_cpu=True)
    stand_in = SimpleNamespace(_tokenizer=tokenizer)  # what _prepare_dataset reads of the trainer
    return list(trainer_class._prepare_dataset(stand_in, Dataset.from_list(rows), tokenizer, args, "train"))


def assert_matches_trl(tokenizer) -> None:
    rows = [json.loads(line) for line in PAIRS.read_text().splitlines()]
    assert any(row["prompt"][0]["role"] == "system" for row in rows)
    ours = [tokenize_preference(tokenizer, example, None, None) for example in load_preferences(PAIRS)]
    newline = tokenizer.encode("\n", add_special_tokens=False)
    end = tokenizer.eos_token_id
    assert len(newline) == 1 and newline[0] != tokenizer.unk_token_id  # the newline is a token of its own
    for theirs, (chosen, rejected) in zip(trl_tokenization(tokenizer, rows), ours, strict=True):
        assert theirs["prompt_ids"] == chosen.prompt_ids == rejected.prompt_ids
        # the one difference: TRL's response goes on past <|im_end|> with the template's newline
        assert theirs["chosen_ids"] == [*chosen.completion_ids, *newline] and chosen.completion_ids[-1] == end
        assert theirs["rejected_ids"] == [*rejected.completion_ids, *newline] and rejected.completion_ids[-1] == end


def test_conversational_pairs_match_trl_but_the_newline_after_the_turn() -> None:
    assert_matches_trl(tiny_chatml_tokenizer())


@pytest.mark.slow
@needs_real_model()
def test_real_chatml_tokenizer_matches_trl(real_model_cache) -> None:
    from rlhflab.models.loading import load_tokenizer

    assert_matches_trl(load_tokenizer(str(real_model_cache / "models" / "smollm2-135m-instruct")))
