"""Per-row scores from one forward pass, and the per-task metrics the trainer prints before/after training.

CTR: p(Yes) = softmax over the next-token logits of the first tokens of "Yes" and "No" at the answer position.
Rating: expected rating from the softmax over the tokens "1".."5" at the answer position (and the argmax).
Every task: mean answer-token cross-entropy. (Full evaluation with top-K ranking and text metrics is
``ckf_dist.evaluate``.)
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from ckf_dist.data.schema import TASK_IDS

TASK_NAMES = {v: k for k, v in TASK_IDS.items()}


def answer_token_ids(tokenizer) -> dict:
    """First token ids of the fixed answers; raises when two answers share a first token (unscorable)."""
    def first(text: str) -> int:
        return tokenizer(text, add_special_tokens=False)["input_ids"][0]

    ids = {"yes": first("Yes"), "no": first("No"), "digits": [first(str(r)) for r in range(1, 6)]}
    if ids["yes"] == ids["no"] or len(set(ids["digits"])) != 5:
        raise ValueError(f"tokenizer maps answers to shared first tokens {ids}: CTR/rating scores undefined")
    return ids


@torch.no_grad()
def score_rows(answer_logits: torch.Tensor, batch: dict, row_loss: torch.Tensor, ids: dict) -> dict[str, np.ndarray]:
    """answer_logits [B, V] (the logits predicting each row's first answer token: ``CKFModel.forward``'s
    ``answer_logits``) -> per-row arrays: task, label, loss, p_yes, rating_pred."""
    step_logits = answer_logits.float()  # [B, V]
    yn = torch.softmax(step_logits[:, [ids["yes"], ids["no"]]], dim=-1)[:, 0]
    digits = torch.softmax(step_logits[:, ids["digits"]], dim=-1)
    expected = (digits * torch.arange(1, 6, device=digits.device, dtype=digits.dtype)).sum(-1)
    return {
        "task": batch["task_ids"].cpu().numpy(), "label": batch["label"].cpu().numpy(),
        "loss": row_loss.float().cpu().numpy(), "p_yes": yn.cpu().numpy(), "rating_pred": expected.cpu().numpy(),
    }


def summarize(parts: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Concatenated row scores -> {"<task>/loss", "ctr/auc", "ctr/logloss", "rating/rmse", "rating/mae"}."""
    if not parts:
        return {}
    cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    out: dict[str, float] = {}
    by_task = defaultdict(list)
    for i, t in enumerate(cols["task"]):
        by_task[int(t)].append(i)
    for t, rows in sorted(by_task.items()):
        name = TASK_NAMES[t]
        rows = np.asarray(rows)
        out[f"{name}/loss"] = float(cols["loss"][rows].mean())
        out[f"{name}/rows"] = float(len(rows))
        if name == "ctr":
            y, p = cols["label"][rows], np.clip(cols["p_yes"][rows], 1e-7, 1 - 1e-7)
            if len(np.unique(y)) == 2:
                out["ctr/auc"] = float(roc_auc_score(y, p))
            out["ctr/logloss"] = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
        if name == "rating":
            err = cols["rating_pred"][rows] - cols["label"][rows]
            out["rating/rmse"] = float(np.sqrt(np.mean(err ** 2)))
            out["rating/mae"] = float(np.mean(np.abs(err)))
    return out
