"""The embedded default's tokenizer: a small BPE trained on a task's corpus with `tokenizers`.

Metaspace pre-tokenization with prepend_scheme="never" makes encoding additive: the ids of
`prompt + completion` equal ids(prompt) + ids(completion) when the completion starts a new word
with its leading space, so prompt/completion boundaries are exact. Digits are split one per
token and "+"/"=" stand alone, so arithmetic is done digit by digit and "37+48=" + "85" tokenizes
as the whole equation does.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}

# Plain "role: content" turns; a generation prompt ends with "assistant:".
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def train_tokenizer(corpus: list[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a BPE of at most `vocab_size` tokens on `corpus`, wrapped with bos/eos/pad and a chat template."""
    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(prepend_scheme="never"),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.Split(Regex("[+=]"), "isolated"),  # "=8" must not merge: "=" ends the prompt
        ]
    )
    tokenizer.decoder = decoders.Metaspace(prepend_scheme="never")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()), show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)
    wrapped.chat_template = CHAT_TEMPLATE
    wrapped.padding_side = "right"
    return wrapped
