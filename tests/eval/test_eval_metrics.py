"""Scoring maths: Wilson intervals, McNemar, per-benchmark scores."""

import math

import pytest

from medcot.eval.metrics import compare, mcnemar_exact_p, score, wilson_interval


@pytest.mark.parametrize(
    "k,n,low,high",
    [
        (8, 10, 0.4902, 0.9433),  # textbook values (Newcombe 1998 / statsmodels proportion_confint method='wilson')
        (0, 10, 0.0, 0.2775),
        (10, 10, 0.7225, 1.0),
        (50, 100, 0.4038, 0.5962),
        (1, 25, 0.0071, 0.1954),
    ],
)
def test_wilson_matches_reference_values(k, n, low, high):
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=5e-4) and hi == pytest.approx(high, abs=5e-4)


def test_wilson_is_inside_unit_interval_and_contains_p():
    for n in (1, 3, 7, 40):
        for k in range(n + 1):
            lo, hi = wilson_interval(k, n)
            assert 0.0 <= lo <= k / n <= hi <= 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_mcnemar_exact():
    assert mcnemar_exact_p(0, 0) == 1.0
    assert mcnemar_exact_p(5, 5) == 1.0
    assert mcnemar_exact_p(1, 9) == pytest.approx(2 * (1 + 10) / 1024)
    assert mcnemar_exact_p(9, 1) == mcnemar_exact_p(1, 9)
    assert mcnemar_exact_p(0, 20) < 1e-5


def _rec(i, correct, extracted="A", tokens=10, closed=True, answer="A"):
    return {"id": str(i), "correct": correct, "extracted": extracted, "num_tokens": tokens, "closed": closed,
            "answer": answer}


def test_score_counts_unparseable_as_wrong():
    recs = [_rec(0, True), _rec(1, False, extracted=None, tokens=30, closed=False), _rec(2, False), _rec(3, True)]
    s = score(recs, chance=0.25)
    assert (s.n, s.correct, s.accuracy, s.unparseable) == (4, 2, 0.5, 1)
    assert s.unparseable_rate == 0.25 and s.mean_output_tokens == 15 and s.closed_rate == 0.75
    assert (s.ci_low, s.ci_high) == wilson_interval(2, 4)
    assert "2/4 (50.0%" in s.line()
    assert s.majority == 1.0 and (s.top_prediction, s.top_prediction_share) == ("A", 0.75)


def test_compare_is_paired_on_shared_items():
    before = [_rec(0, True), _rec(1, False), _rec(2, False), _rec(3, True)]
    after = [_rec(0, True), _rec(1, True), _rec(2, True), _rec(3, False), _rec(9, True)]  # item 9: not paired
    c = compare(before, after)
    assert c["n_paired"] == 4
    assert (c["only_before_correct"], c["only_after_correct"]) == (1, 2)
    assert c["delta"] == pytest.approx(0.25)
    assert math.isclose(c["mcnemar_p"], mcnemar_exact_p(1, 2))
