"""The evaluation glue with exact values on hand-made inputs (no trained model, no Ray):

* ``evaluate.compute_metrics`` / ``group_masks``: how scored rows are grouped into all / warm / cold and how the
  CTR p(Yes), the top-K candidate scores and the ratings feed the metrics (3 users, values computed by hand);
* ``eval.inference.CKFScorer``: a stand-in model whose outputs depend on the row (user, candidate title), so the
  scores must land in the right row, in candidate order, with p(Yes) not p(No);
* ``eval.inference.CFScorer`` and ``evaluate.fit_cf_baseline``: the CF-only baseline's u.v scoring and its fits.
"""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ckf_dist import evaluate as E
from ckf_dist.data.schema import TASK_IDS
from ckf_dist.eval import inference
from ckf_dist.eval.inference import OUT_SCHEMA

CTR, TOPK, RATING, EXPL = (TASK_IDS[t] for t in ("ctr", "topk", "rating", "explanation"))
GROUPS = ["all", "warm", "cold"]
COLD = {0: False, 1: False, 2: True}  # users 0 and 1 warm, user 2 cold
REF = "the cat sat on the mat"


def _row(task, user, label, **cols):
    row = {name: None for name in OUT_SCHEMA.names}
    row.update(sample_id=f"{task}-{user}-{label}", task_id=task, user_id=user, is_cold=COLD[user], label=label)
    row.update(cols)
    return row


def _table(rows) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=OUT_SCHEMA)


# (user, label, p_yes): users 0, 1 warm, 2 cold
CTR_ROWS = [(0, 1, 0.9), (0, 0, 0.4), (1, 1, 0.3), (1, 0, 0.6), (1, 0, 0.2), (2, 1, 0.5), (2, 0, 0.8)]
# (user, positive index, candidate scores)
TOPK_ROWS = [(0, 1, [0.1, 0.9, 0.3, 0.2]),  # positive ranked first
             (1, 2, [0.5, 0.4, 0.3, 0.2]),  # positive third
             (2, 0, [0.2, 0.2, 0.9, 0.1])]  # one above, one tie: rank 1 or 2 with probability 1/2 each
# (user, label, generated answer, expected rating)
RATING_ROWS = [(0, 4.0, "4", 3.5), (1, 2.0, "five stars", 2.5), (2, 5.0, "3", 4.0)]


def handmade_table() -> pa.Table:
    rows = [_row(CTR, u, y, p_yes=p, score=p, loss=0.1 * (k + 1)) for k, (u, y, p) in enumerate(CTR_ROWS)]
    rows += [_row(TOPK, u, pos, topk_scores=s, loss=1.0 + u) for u, pos, s in TOPK_ROWS]
    rows += [_row(RATING, u, y, generated=g, score=e, loss=2.0) for u, y, g, e in RATING_ROWS]
    rows += [_row(EXPL, 0, -1.0, generated=REF, reference=REF, loss=3.0),
             _row(EXPL, 2, -1.0, generated="dog", reference=REF, loss=5.0)]
    return _table(rows)


def ln(x):
    return math.log(x)


# The expected metrics, by hand (see the row comments above).
EXPECTED = {
    "ctr": {
        # all: positives .9 .3 .5 vs negatives .4 .6 .2 .8: .9 beats 4, .3 beats 1, .5 beats 2 -> 7 of 12 pairs
        "all": {"auc": 7 / 12, "uauc": (1.0 + 0.5 + 0.0) / 3, "uauc_users": 3,
                "logloss": -(ln(.9) + ln(.6) + ln(.3) + ln(.4) + ln(.8) + ln(.5) + ln(.2)) / 7, "loss": 0.4},
        # warm: .9 beats .4 .6 .2, .3 beats .2 -> 4 of 6; per user: user 0 1.0, user 1 (.3 vs .6, .2) 0.5
        "warm": {"auc": 4 / 6, "uauc": 0.75, "uauc_users": 2,
                 "logloss": -(ln(.9) + ln(.6) + ln(.3) + ln(.4) + ln(.8)) / 5, "loss": 0.3},
        "cold": {"auc": 0.0, "uauc": 0.0, "uauc_users": 1, "logloss": -(ln(.5) + ln(.2)) / 2, "loss": 0.65},
    },
    "topk": {  # positive ranks: 0; 2; 1 or 2 (tie, expectation)
        "all": {"hr@1": 1 / 3, "hr@5": 1.0, "hr@10": 1.0,
                "ndcg@5": (1.0 + 0.5 + (1 / math.log2(3) + 0.5) / 2) / 3,
                "ndcg@10": (1.0 + 0.5 + (1 / math.log2(3) + 0.5) / 2) / 3,
                "mrr": (1.0 + 1 / 3 + (1 / 2 + 1 / 3) / 2) / 3, "loss": 2.0},
        "warm": {"hr@1": 0.5, "hr@5": 1.0, "hr@10": 1.0, "ndcg@5": 0.75, "ndcg@10": 0.75, "mrr": (1 + 1 / 3) / 2,
                 "loss": 1.5},
        "cold": {"hr@1": 0.0, "hr@5": 1.0, "hr@10": 1.0, "ndcg@5": (1 / math.log2(3) + 0.5) / 2,
                 "ndcg@10": (1 / math.log2(3) + 0.5) / 2, "mrr": (1 / 2 + 1 / 3) / 2, "loss": 3.0},
    },
    "rating": {  # predictions 4, 3 (unparsable -> fallback 3.0), 3; expected ratings 3.5, 2.5, 4.0
        "all": {"mae": 1.0, "rmse": math.sqrt(5 / 3), "unparsable": 1.0, "unparsable_rate": 1 / 3,
                "fallback_rating": 3.0, "expected_mae": 2 / 3, "expected_rmse": math.sqrt(0.5), "loss": 2.0},
        "warm": {"mae": 0.5, "rmse": math.sqrt(0.5), "unparsable": 1.0, "unparsable_rate": 0.5,
                 "fallback_rating": 3.0, "expected_mae": 0.5, "expected_rmse": 0.5, "loss": 2.0},
        "cold": {"mae": 2.0, "rmse": 2.0, "unparsable": 0.0, "unparsable_rate": 0.0, "fallback_rating": 3.0,
                 "expected_mae": 1.0, "expected_rmse": 1.0, "loss": 2.0},
    },
    "explanation": {
        "warm": {"bleu4": 100.0, "rouge_l": 100.0, "loss": 3.0},
        "cold": {"bleu4": 0.0, "rouge_l": 0.0, "loss": 5.0},
    },
}


def assert_metrics(got: dict, want: dict, where: str = "") -> None:
    assert set(got) == set(want), (where, sorted(got), sorted(want))
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-6, abs=1e-9), f"{where} {k}: {got[k]} != {v}"  # float32 columns


def test_group_masks():
    m = E.group_masks(np.array([False, True, False]), GROUPS)
    assert m["all"].tolist() == [True, True, True]
    assert m["warm"].tolist() == [True, False, True]
    assert m["cold"].tolist() == [False, True, False]
    assert list(E.group_masks(np.array([True]), ["cold"])) == ["cold"]


def test_compute_metrics_hand_computed_all_warm_cold():
    metrics, n_rows = E.compute_metrics(handmade_table(), ["ctr", "topk", "rating", "explanation"], GROUPS,
                                        fallback_rating=3.0)
    assert n_rows == {"ctr": {"all": 7, "warm": 5, "cold": 2}, "topk": {"all": 3, "warm": 2, "cold": 1},
                      "rating": {"all": 3, "warm": 2, "cold": 1}, "explanation": {"all": 2, "warm": 1, "cold": 1}}
    for task in ("ctr", "topk", "rating"):
        for group in GROUPS:
            assert_metrics(metrics[task][group], EXPECTED[task][group], f"{task}/{group}")
    for group in ("warm", "cold"):
        assert_metrics(metrics["explanation"][group], EXPECTED["explanation"][group], f"explanation/{group}")
    m = metrics["explanation"]["all"]
    assert m["rouge_l"] == pytest.approx(50.0) and m["loss"] == pytest.approx(4.0)
    from ckf_dist.eval.metrics import bleu4  # corpus BLEU over both rows (not a mean of the two)

    assert m["bleu4"] == pytest.approx(bleu4([REF, "dog"], [REF, REF]))


def test_compute_metrics_without_model_loss_and_empty_groups():
    """CF-only rows (has_loss=False): no expected_* rating metrics, no loss; a group without rows is {} / 0."""
    table = handmade_table()
    keep = [r for r in table.to_pylist() if r["task_id"] == RATING and not r["is_cold"]]
    for r in keep:
        r["loss"] = None
    metrics, n_rows = E.compute_metrics(_table(keep), ["rating", "ctr"], GROUPS, 3.0, has_loss=False)
    assert n_rows == {"rating": {"all": 2, "warm": 2, "cold": 0}, "ctr": {"all": 0, "warm": 0, "cold": 0}}
    assert metrics["rating"]["cold"] == {} and metrics["ctr"] == {"all": {}, "warm": {}, "cold": {}}
    want = {k: v for k, v in EXPECTED["rating"]["warm"].items() if not k.startswith("expected_") and k != "loss"}
    assert_metrics(metrics["rating"]["all"], want, "rating/all (= warm rows)")


# --------------------------------------------------------------------------------------- CKFScorer glue
TITLES = {10: "alpha", 11: "beta", 12: "gamma", 13: "delta"}
TITLE_LOSS = {"alpha": 0.5, "beta": 2.0, "gamma": 1.0, "delta": 3.0}  # mean answer-token CE per candidate
P_YES = {0: 0.9, 1: 0.3, 2: 0.6}  # per user
DIGIT_P = {0: [0.1, 0.1, 0.2, 0.3, 0.3], 1: [0.5, 0.2, 0.1, 0.1, 0.1], 2: [0.0, 0.0, 0.0, 0.0, 1.0]}
USER_LOSS = {0: 0.25, 1: 0.75, 2: 1.25}
GENERATED = {0: "4", 1: "no idea", 2: "3"}


class RowAwareModel:
    """Stands in for CKFModel: answer logits from the row's user (p(Yes) = P_YES[user], digits DIGIT_P[user]),
    row loss from the row's answer tokens (a candidate title: TITLE_LOSS) or else from the user. Every output
    therefore says which row it belongs to, whatever order the batch is in."""

    num_tasks = len(TASK_IDS)

    def __init__(self, tokenizer, ids):
        self.ids, self.vocab = ids, len(tokenizer)
        eos = tokenizer.eos_token_id
        self.by_answer = {tuple(tokenizer(t, add_special_tokens=False)["input_ids"] + [eos]): loss
                          for t, loss in TITLE_LOSS.items()}
        self.calls = 0

    def __call__(self, batch, text_weight=0.5, **kwargs):
        self.calls += 1
        n = batch["input_ids"].shape[0]
        logits = torch.full((n, self.vocab), -1e4)
        loss = torch.zeros(n)
        for b in range(n):
            u = int(batch["user_ids"][b])
            logits[b, self.ids["yes"]], logits[b, self.ids["no"]] = ln(P_YES[u]), ln(1 - P_YES[u])
            logits[b, self.ids["digits"]] = torch.log(torch.tensor(DIGIT_P[u]).clamp_min(1e-30))
            answer = batch["labels"][b][batch["labels"][b] != -100].tolist()
            loss[b] = self.by_answer.get(tuple(answer), USER_LOSS[u])
        return {"answer_logits": logits, "row_loss": loss}


@pytest.fixture(scope="module")
def llama():
    from tests.llama_like_tokenizer import build_llama_like_tokenizer

    return build_llama_like_tokenizer(extra_texts=["alpha beta gamma delta"])


def _prompt(task, targets):
    intro = "The user <cf> interacted with: alpha; beta."
    if task == "ctr":
        return intro + f" Will the user enjoy {TITLES[targets[0]]} <cf>? Answer Yes or No."
    if task == "topk":
        return intro + " Candidates: " + "; ".join(f"{TITLES[t]} <cf>" for t in targets) + \
            ". Which will the user choose next?"
    return "The user <cf> rated: alpha: 4; beta: 3.5. How will the user rate delta <cf>? Answer 1 to 5."


def raw_batch(rows) -> pa.Table:
    """rows: (task, user, targets, label, answer) -> raw prompt rows (evaluate.EVAL_COLUMNS)."""
    n = len(rows)
    hyb = [_prompt(t, tg) for t, _, tg, _, _ in rows]
    return pa.table({
        "sample_id": [f"s{i}" for i in range(n)], "task_id": pa.array([TASK_IDS[r[0]] for r in rows], pa.int8()),
        "user_id": pa.array([r[1] for r in rows], pa.int64()), "is_cold": [COLD[r[1]] for r in rows],
        "history_item_ids": pa.array([[10, 11]] * n, pa.list_(pa.int64())),
        "target_item_ids": pa.array([r[2] for r in rows], pa.list_(pa.int64())),
        "label": pa.array([r[3] for r in rows], pa.float32()),
        "prompt_text": [h.replace(" <cf>", "") for h in hyb], "prompt_hybrid": hyb, "answer": [r[4] for r in rows]})


# top-K rows: (user, candidates, positive index); mixed with CTR and rating rows, users in no particular order
TOPK_IN = [(2, [10, 11, 12, 13], 3), (0, [13, 12, 11, 10], 3), (1, [11, 10, 13, 12], 2)]
CTR_IN = [(1, 10, 1.0), (0, 11, 0.0), (2, 12, 1.0), (0, 13, 1.0), (1, 11, 0.0)]
RATING_IN = [(2, 5.0), (0, 4.0), (1, 1.0)]


def scorer_rows():
    rows = [("ctr", u, [t], y, "Yes" if y else "No") for u, t, y in CTR_IN[:3]]
    rows += [("topk", u, c, float(p), TITLES[c[p]]) for u, c, p in TOPK_IN]
    rows += [("rating", u, [13], y, f"{y:g}") for u, y in RATING_IN]
    rows += [("ctr", u, [t], y, "Yes" if y else "No") for u, t, y in CTR_IN[3:]]
    return rows


def make_scorer(llama, monkeypatch, topk_score="mean", batch_size=4):
    from ckf_dist import scoring
    from ckf_dist.config import load_config

    ids = scoring.answer_token_ids(llama)
    scorer = inference.CKFScorer.__new__(inference.CKFScorer)  # no checkpoint: the model is a stand-in
    scorer.cfg = load_config(["data.num_candidates=4", f"eval.batch_size={batch_size}", "data.max_seq_len=512",
                              f"eval.topk_score={topk_score}"])
    scorer.tokenizer, scorer.device, scorer.form, scorer.answer_ids = llama, torch.device("cpu"), "hybrid", ids
    scorer.titles = dict(TITLES)
    scorer.model = RowAwareModel(llama, ids)

    def fake_generate(model, prompts, task_id, is_hybrid, user_ids, *args, **kwargs):
        return [llama(GENERATED[int(u)], add_special_tokens=False)["input_ids"] for u in user_ids]

    monkeypatch.setattr(inference, "greedy_generate", fake_generate)
    return scorer


@pytest.mark.parametrize("batch_size", [4, 16])
def test_ckf_scorer_puts_each_score_in_its_row_and_candidate_order(llama, monkeypatch, batch_size):
    scorer = make_scorer(llama, monkeypatch, batch_size=batch_size)
    rows = scorer_rows()
    out = scorer(raw_batch(rows)).to_pydict()
    assert out["sample_id"] == [f"s{i}" for i in range(len(rows))]
    for i, (task, u, targets, label, _) in enumerate(rows):
        assert out["user_id"][i] == u and out["is_cold"][i] == COLD[u] and out["label"][i] == label
        if task == "ctr":
            assert out["p_yes"][i] == pytest.approx(P_YES[u], rel=1e-6), (i, "p(Yes), not p(No)")
            assert out["score"][i] == pytest.approx(P_YES[u], rel=1e-6)
            assert out["loss"][i] == pytest.approx(USER_LOSS[u]) and out["topk_scores"][i] is None
        elif task == "topk":
            want = [-TITLE_LOSS[TITLES[c]] for c in targets]  # mean log-prob, in candidate order
            assert out["topk_scores"][i] == pytest.approx(want, rel=1e-6), (i, targets)
            assert out["loss"][i] == pytest.approx(TITLE_LOSS[TITLES[targets[int(label)]]])  # the positive's CE
            assert out["p_yes"][i] is None
        else:
            assert out["score"][i] == pytest.approx(float(np.dot(DIGIT_P[u], [1, 2, 3, 4, 5])), rel=1e-6)
            assert out["generated"][i] == GENERATED[u] and out["reference"][i] == f"{label:g}"


def test_ckf_scorer_sum_scores_weight_by_answer_length(llama, monkeypatch):
    """eval.topk_score=sum: -CE x (title tokens + eos) per candidate."""
    scorer = make_scorer(llama, monkeypatch, topk_score="sum")
    rows = [("topk", u, c, float(p), TITLES[c[p]]) for u, c, p in TOPK_IN]
    out = scorer(raw_batch(rows)).to_pydict()
    n_tok = {t: len(llama(t, add_special_tokens=False)["input_ids"]) + 1 for t in TITLE_LOSS}
    for i, (_, _, cands, _, _) in enumerate(rows):
        want = [-TITLE_LOSS[TITLES[c]] * n_tok[TITLES[c]] for c in cands]
        assert out["topk_scores"][i] == pytest.approx(want, rel=1e-6)


def test_ckf_scorer_output_feeds_the_metrics_exactly(llama, monkeypatch):
    """Scorer -> compute_metrics, by hand: CTR p(Yes) per user, top-K ranks from the candidate CE, ratings."""
    scorer = make_scorer(llama, monkeypatch)
    metrics, n_rows = E.compute_metrics(scorer(raw_batch(scorer_rows())), ["ctr", "topk", "rating"], GROUPS, 3.0)
    assert n_rows["ctr"] == {"all": 5, "warm": 4, "cold": 1} and n_rows["topk"] == {"all": 3, "warm": 2, "cold": 1}
    ctr = metrics["ctr"]
    # (user, label, p): (1, 1, .3) (0, 0, .9) (2, 1, .6) (0, 1, .9) (1, 0, .3)
    # all: positives .3 .6 .9 vs negatives .9 .3: .3 ties .3 (1/2); .6 beats .3; .9 ties .9, beats .3 -> 3/6
    assert ctr["all"]["auc"] == pytest.approx(3 / 6)
    assert ctr["warm"]["auc"] == pytest.approx(2 / 4)  # positives .3 .9 vs .9 .3 -> (0 + 0.5 + 0.5 + 1) / 4
    assert ctr["warm"]["uauc"] == pytest.approx(0.5) and ctr["warm"]["uauc_users"] == 2  # each user ties .5
    assert ctr["cold"]["auc"] is None and ctr["cold"]["uauc_users"] == 0
    assert ctr["all"]["logloss"] == pytest.approx(-(ln(.3) + ln(.1) + ln(.6) + ln(.9) + ln(.7)) / 5, rel=1e-6)
    # top-K, candidate score = -CE: alpha -.5 > gamma -1 > beta -2 > delta -3
    # user 2: positive delta -> rank 3; user 0: positive alpha -> rank 0; user 1: positive delta -> rank 3
    topk = metrics["topk"]
    assert topk["all"]["hr@1"] == pytest.approx(1 / 3) and topk["warm"]["hr@1"] == pytest.approx(0.5)
    assert topk["cold"]["hr@1"] == 0.0 and topk["cold"]["mrr"] == pytest.approx(1 / 4)
    assert topk["all"]["ndcg@5"] == pytest.approx((1 / math.log2(5) + 1.0 + 1 / math.log2(5)) / 3)
    rating = metrics["rating"]  # labels 5 (user 2), 4 (user 0), 1 (user 1); answers 3, 4, unparsable -> 3
    assert rating["all"]["mae"] == pytest.approx((2 + 0 + 2) / 3) and rating["all"]["unparsable"] == 1
    assert rating["cold"]["mae"] == pytest.approx(2.0) and rating["warm"]["mae"] == pytest.approx(1.0)
    assert rating["cold"]["expected_mae"] == pytest.approx(0.0, abs=1e-6)  # user 2: all mass on "5"


# --------------------------------------------------------------------------------------- CF-only baseline
USERS = np.array([[1.0, 0.0], [0.0, 2.0], [0.5, 0.5]])  # users 0, 1; last row = fallback
ITEMS = np.array([[3.0, 1.0], [1.0, 1.0], [-1.0, 2.0], [0.0, 0.0]])  # items 0, 1, 2; last row = fallback


def test_cf_scorer_scores_u_dot_v_and_feeds_the_metrics():
    scorer = inference.CFScorer(USERS, ITEMS, ctr_fit=(0.5, -1.0), rating_fit=(1.5, 2.0))
    rows = [  # (task, user, targets, label); user 7 / item 9 are unknown -> fallback rows
        ("ctr", 0, [0], 1.0),  # s = 3
        ("ctr", 1, [2], 0.0),  # s = 4
        ("ctr", 0, [2], 0.0),  # s = -1
        ("ctr", 7, [1], 1.0),  # s = 0.5 + 0.5 = 1
        ("topk", 1, [0, 1, 2, 9], 0.0),  # s = 2, 2, 4, 0: one above, one tie
        ("rating", 0, [1], 4.0),  # s = 1 -> 1.5 + 2 = 3.5
        ("rating", 1, [0], 5.0),  # s = 2 -> 5.0
        ("rating", 0, [0], 2.0),  # s = 3 -> 6.5, clipped to 5
    ]
    batch = pa.table({
        "sample_id": [f"s{i}" for i in range(len(rows))], "task_id": pa.array([TASK_IDS[r[0]] for r in rows], pa.int8()),
        "user_id": pa.array([r[1] for r in rows], pa.int64()), "is_cold": [r[1] == 7 for r in rows],
        "target_item_ids": pa.array([r[2] for r in rows], pa.list_(pa.int64())),
        "label": pa.array([r[3] for r in rows], pa.float32()), "answer": ["x"] * len(rows)})
    out = scorer(batch).to_pydict()
    sig = lambda s: 1 / (1 + math.exp(-(0.5 * s - 1.0)))  # noqa: E731
    assert out["score"][:4] == pytest.approx([3.0, 4.0, -1.0, 1.0])
    assert out["p_yes"][:4] == pytest.approx([sig(3), sig(4), sig(-1), sig(1)], rel=1e-6)
    assert out["topk_scores"][4] == pytest.approx([2.0, 2.0, 4.0, 0.0])
    assert out["score"][5:] == pytest.approx([3.5, 5.0, 5.0]) and out["generated"][5:] == ["3.500000", "5.000000", "5.000000"]
    assert all(x is None for x in out["loss"])
    metrics, _ = E.compute_metrics(scorer(batch), ["ctr", "topk", "rating"], GROUPS, 3.0, has_loss=False)
    # ctr all: positives 3, 1 vs negatives 4, -1 -> 2 of 4; the ranking uses u.v, the log loss p_yes
    assert metrics["ctr"]["all"]["auc"] == pytest.approx(0.5)
    assert metrics["ctr"]["all"]["logloss"] == pytest.approx(
        -(ln(sig(3)) + ln(1 - sig(4)) + ln(1 - sig(-1)) + ln(sig(1))) / 4, rel=1e-6)
    assert metrics["ctr"]["warm"]["auc"] == pytest.approx(0.5)  # positive 3 vs 4, -1
    assert metrics["topk"]["all"]["hr@1"] == 0.0 and metrics["topk"]["all"]["mrr"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    r = metrics["rating"]["all"]  # predictions 3.5, 5, 5 vs labels 4, 5, 2
    assert r["mae"] == pytest.approx((0.5 + 0 + 3) / 3) and r["unparsable"] == 0 and "expected_mae" not in r


def test_fit_cf_baseline_on_handmade_train_rows(tmp_path):
    """Rating fit: least squares of train ratings on u.v (exact line here); CTR fit: Platt scaling increasing in
    u.v when clicks have the larger u.v; the fallback rating is the train mean."""
    from ckf_dist.config import load_config

    (tmp_path / "interactions").mkdir()
    (tmp_path / "prompts" / "train").mkdir(parents=True)
    # u.v for (user, item): (0,0) 3, (0,1) 1, (1,0) 2, (1,2) 4, (0,2) -1; ratings 1 + s on train; a test row off the line
    inter = [(0, 0, 4.0, "train"), (0, 1, 2.0, "train"), (1, 0, 3.0, "train"), (1, 2, 5.0, "train"), (0, 2, 1.0, "test")]
    pq.write_table(pa.table({"user_id": pa.array([r[0] for r in inter], pa.int64()),
                             "item_id": pa.array([r[1] for r in inter], pa.int64()),
                             "rating": pa.array([r[2] for r in inter], pa.float32()),
                             "split": [r[3] for r in inter]}), tmp_path / "interactions" / "part-0.parquet")
    ctr = [(0, 0, 1.0), (1, 2, 1.0), (0, 2, 0.0), (0, 1, 0.0), (1, 1, 1.0), (1, 0, 0.0)]  # s: 3, 4, -1, 1, 2, 2
    pq.write_table(pa.table({"task_id": pa.array([CTR] * len(ctr) + [RATING], pa.int8()),
                             "user_id": pa.array([r[0] for r in ctr] + [0], pa.int64()),
                             "target_item_ids": pa.array([[r[1]] for r in ctr] + [[2]], pa.list_(pa.int64())),
                             "label": pa.array([r[2] for r in ctr] + [1.0], pa.float32())}),
                   tmp_path / "prompts" / "train" / "part-0.parquet")
    cfg = load_config([f"data.path={tmp_path}"])
    assert E.train_mean_rating(cfg) == pytest.approx(3.5)
    (a, b), (c, d) = E.fit_cf_baseline(cfg, USERS, ITEMS)
    assert (c, d) == pytest.approx((1.0, 1.0))
    assert a > 0  # p(click) rises with u.v
    p = lambda s: 1 / (1 + math.exp(-(a * s + b)))  # noqa: E731
    assert p(4) > p(3) > 0.5 > p(1) > p(-1)


# ------------------------------------------------------------------------- an independent metric oracle
def recompute_metrics(table: pa.Table, tasks, groups, fallback: float, has_loss: bool = True) -> tuple[dict, dict]:
    """A second, independent implementation of the report's metrics from scored rows (sklearn, sacrebleu and
    rouge-score directly, no ckf_dist.eval code), for checking a report end to end."""
    import re

    import sacrebleu
    from rouge_score import rouge_scorer
    from sklearn.metrics import roc_auc_score

    def auc(y, s):
        return float(roc_auc_score(y, s)) if len(set(y)) == 2 else None

    def parse(text):
        m = re.search(r"[-+]?\d+(?:\.\d+)?", text or "")
        v = float(m.group(0)) if m else None
        return v if v is not None and 1.0 <= v <= 5.0 else None

    rows = table.to_pylist()
    metrics, n_rows = {}, {}
    for task in tasks:
        metrics[task], n_rows[task] = {}, {}
        for group in groups:
            rs = [r for r in rows if r["task_id"] == TASK_IDS[task] and (group == "all" or r["is_cold"] == (group == "cold"))]
            n_rows[task][group] = len(rs)
            m = {}
            if rs and task == "ctr":
                y = [r["label"] for r in rs]
                m["auc"] = auc(y, [r["score"] for r in rs])
                per_user = {}
                for r in rs:
                    per_user.setdefault(r["user_id"], []).append(r)
                aucs = [a for a in (auc([r["label"] for r in v], [r["score"] for r in v]) for v in per_user.values())
                        if a is not None]
                m["uauc"], m["uauc_users"] = (float(np.mean(aucs)) if aucs else None), len(aucs)
                p = np.clip([r["p_yes"] for r in rs], 1e-7, 1 - 1e-7)
                m["logloss"] = float(-np.mean([math.log(q) if yy == 1 else math.log(1 - q) for yy, q in zip(y, p)]))
            elif rs and task == "topk":
                ranks = []
                for r in rs:
                    s, pos = r["topk_scores"], int(r["label"])
                    above = sum(x > s[pos] for j, x in enumerate(s) if j != pos)
                    ties = sum(x == s[pos] for j, x in enumerate(s) if j != pos)
                    ranks.append(list(range(above, above + ties + 1)))  # equally likely under random tie-breaking
                exp = lambda f: float(np.mean([np.mean([f(k) for k in rk]) for rk in ranks]))  # noqa: E731
                for k in (1, 5, 10):
                    m[f"hr@{k}"] = exp(lambda rank: float(rank < k))
                for k in (5, 10):
                    m[f"ndcg@{k}"] = exp(lambda rank: 1 / math.log2(rank + 2) if rank < k else 0.0)
                m["mrr"] = exp(lambda rank: 1 / (rank + 1))
            elif rs and task in ("rating", "review_rating"):
                y = np.array([r["label"] for r in rs])
                parsed = [parse(r["generated"]) for r in rs]
                pred = np.array([fallback if v is None else v for v in parsed])
                bad = sum(v is None for v in parsed)
                m.update(mae=float(np.mean(abs(pred - y))), rmse=float(np.sqrt(np.mean((pred - y) ** 2))),
                         unparsable=float(bad), unparsable_rate=bad / len(rs), fallback_rating=float(fallback))
                if has_loss:
                    e = np.array([r["score"] for r in rs])
                    m.update(expected_mae=float(np.mean(abs(e - y))), expected_rmse=float(np.sqrt(np.mean((e - y) ** 2))))
            elif rs and task == "explanation" and any(r["generated"] is not None for r in rs):
                hyp, ref = [r["generated"] or "" for r in rs], [r["reference"] for r in rs]
                m["bleu4"] = float(sacrebleu.corpus_bleu(hyp, [ref]).score)
                scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
                m["rouge_l"] = 100 * float(np.mean([scorer.score(b, a)["rougeL"].fmeasure for a, b in zip(hyp, ref)]))
            losses = [r["loss"] for r in rs if r["loss"] is not None]
            if losses:
                m["loss"] = float(np.mean(losses))
            metrics[task][group] = m
    return metrics, n_rows


def assert_same_metrics(got: dict, want: dict, rel: float = 1e-6) -> None:
    """Reports' metrics {task: {group: {name: value}}} equal (None where undefined)."""
    assert set(got) == set(want), (sorted(got), sorted(want))
    for task in want:
        assert set(got[task]) == set(want[task]), task
        for group, m in want[task].items():
            assert set(got[task][group]) == set(m), (task, group, sorted(got[task][group]), sorted(m))
            for k, v in m.items():
                g = got[task][group][k]
                assert (g is None and v is None) or g == pytest.approx(v, rel=rel, abs=1e-9), (task, group, k, g, v)


def test_metric_oracle_agrees_with_hand_values_and_compute_metrics():
    """The oracle the end-to-end test uses is itself right on the hand-made rows."""
    tasks = ["ctr", "topk", "rating", "explanation"]
    want, n_want = recompute_metrics(handmade_table(), tasks, GROUPS, 3.0)
    for task in ("ctr", "topk", "rating"):
        for group in GROUPS:
            assert_metrics(want[task][group], EXPECTED[task][group], f"oracle {task}/{group}")
    got, n_got = E.compute_metrics(handmade_table(), tasks, GROUPS, 3.0)
    assert n_got == n_want
    assert_same_metrics(got, want)
