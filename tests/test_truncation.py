"""Prompt truncation to ``data.max_seq_len`` (``streaming._fit`` / ``tokenize_batch``), stated from the spec rather
than from the implementation: a prompt that does not fit loses exactly its excess tokens from the *start of the
history*, i.e. right after the head (the tokenizer's BOS + "The user" + the user's placeholder); the head, the
end of the prompt (targets / candidates, question) and the answer are kept whole; a prompt that fits exactly is
not touched and not flagged."""
from __future__ import annotations

import pytest

from ckf_dist.data.schema import PLACEHOLDER
from ckf_dist.data.streaming import _fit, prompt_prefix_ids, tokenize_batch
from tests.test_tokenization import CTR, RATING, TOPK, prompt_table

ROWS = {"ctr": CTR, "topk": TOPK, "rating": RATING}



def test_fit_keeps_head_and_tail_drops_the_excess_after_the_head():
    p = list(range(10))
    assert _fit(p, answer_len=2, max_len=12, head=3) == (p, False)  # fits exactly: untouched, not flagged
    assert _fit(p, answer_len=2, max_len=20, head=3) == (p, False)
    assert _fit(p, answer_len=2, max_len=11, head=3) == ([0, 1, 2, 4, 5, 6, 7, 8, 9], True)
    assert _fit(p, answer_len=3, max_len=9, head=2) == ([0, 1, 6, 7, 8, 9], True)  # excess 4
    assert _fit(p, answer_len=0, max_len=7, head=0) == ([3, 4, 5, 6, 7, 8, 9], True)  # no head: the oldest go


def _full(tok, task):
    """Untruncated (hybrid ids, text ids, answer ids) as tokenize_batch gives them with room to spare."""
    out = tokenize_batch(prompt_table([(task,) + ROWS[task]]), tok, max_seq_len=10_000).to_pydict()
    assert out["truncated"] == [False]
    return out["hybrid_prompt_ids"][0], out["text_prompt_ids"][0], out["answer_ids"][0]


@pytest.mark.parametrize("task", list(ROWS))
def test_a_prompt_that_fits_exactly_is_untouched(llama, task):
    hyb, txt, ans = _full(llama, task)
    out = tokenize_batch(prompt_table([(task,) + ROWS[task]]), llama, max_seq_len=len(hyb) + len(ans)).to_pydict()
    assert out["truncated"] == [False]
    assert out["hybrid_prompt_ids"][0] == hyb and out["text_prompt_ids"][0] == txt and out["answer_ids"][0] == ans


@pytest.mark.parametrize("cut", [1, 3])
@pytest.mark.parametrize("task", list(ROWS))
@pytest.mark.parametrize("which", ["llama", "tiny"])
def test_cut_removes_exactly_the_excess_right_after_the_users_placeholder(llama, tiny, which, task, cut):
    tok = llama if which == "llama" else tiny
    ph = tok.convert_tokens_to_ids(PLACEHOLDER)
    hyb, txt, ans = _full(tok, task)
    max_len = len(hyb) + len(ans) - cut
    out = tokenize_batch(prompt_table([(task,) + ROWS[task]]), tok, max_seq_len=max_len).to_pydict()
    got = out["hybrid_prompt_ids"][0]
    head = hyb.index(ph) + 1  # prefix + "The user" + the user's placeholder
    assert got[:head] == hyb[:head]  # the head whole
    assert got[head:] == hyb[len(hyb) - (max_len - len(ans) - head):]  # then the prompt's last tokens
    assert len(got) + len(ans) == max_len and out["truncated"] == [True]
    assert out["answer_ids"][0] == ans  # never cut
    assert got.count(ph) == hyb.count(ph)  # targets / candidates keep their placeholders


@pytest.mark.parametrize("task", list(ROWS))
def test_text_form_keeps_bos_and_the_user_then_its_own_last_tokens(llama, task):
    hyb, txt, ans = _full(llama, task)
    cut_h = 6
    max_len = len(hyb) + len(ans) - cut_h
    out = tokenize_batch(prompt_table([(task,) + ROWS[task]]), llama, max_seq_len=max_len).to_pydict()
    got = out["text_prompt_ids"][0]
    head = prompt_prefix_ids(llama) + llama("The user", add_special_tokens=False)["input_ids"]
    excess = len(txt) + len(ans) - max_len  # the text form is shorter (no placeholders): it may need less cut
    if excess <= 0:
        assert got == txt
    else:
        assert got[:len(head)] == head == txt[:len(head)]
        assert got[len(head):] == txt[len(head) + excess:]
        assert len(got) + len(ans) == max_len
