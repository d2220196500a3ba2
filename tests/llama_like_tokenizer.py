"""A LLaMA-style sentencepiece tokenizer built in the test process (no hub download), shared by the tokenisation
and scoring tests.

Like LLaMA/LLaMA-2: a "▁" word prefix (Metaspace, prepended to the first piece of a text only), digits split
one per token so that "4" encodes as ["▁", "4"], ``tokenizer(text)`` adds BOS ``<s>`` (and no eos), no pad token
(``add_placeholder_token`` makes pad = eos). Punctuation is split off as its own token to make the token lists
of the tests easy to state.
"""
from __future__ import annotations

from typing import Iterable

CORPUS = (
    "The user <cf> interacted with: alpha; beta; gamma. Will the user enjoy delta <cf>? Answer Yes or No.",
    "The user <cf> interacted with: alpha; beta; gamma. Candidates: delta <cf>; omega <cf>. "
    "Which will the user choose next?",
    "The user <cf> rated: alpha: 4; beta: 3.5. How will the user rate delta <cf>? Answer 1 to 5.",
    "The user <cf> is new. Explain what the user thinks of omega <cf>.",
    "Yes", "No", "1", "2", "3", "4", "5", "3.5", "delta", "omega",
)


def build_llama_like_tokenizer(extra_texts: Iterable[str] = ()):
    """``PreTrainedTokenizerFast`` with ``<cf>`` added (``ckf_dist.model.llm.add_placeholder_token``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from ckf_dist.model.llm import add_placeholder_token

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.Punctuation(behavior="isolated"),
    ])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(list(CORPUS) + list(extra_texts), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    return add_placeholder_token(fast)
