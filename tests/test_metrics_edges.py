"""Edges of the evaluation metric functions (``eval/metrics.py``) that the hand-computed tests leave open."""
from __future__ import annotations

import math

import pytest

from ckf_dist.eval import metrics as M


def test_log_loss_clips_both_ends():
    # a confident wrong answer either way is finite: log(1e-7)
    assert M.log_loss([0], [1.0]) == pytest.approx(-math.log(1e-7), rel=1e-6)
    assert M.log_loss([1], [0.0]) == pytest.approx(-math.log(1e-7), rel=1e-6)
    assert M.log_loss([], []) is None


def test_regression_metrics_exact():
    # errors +2 and -1: MAE 1.5, RMSE sqrt(2.5)
    assert M.regression_metrics([1, 4], [3, 3]) == {"mae": 1.5, "rmse": pytest.approx(math.sqrt(2.5)),
                                                    "unparsable": 0.0, "unparsable_rate": 0.0}
    assert M.regression_metrics([5], [4]) == {"mae": 1.0, "rmse": 1.0, "unparsable": 0.0, "unparsable_rate": 0.0}
    assert M.regression_metrics([], []) == {}


def test_rouge_l_stems_words():
    # with stemming "cats" = "cat" and "sitting" = "sit": identical token sequences
    assert M.rouge_l(["the cats were sitting"], ["the cat were sit"]) == pytest.approx(100.0)


def test_auc_of_a_single_row_and_uauc_with_unsorted_users():
    assert M.auc([1], [0.3]) is None and M.auc([], []) is None
    # users interleaved: per user AUC 1.0 (user 5) and 0.0 (user 2)
    value, n = M.uauc([5, 2, 5, 2], [1, 1, 0, 0], [0.9, 0.1, 0.2, 0.8])
    assert (value, n) == (pytest.approx(0.5), 2)


@pytest.mark.parametrize("text,value", [("6", None), ("5.5", None), ("0.5", None), ("1", 1.0), ("5", 5.0)])
def test_parse_rating_bounds(text, value):
    assert M.parse_rating(text) == value
