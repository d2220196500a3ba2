"""CTR / rating scoring at the first answer token where the alternatives differ (``scoring.answer_token_ids``,
``scoring.score_positions``): position 1 for a LLaMA-style tokenizer's digits ("4" -> ["▁", "4"]), 0 for the tiny
byte-level BPE; the evaluation scorer (``eval.inference.CKFScorer``) asks the model for the logits there."""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from ckf_dist import scoring
from ckf_dist.data.schema import TASK_IDS
from tests.llama_like_tokenizer import CORPUS

CTR, TOPK, RATING, EXPL, REV = (TASK_IDS[t] for t in ("ctr", "topk", "rating", "explanation", "review_rating"))



def test_answer_token_ids_llama_like_digits_differ_at_position_1(llama):
    ids = scoring.answer_token_ids(llama)
    tid = llama.convert_tokens_to_ids
    assert ids == {"yes": tid("▁Yes"), "no": tid("▁No"), "yes_no_pos": 0,
                   "digits": [tid(str(r)) for r in range(1, 6)], "digit_pos": 1}


def test_answer_token_ids_tiny_bpe_position_0(tiny):
    ids = scoring.answer_token_ids(tiny)
    first = lambda s: tiny(s, add_special_tokens=False)["input_ids"][0]  # noqa: E731
    assert ids == {"yes": first("Yes"), "no": first("No"), "yes_no_pos": 0,
                   "digits": [first(str(r)) for r in range(1, 6)], "digit_pos": 0}
    assert len(set(ids["digits"])) == 5 and ids["yes"] != ids["no"]


class _Vocab:
    """A tokenizer stub: text -> fixed token ids."""

    def __init__(self, table):
        self.table = table

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": list(self.table[text])}


@pytest.mark.parametrize("table,match", [
    ({"Yes": [9, 1], "No": [9, 1]}, "never differ"),  # identical answers
    ({"Yes": [9], "No": [9, 1]}, "prefix"),  # one answer is a prefix of the other
    ({"Yes": [1], "No": [2], "1": [9, 1], "2": [9, 2], "3": [8, 3], "4": [9, 4], "5": [9, 5]}, "differ"),  # "▁3"
])
def test_answer_token_ids_unscorable_raises(table, match):
    full = {"Yes": [1], "No": [2], **{str(r): [10 + r] for r in range(1, 6)}}
    full.update(table)
    with pytest.raises(ValueError, match=match):
        scoring.answer_token_ids(_Vocab(full))


def test_score_positions_by_task(llama, tiny):
    task_ids = torch.tensor([CTR, TOPK, RATING, EXPL, REV, RATING], dtype=torch.int64)
    pos = scoring.score_positions(task_ids, scoring.answer_token_ids(llama))
    assert pos.dtype == torch.int64 and pos.tolist() == [0, 0, 1, 0, 1, 1]
    assert scoring.score_positions(task_ids.to(torch.int8), scoring.answer_token_ids(tiny)).tolist() == [0] * 6


def _position_logits(ids, vocab: int) -> torch.Tensor:
    """[3, V]: logits predicting answer token 0, 1, 2. Position 0 carries p(Yes) = 0.8 and uniform digits (the
    "▁" step of a LLaMA digit); position 1 carries digit probabilities .1 .1 .2 .3 .3 and Yes = No."""
    logits = torch.zeros(3, vocab)
    logits[0, ids["yes"]], logits[0, ids["no"]] = math.log(0.8), math.log(0.2)
    logits[1, ids["digits"]] = torch.log(torch.tensor([0.1, 0.1, 0.2, 0.3, 0.3]))
    return logits


def test_score_rows_hand_computed_at_the_differing_position(llama):
    ids = scoring.answer_token_ids(llama)
    per_pos = _position_logits(ids, len(llama))
    batch = {"task_ids": torch.tensor([CTR, RATING, RATING, REV]), "label": torch.tensor([1.0, 4.0, 2.0, 5.0])}
    batch["score_pos"] = scoring.score_positions(batch["task_ids"], ids)
    s = scoring.score_rows(per_pos[batch["score_pos"]], batch, torch.tensor([0.5, 1.0, 2.0, 3.0]), ids)
    np.testing.assert_allclose(s["p_yes"][0], 0.8, rtol=1e-6)
    expected = 1 * 0.1 + 2 * 0.1 + 3 * 0.2 + 4 * 0.3 + 5 * 0.3  # 3.6
    np.testing.assert_allclose(s["rating_pred"][1:], [expected] * 3, rtol=1e-6)
    np.testing.assert_allclose(np.abs(s["rating_pred"][1:3] - s["label"][1:3]), [0.4, 1.6], rtol=1e-6)
    np.testing.assert_allclose(-np.log(s["p_yes"][0]), -math.log(0.8), rtol=1e-6)


def test_score_rows_refuses_a_batch_scored_at_the_wrong_position(llama, tiny):
    """Without batch["score_pos"] the logits are those of answer token 0: wrong for LLaMA digits."""
    ids = scoring.answer_token_ids(llama)
    batch = {"task_ids": torch.tensor([CTR, RATING]), "label": torch.tensor([1.0, 4.0])}
    with pytest.raises(ValueError, match="score_pos"):
        scoring.score_rows(torch.zeros(2, len(llama)), batch, torch.zeros(2), ids)
    # position 0 everywhere (tiny BPE): score_pos may be absent, as before
    tid = scoring.answer_token_ids(tiny)
    s = scoring.score_rows(torch.zeros(2, len(tiny)), batch, torch.zeros(2), tid)
    np.testing.assert_allclose(s["p_yes"], [0.5, 0.5])
    np.testing.assert_allclose(s["rating_pred"], [3.0, 3.0])


# ----------------------------------------------------------------------------------------- evaluation scorer
class _PositionModel:
    """Stands in for CKFModel under CKFScorer: answer_logits = the logits predicting answer token number
    batch["score_pos"] (CKFModel.forward's contract), here a fixed table per position; records the batches."""

    num_tasks = len(TASK_IDS)

    def __init__(self, per_pos: torch.Tensor):
        self.per_pos, self.batches = per_pos, []

    def __call__(self, batch, text_weight):
        self.batches.append(batch)
        n_tok = (batch["labels"][:, 1:] != -100).sum(1)
        k = batch.get("score_pos", torch.zeros_like(n_tok))
        k = torch.minimum(k, n_tok - 1).clamp(0, self.per_pos.shape[0] - 1)
        return {"answer_logits": self.per_pos[k], "row_loss": torch.full((len(n_tok),), 0.25)}


def test_ckf_scorer_scores_ctr_and_rating_at_the_differing_position(llama, monkeypatch):
    from ckf_dist.config import load_config
    from ckf_dist.eval import inference
    from ckf_dist.eval.metrics import parse_rating

    ids = scoring.answer_token_ids(llama)
    scorer = inference.CKFScorer.__new__(inference.CKFScorer)  # no checkpoint: the model is a stand-in
    scorer.cfg = load_config(["data.num_candidates=2", "eval.batch_size=8", "data.max_seq_len=512"])
    scorer.tokenizer, scorer.device, scorer.form, scorer.answer_ids = llama, torch.device("cpu"), "hybrid", ids
    scorer.titles = {5: "delta", 6: "omega"}
    scorer.model = _PositionModel(_position_logits(ids, len(llama)))
    prompts = []

    def fake_generate(model, rows, task_id, *args, **kwargs):
        prompts.extend(rows)
        return [llama("3.5", add_special_tokens=False)["input_ids"]] * len(rows)  # ["▁", "3", ".", "5"]

    monkeypatch.setattr(inference, "greedy_generate", fake_generate)
    rows = [("ctr", CORPUS[0], "Yes", [5], 1.0), ("rating", CORPUS[2], "4", [5], 4.0), ("topk", CORPUS[1], "delta", [5, 6], 0.0)]
    n = len(rows)
    batch = pa.table({
        "sample_id": [f"s{i}" for i in range(n)], "task_id": pa.array([TASK_IDS[r[0]] for r in rows], pa.int8()),
        "user_id": pa.array([0] * n, pa.int64()), "is_cold": [False] * n,
        "label": pa.array([r[4] for r in rows], pa.float32()), "history_item_ids": pa.array([[1, 2]] * n, pa.list_(pa.int64())),
        "target_item_ids": pa.array([r[3] for r in rows], pa.list_(pa.int64())),
        "prompt_text": [r[1].replace(" <cf>", "") for r in rows], "prompt_hybrid": [r[1] for r in rows],
        "answer": [r[2] for r in rows]})
    out = scorer(batch).to_pydict()
    np.testing.assert_allclose(out["p_yes"][0], 0.8, rtol=1e-6)
    np.testing.assert_allclose(out["score"][0], 0.8, rtol=1e-6)
    np.testing.assert_allclose(out["score"][1], 3.6, rtol=1e-6)  # at "4", not at "▁" (that would be 3.0)
    assert out["generated"][1] == "3.5" and parse_rating(out["generated"][1]) == 3.5
    assert len(out["topk_scores"][2]) == 2
    bos = llama.bos_token_id
    for b in scorer.model.batches:  # ctr, rating and both top-K candidate rows: BOS first, once; answers unprefixed
        assert (b["input_ids"][:, 0] == bos).all() and ((b["input_ids"] == bos).sum(1) == 1).all()
        assert "score_pos" in b and b["score_pos"].tolist() == scoring.score_positions(b["task_ids"], ids).tolist()
    assert prompts and all(p[0] == bos and p.count(bos) == 1 for p in prompts)  # greedy decoding prompts


def test_score_positions_route_each_task_to_its_own_position():
    """ctr rows take yes_no_pos, rating-like rows digit_pos, the rest 0 (positions chosen all different)."""
    ids = {"yes_no_pos": 2, "digit_pos": 1}
    tasks = torch.tensor([TASK_IDS[t] for t in ("ctr", "topk", "rating", "explanation", "review_rating", "ctr")])
    assert scoring.score_positions(tasks, ids).tolist() == [2, 0, 1, 0, 1, 2]
