"""Prompt tokenisation (``streaming.tokenize_batch``): the tokenizer's own start-of-text convention (BOS for
LLaMA-style sentencepiece tokenizers, nothing for the tiny byte-level BPE), never on answers; truncation to
``data.max_seq_len`` cuts history tokens only, keeping BOS, the intro head, targets/candidates and the answer."""
from __future__ import annotations

import pyarrow as pa
import pytest

from ckf_dist.data.schema import PLACEHOLDER, TASK_IDS
from ckf_dist.data.streaming import prompt_prefix_ids, tokenize_batch

CTR = ("The user <cf> interacted with: alpha; beta; gamma. Will the user enjoy delta <cf>? Answer Yes or No.", "Yes")
TOPK = ("The user <cf> interacted with: alpha; beta; gamma. Candidates: delta <cf>; omega <cf>. "
        "Which will the user choose next?", "delta")
RATING = ("The user <cf> rated: alpha: 4; beta: 3.5. How will the user rate delta <cf>? Answer 1 to 5.", "4")



def prompt_table(rows) -> pa.Table:
    """rows: (task, hybrid prompt, answer) -> the columns ``tokenize_batch`` reads."""
    n = len(rows)
    targets = [[7] * (hyb.count(PLACEHOLDER) - 1) for _, hyb, _ in rows]
    return pa.table({
        "sample_id": [f"s{i}" for i in range(n)], "task_id": pa.array([TASK_IDS[t] for t, _, _ in rows], pa.int8()),
        "user_id": pa.array(range(n), pa.int64()), "is_cold": [False] * n, "label": pa.array([1.0] * n, pa.float32()),
        "history_item_ids": pa.array([[1, 2, 3]] * n, pa.list_(pa.int64())),
        "target_item_ids": pa.array(targets, pa.list_(pa.int64())),
        "prompt_text": [hyb.replace(" " + PLACEHOLDER, "") for _, hyb, _ in rows],
        "prompt_hybrid": [hyb for _, hyb, _ in rows], "answer": [a for _, _, a in rows],
    })


def tokens(tok, ids) -> list[str]:
    return tok.convert_ids_to_tokens(list(ids))


def test_llama_like_tokenizer_behaves_like_llama(llama):
    """The fixture itself: "4" -> ["▁", "4"], tokenizer(text) adds BOS and nothing at the end, pad = eos."""
    assert tokens(llama, llama("4", add_special_tokens=False)["input_ids"]) == ["▁", "4"]
    assert tokens(llama, llama("Yes")["input_ids"]) == ["<s>", "▁Yes"]
    assert llama.bos_token_id is not None and llama.pad_token_id == llama.eos_token_id


def test_llama_prompts_start_with_bos_once_answers_never(llama):
    assert prompt_prefix_ids(llama) == [llama.bos_token_id]
    rows = [("ctr",) + CTR, ("topk",) + TOPK, ("rating",) + RATING]
    out = tokenize_batch(prompt_table(rows), llama, max_seq_len=512).to_pydict()
    bos, eos = llama.bos_token_id, llama.eos_token_id
    for i, (_, hyb, answer) in enumerate(rows):
        for form, text in (("hybrid", hyb), ("text", hyb.replace(" " + PLACEHOLDER, ""))):
            ids = out[f"{form}_prompt_ids"][i]
            assert ids[0] == bos and ids.count(bos) == 1, (form, tokens(llama, ids))
            assert ids == [bos] + llama(text, add_special_tokens=False)["input_ids"]
        assert out["answer_ids"][i] == llama(answer, add_special_tokens=False)["input_ids"] + [eos]
        assert bos not in out["answer_ids"][i]
    assert not any(out["truncated"])
    # <cf> is added with lstrip: it absorbs the space before it (no lone "▁" token that no text prompt has)
    assert tokens(llama, out["hybrid_prompt_ids"][0][:5]) == ["<s>", "▁The", "▁user", PLACEHOLDER, "▁interacted"]


def test_tiny_tokenizer_prompts_get_nothing_added(tiny):
    """No post-processor (like SmolLM2's GPT-2-style tokenizer): tokenizer(text) adds nothing, nor does
    tokenize_batch, even though the tokenizer has a bos_token."""
    assert tiny.bos_token is not None and prompt_prefix_ids(tiny) == []
    rows = [("ctr",) + CTR, ("topk",) + TOPK, ("rating",) + RATING]
    out = tokenize_batch(prompt_table(rows), tiny, max_seq_len=512).to_pydict()
    for i, (_, hyb, answer) in enumerate(rows):
        assert out["hybrid_prompt_ids"][i] == tiny(hyb, add_special_tokens=False)["input_ids"]
        assert out["text_prompt_ids"][i] == tiny(hyb.replace(" " + PLACEHOLDER, ""), add_special_tokens=False)["input_ids"]
        assert out["answer_ids"][i] == tiny(answer, add_special_tokens=False)["input_ids"] + [tiny.eos_token_id]


def test_truncation_cuts_history_only_keeps_bos_head_candidates_answer(llama):
    """Top-K prompt of 28 hybrid tokens (25 text tokens) + answer ["▁delta", "</s>"], cut to 24 tokens."""
    out = tokenize_batch(prompt_table([("topk",) + TOPK]), llama, max_seq_len=24).to_pydict()
    tail = ["▁Candidates", ":", "▁delta", PLACEHOLDER, ";", "▁omega", PLACEHOLDER, ".",
            "▁Which", "▁will", "▁the", "▁user", "▁choose", "▁next", "?"]
    # full hybrid: <s> ▁The ▁user <cf> ▁interacted ▁with : ▁alpha ; ▁beta ; ▁gamma . + tail: 6 tokens cut
    assert tokens(llama, out["hybrid_prompt_ids"][0]) == ["<s>", "▁The", "▁user", PLACEHOLDER, ";", "▁gamma",
                                                          "."] + tail
    # full text: <s> ▁The ▁user ▁interacted ▁with : ▁alpha ; ▁beta ; ▁gamma . + text_tail: 3 tokens cut
    text_tail = ["▁Candidates", ":", "▁delta", ";", "▁omega", ".", "▁Which", "▁will", "▁the", "▁user", "▁choose",
                 "▁next", "?"]
    assert tokens(llama, out["text_prompt_ids"][0]) == ["<s>", "▁The", "▁user", "▁alpha", ";", "▁beta", ";",
                                                        "▁gamma", "."] + text_tail
    assert tokens(llama, out["answer_ids"][0]) == ["▁delta", "</s>"]
    assert len(out["hybrid_prompt_ids"][0]) + 2 == 24 and len(out["text_prompt_ids"][0]) + 2 == 24
    assert out["truncated"] == [True]


def test_truncation_into_the_targets_raises(llama):
    """A cut that would reach a candidate's placeholder is refused by the placeholder check."""
    with pytest.raises(ValueError, match="after cutting it to data.max_seq_len"):
        tokenize_batch(prompt_table([("topk",) + TOPK]), llama, max_seq_len=14)
