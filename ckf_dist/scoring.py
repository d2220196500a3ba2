"""Per-row scores from one forward pass (the held-out evaluation, ``ckf_dist.heldout``, and ``ckf_dist.evaluate``).

CTR: p(Yes) = softmax over the logits of the "Yes" and "No" tokens at the answer position where they differ.
Rating: expected rating from the softmax over the tokens of "1".."5" at the answer position where they differ
(and the argmax). Every task: mean answer-token cross-entropy. (Full evaluation with top-K ranking and text
metrics is ``ckf_dist.evaluate``.)

The position: a byte-level BPE (the tiny tokenizer, SmolLM2) encodes each answer as one token, so the
alternatives differ at answer token 0; a LLaMA/LLaMA-2 sentencepiece tokenizer encodes "4" as ["▁", "4"], so
the digits differ at answer token 1 after the shared "▁". ``answer_token_ids`` finds that position per answer
family and ``score_positions`` gives it per row as ``batch["score_pos"]``, which ``CKFModel.forward`` reads to
return the logits predicting that answer token (teacher-forced: the row's own answer fills the shared prefix).
"""
from __future__ import annotations

import numpy as np
import torch

from ckf_dist.data.schema import TASK_IDS

TASK_NAMES = {v: k for k, v in TASK_IDS.items()}
YES_NO = ("Yes", "No")
DIGITS = tuple(str(r) for r in range(1, 6))
# rating-like tasks, scored over the digits; ctr over Yes/No; the others at answer token 0 (not read)
DIGIT_TASKS = tuple(TASK_IDS[t] for t in ("rating", "review_rating") if t in TASK_IDS)


def differing_position(tokenizer, answers: tuple[str, ...]) -> tuple[list[int], int]:
    """(token id of each answer at k, k): k = the first answer-token position where the answers' tokens differ
    (answers tokenised alone, without special tokens, as ``streaming.tokenize_batch`` tokenises them).

    Raises ValueError when the answers never differ (same tokens, or one a prefix of another), or when their
    tokens at k are not all distinct (some answers then still share their prefix before the token that tells
    them apart): one logit row cannot score them (teacher-forced scoring is undefined).
    """
    seqs = [list(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers]
    shown = {a: s for a, s in zip(answers, seqs)}
    k = 0
    while all(len(s) > k for s in seqs) and len({s[k] for s in seqs}) == 1:
        k += 1
    if any(len(s) <= k for s in seqs):
        what = "never differ" if all(s == seqs[0] for s in seqs) else "differ only after one ends (one is a prefix)"
        raise ValueError(f"tokenizer: the answers {list(answers)} {what}: {shown}; CTR/rating scores undefined")
    at_k = [s[k] for s in seqs]
    if len(set(at_k)) != len(at_k):
        raise ValueError(f"tokenizer: the answers {list(answers)} first differ at answer token {k}, where some "
                         f"still share a token (their prefixes before the token that tells them apart differ): "
                         f"{shown}; CTR/rating scores undefined")
    return at_k, k


def answer_token_ids(tokenizer) -> dict:
    """{"yes": id, "no": id, "yes_no_pos": k, "digits": [5 ids of "1".."5"], "digit_pos": k}: the token ids of
    the fixed answers at the first answer-token position where they differ, and that position (0 = the first
    answer token); raises ValueError when an answer family is unscorable (``differing_position``)."""
    (yes, no), yes_no_pos = differing_position(tokenizer, YES_NO)
    digits, digit_pos = differing_position(tokenizer, DIGITS)
    return {"yes": int(yes), "no": int(no), "yes_no_pos": int(yes_no_pos), "digits": [int(d) for d in digits],
            "digit_pos": int(digit_pos)}


def score_positions(task_ids: torch.Tensor, ids: dict) -> torch.Tensor:
    """[B] int64 on task_ids' device: each row's answer-token position to score (``batch["score_pos"]``):
    ctr -> ids["yes_no_pos"], rating / review_rating -> ids["digit_pos"], other tasks 0."""
    task_ids = task_ids.long()
    pos = torch.zeros_like(task_ids)
    pos = torch.where(task_ids == TASK_IDS["ctr"], torch.full_like(pos, ids["yes_no_pos"]), pos)
    is_digit = torch.zeros_like(task_ids, dtype=torch.bool)
    for t in DIGIT_TASKS:
        is_digit |= task_ids == t
    return torch.where(is_digit, torch.full_like(pos, ids["digit_pos"]), pos)


@torch.no_grad()
def score_rows(answer_logits: torch.Tensor, batch: dict, row_loss: torch.Tensor, ids: dict) -> dict[str, np.ndarray]:
    """answer_logits [B, V] (``CKFModel.forward``'s ``answer_logits``: the logits predicting each row's answer
    token number ``batch["score_pos"]``, which must be ``score_positions(batch["task_ids"], ids)``; it may be
    absent only where every position is 0) -> per-row arrays: task, label, loss, p_yes, rating_pred."""
    want = score_positions(batch["task_ids"], ids)
    got = batch.get("score_pos")
    if (got is None and bool(want.any())) or (got is not None and not torch.equal(got.long().to(want.device), want)):
        raise ValueError("answer_logits must be taken where the answers differ: set batch['score_pos'] = "
                         "scoring.score_positions(batch['task_ids'], ids) before the forward pass "
                         f"(yes_no_pos={ids['yes_no_pos']}, digit_pos={ids['digit_pos']})")
    step_logits = answer_logits.float()  # [B, V]
    yn = torch.softmax(step_logits[:, [ids["yes"], ids["no"]]], dim=-1)[:, 0]
    digits = torch.softmax(step_logits[:, ids["digits"]], dim=-1)
    expected = (digits * torch.arange(1, 6, device=digits.device, dtype=digits.dtype)).sum(-1)
    return {
        "task": batch["task_ids"].cpu().numpy(), "label": batch["label"].cpu().numpy(),
        "loss": row_loss.float().cpu().numpy(), "p_yes": yn.cpu().numpy(), "rating_pred": expected.cpu().numpy(),
    }
