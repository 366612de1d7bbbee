"""Chat models end a turn with their template's own token: the collator ends conversational completions with it
exactly as the template writes it, and generation stops at it (and at EOS, and at every generation_config eos id).

A tiny WordLevel tokenizer whose template ends assistant turns with `<end>` (not its EOS) followed by template
text, as ChatML writes `<|im_end|>\\n` and Llama 3 `<|eot_id|>`; the real ChatML tokenizer is in the slow test.
"""

from __future__ import annotations

import json

import pytest
from helpers import tiny_tokenizer
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from rlhflab.data.collate import (
    collate_sequences,
    template_end_token,
    tokenize_prompt,
    tokenize_prompt_completion,
)
from rlhflab.models.loading import decode_completion, load_tokenizer, stop_token_ids
from rlhflab.models.tokenizer import CHAT_TEMPLATE

# Assistant turns end with "<end> ." : the end-of-turn token, then template text the collator must drop.
TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} "
    "{% if m['role'] == 'assistant' %}<end> . {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


def end_of_turn_tokenizer() -> PreTrainedTokenizerFast:
    specials = ["<pad>", "<unk>", "<bos>", "<eos>", "<user>", "<assistant>", "<system>", "<end>"]
    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(["the movie was great .", "hello world", "be brief"],
                                trainers.WordLevelTrainer(special_tokens=specials))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                        pad_token="<pad>", unk_token="<unk>")
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def test_template_end_token_is_read_from_the_template() -> None:
    tokenizer = end_of_turn_tokenizer()
    end = tokenizer.convert_tokens_to_ids("<end>")
    assert template_end_token(tokenizer) == end != tokenizer.eos_token_id
    tokenizer.chat_template = TEMPLATE.replace("<end>", "{{ eos_token }}")
    assert template_end_token(tokenizer) == tokenizer.eos_token_id  # cached per template, not per tokenizer
    plain = end_of_turn_tokenizer()
    plain.chat_template = CHAT_TEMPLATE  # rlhflab's own "role: text" turns write no special token
    assert template_end_token(plain) is None
    bpe = tiny_tokenizer()  # rlhflab's BPE reads the template's newline as <unk>: still no end token
    assert template_end_token(bpe) is None and stop_token_ids(bpe) == [bpe.eos_token_id]


def test_conversational_completion_ends_at_the_template_end_token() -> None:
    tokenizer = end_of_turn_tokenizer()
    end = tokenizer.convert_tokens_to_ids("<end>")
    system = {"role": "system", "content": "be brief"}
    example = tokenize_prompt_completion(tokenizer, [system, user("hello")], [assistant("the movie")], None, None)
    words = tokenizer.encode("the movie", add_special_tokens=False)
    assert example.completion_ids == [*words, end]  # "<end>" kept, the template's " ." after it dropped, no EOS
    prompt = tokenize_prompt(tokenizer, [system, user("hello")], None)
    assert prompt.prompt_ids == example.prompt_ids  # what the sampler is given is the collated prompt
    batch = collate_sequences([example], tokenizer.pad_token_id)
    assert batch["input_ids"][0][batch["response_mask"][0].bool()].tolist()[-1] == end  # in the log-probs
    # a string completion still ends with EOS, and a template without an end token gets EOS appended
    assert tokenize_prompt_completion(tokenizer, "hello", "world", None, None).completion_ids[-1] == tokenizer.eos_token_id
    tokenizer.chat_template = CHAT_TEMPLATE
    plain = tokenize_prompt_completion(tokenizer, [user("hello")], [assistant("world")], None, None)
    assert plain.completion_ids[-1] == tokenizer.eos_token_id and end not in plain.completion_ids


@pytest.mark.parametrize("generation_eos", ["list", "int", "absent"])
def test_stop_tokens_join_eos_template_end_and_generation_config(tmp_path, generation_eos) -> None:
    tokenizer = end_of_turn_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    eos, end = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end>")
    extra = tokenizer.convert_tokens_to_ids("<system>")  # any id a model's generation config lists
    if generation_eos != "absent":
        ids = [end, extra] if generation_eos == "list" else extra
        (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": ids}))
    loaded = load_tokenizer(str(tmp_path))
    expected = {eos, end} | ({extra} if generation_eos != "absent" else set())
    assert stop_token_ids(loaded) == sorted(expected)
    # every collated conversational completion ends with a token the sampler stops at
    example = tokenize_prompt_completion(loaded, [user("hello")], [assistant("world")], None, None)
    assert example.completion_ids[-1] in stop_token_ids(loaded)


def test_decoded_completion_drops_only_its_stop_token() -> None:
    tokenizer = end_of_turn_tokenizer()
    end = tokenizer.convert_tokens_to_ids("<end>")
    words = tokenizer.encode("the movie", add_special_tokens=False)
    stops = [tokenizer.eos_token_id, end]
    assert decode_completion(tokenizer, [*words, end], stops) == "the movie"
    assert decode_completion(tokenizer, words, stops) == "the movie"  # truncated: nothing to drop
