"""Evaluation metric functions against hand-computed values (fast, no model)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from ckf_dist.eval import metrics as M


def test_auc_hand_computed():
    # positives 0.8, 0.4; negatives 0.5, 0.1: pairs (0.8>0.5, 0.8>0.1, 0.4<0.5, 0.4>0.1) -> 3/4
    assert M.auc([1, 1, 0, 0], [0.8, 0.4, 0.5, 0.1]) == pytest.approx(0.75)
    # a tie between a positive and a negative counts 1/2: pairs (1, 0.5) -> 0.75
    assert M.auc([1, 0, 0], [0.5, 0.5, 0.1]) == pytest.approx(0.75)
    assert M.auc([1, 1], [0.2, 0.3]) is None


def test_uauc_skips_single_class_users():
    users = [7, 7, 7, 8, 8, 9]
    labels = [1, 0, 0, 1, 0, 1]
    scores = [0.9, 0.5, 0.95, 0.1, 0.3, 0.5]
    # user 7: positive 0.9 vs negatives 0.5 (win), 0.95 (loss) -> 0.5; user 8: 0.1 < 0.3 -> 0; user 9: one class
    value, n = M.uauc(users, labels, scores)
    assert n == 2 and value == pytest.approx(0.25)
    assert M.uauc([1, 2], [1, 0], [0.3, 0.4]) == (None, 0)


def test_log_loss_hand_computed():
    expected = -(math.log(0.8) + math.log(1 - 0.3)) / 2
    assert M.log_loss([1, 0], [0.8, 0.3]) == pytest.approx(expected)
    assert M.log_loss([1], [0.0]) == pytest.approx(-math.log(1e-7))  # clipped, finite


def test_topk_hr_ndcg_hand_computed():
    rows = [[0.9, 0.1, 0.5, 0.3, 0.2],   # positive index 2 (0.5): one higher -> rank 1
            [0.1, 0.2, 0.3, 0.4, 0.5],   # positive index 4: rank 0
            [0.5, 0.4, 0.3, 0.2, 0.1]]   # positive index 4: rank 4
    m = M.topk_metrics(rows, [2, 4, 4], ks=(1, 3, 5), ndcg_ks=(3, 5))
    assert m["hr@1"] == pytest.approx(1 / 3)
    assert m["hr@3"] == pytest.approx(2 / 3)
    assert m["hr@5"] == pytest.approx(1.0)
    assert m["ndcg@3"] == pytest.approx((1 / math.log2(3) + 1.0 + 0.0) / 3)
    assert m["ndcg@5"] == pytest.approx((1 / math.log2(3) + 1.0 + 1 / math.log2(6)) / 3)
    assert m["mrr"] == pytest.approx((1 / 2 + 1 + 1 / 5) / 3)


def test_topk_ties_are_chance_level():
    # constant scores over 4 candidates: rank uniform in 0..3 -> HR@1 = 1/4, HR@2 = 1/2
    m = M.topk_metrics([[0.0] * 4], [1], ks=(1, 2), ndcg_ks=(2,))
    assert m["hr@1"] == pytest.approx(0.25) and m["hr@2"] == pytest.approx(0.5)
    assert m["ndcg@2"] == pytest.approx((1.0 + 1 / math.log2(3)) / 4)
    assert M.topk_metrics([], []) == {}


@pytest.mark.parametrize("text,value", [("4", 4.0), (" 5.", 5.0), ("3 stars", 3.0), ("2.5", 2.5), ("3.5", 3.5),
                                        (" 3.5", 3.5), ("2.75 stars", 2.75),
                                        ("rating: 1", 1.0), ("7", None), ("0", None), ("Yes", None),
                                        ("", None), (None, None)])
def test_parse_rating(text, value):
    assert M.parse_rating(text) == value


def test_rating_metrics_counts_unparsable_as_fallback():
    labels = [4, 2, 5, 1]
    texts = ["4", "3", "great", None]
    m = M.rating_metrics(labels, texts, fallback=3.5, expected=[4.0, 2.0, 4.0, 2.0])
    # predictions 4, 3, 3.5 (fallback), 3.5 (fallback): errors 0, 1, 1.5, 2.5
    assert m["unparsable"] == 2 and m["unparsable_rate"] == pytest.approx(0.5)
    assert m["mae"] == pytest.approx((0 + 1 + 1.5 + 2.5) / 4)
    assert m["rmse"] == pytest.approx(math.sqrt((0 + 1 + 2.25 + 6.25) / 4))
    assert m["expected_mae"] == pytest.approx(0.5)
    assert m["expected_rmse"] == pytest.approx(math.sqrt(0.5))


def test_regression_metrics():
    m = M.regression_metrics([1, 3], [2, 3])
    assert m["mae"] == pytest.approx(0.5) and m["rmse"] == pytest.approx(math.sqrt(0.5))


def test_bleu_and_rouge_library_values():
    ref = "the cat sat on the mat"
    assert M.bleu4([ref], [ref]) == pytest.approx(100.0)
    assert M.rouge_l([ref], [ref]) == pytest.approx(100.0)
    assert M.bleu4(["dog"], [ref]) == pytest.approx(0.0, abs=1e-6)
    # LCS("the cat on mat", ref) = 4 tokens: P = 4/4, R = 4/6 -> F1 = 0.8
    assert M.rouge_l(["the cat on mat"], [ref]) == pytest.approx(80.0)
    assert M.bleu4([], []) is None and M.rouge_l([], []) is None


def test_cf_dot_uses_fallback_row():
    from ckf_dist.eval.inference import cf_dot

    users = np.array([[1.0, 0.0], [0.0, 2.0], [0.5, 0.5]])  # 2 users + fallback
    items = np.array([[3.0, 1.0], [1.0, 1.0]])  # 1 item + fallback
    got = cf_dot(users, items, np.array([0, 1, 9]), np.array([0, 5, 0]))
    assert got.tolist() == [3.0, 2.0, 2.0]
