"""The demo tokenizer, built in code (no download): a word-level ``PreTrainedTokenizerFast``.

Words are split on whitespace and looked up in :data:`~pytest_saecheck.demo.language.VOCAB`; unknown words map
to ``<unk>``. Encoding prepends ``<bos>`` (``add_bos_token=True``), which is what TransformerLens expects of a
tokenizer that "prepends BOS" - so ``model.to_tokens(text)`` gives ``<bos>`` at position 0 exactly once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pytest_saecheck.demo.language import BOS, BOS_ID, EOS, NAME, PAD, TOKEN_TO_ID, UNK

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

TOKENIZER_NAME = NAME


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh tokenizer instance (cheap to build; ~100 words)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab=dict(TOKEN_TO_ID), unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)]
    )
    # no decoder: decoding joins the word tokens with single spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        add_bos_token=True,
        padding_side="right",
        model_max_length=10**6,
        name_or_path=TOKENIZER_NAME,
    )
