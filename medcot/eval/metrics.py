"""Scores: accuracy with a Wilson 95% interval, and the paired before/after comparison.

Why Wilson and not the normal approximation: eval sets here are small (tens to hundreds of items)
and accuracies sit near chance or near the top, where `p ± 1.96·sqrt(p(1-p)/n)` leaves [0, 1] and
has a zero width at p = 0 or 1. Wilson's interval stays inside [0, 1] and keeps its coverage.

Why McNemar for before vs after: both models answer the *same* items, so the informative counts are
the discordant pairs (right before and wrong after, and the reverse); comparing two independent
intervals would throw that pairing away and be far too conservative.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (0, 1) when n is 0."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At 0 or n correct the bound is exactly 0 or 1; pin it so float rounding can't put p outside.
    low = 0.0 if correct == 0 else max(0.0, center - half)
    high = 1.0 if correct == n else min(1.0, center + half)
    return low, high


def mcnemar_exact_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts b (only before right) and c (only after right)."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


@dataclass
class Score:
    n: int
    correct: int
    accuracy: float
    ci_low: float
    ci_high: float
    unparseable: int
    unparseable_rate: float
    mean_output_tokens: float
    closed_rate: float  # outputs where the model closed its reasoning itself (no forced </think>)
    chance: float  # uniform guessing over each item's choices
    majority: float  # always answering the most common gold label of these items (PubMedQA is ~55% "yes")
    top_prediction: str | None  # the label the model gave most often, and its share: a constant answer shows here
    top_prediction_share: float

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        """`n/N (acc%)` with its interval, as printed at the end of an eval."""
        return (f"{self.correct}/{self.n} ({100 * self.accuracy:.1f}%, 95% CI {100 * self.ci_low:.1f}-"
                f"{100 * self.ci_high:.1f}); unparseable {100 * self.unparseable_rate:.0f}%")


def score(records: list[dict], chance: float) -> Score:
    """Aggregate per-item records (dicts with `correct`, `extracted`, `answer`, `num_tokens`, `closed`).

    With several samples per item a record's verdict is their majority vote (consistency.py).
    """
    n = len(records)
    gold = Counter(r["answer"] for r in records).most_common(1)
    preds = Counter(r["extracted"] for r in records if r["extracted"] is not None).most_common(1)
    correct = sum(bool(r["correct"]) for r in records)
    unparseable = sum(r["extracted"] is None for r in records)
    lo, hi = wilson_interval(correct, n)
    return Score(
        n=n, correct=correct, accuracy=correct / n if n else 0.0, ci_low=lo, ci_high=hi,
        unparseable=unparseable, unparseable_rate=unparseable / n if n else 0.0,
        mean_output_tokens=sum(r["num_tokens"] for r in records) / n if n else 0.0,
        closed_rate=sum(float(r["closed"]) for r in records) / n if n else 0.0,  # with samples: a share per item
        chance=chance,
        majority=gold[0][1] / n if gold else 0.0,
        top_prediction=preds[0][0] if preds else None,
        top_prediction_share=preds[0][1] / n if preds else 0.0,
    )


def compare(before: list[dict], after: list[dict]) -> dict:
    """Paired comparison on the items both runs answered: accuracy difference, discordant counts, p."""
    b_ok = {r["id"]: bool(r["correct"]) for r in before}
    a_ok = {r["id"]: bool(r["correct"]) for r in after}
    ids = sorted(b_ok.keys() & a_ok.keys())
    only_before = sum(b_ok[i] and not a_ok[i] for i in ids)
    only_after = sum(a_ok[i] and not b_ok[i] for i in ids)
    n = len(ids)
    return {
        "n_paired": n,
        "delta": (only_after - only_before) / n if n else 0.0,
        "only_before_correct": only_before,
        "only_after_correct": only_after,
        "mcnemar_p": mcnemar_exact_p(only_before, only_after),
    }
