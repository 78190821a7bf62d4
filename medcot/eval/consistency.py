"""Self-consistency: several sampled answers per item (`eval.samples=k`), the way reasoning models are reported.

- majority vote: the label given most often among the parseable samples (ties go to the one given
  first; no parseable sample: unparseable). Its accuracy is per item, so it gets a Wilson interval and
  the paired McNemar test like a single answer.
- pass@k: the item counts when any of its k samples is right (an upper bound: someone has to pick the
  right one). Per item as well: Wilson interval.
- mean@k: the mean accuracy of one sample, averaged over the k; the expected score of a single sampled
  answer (HuatuoGPT-o1's GPQA number is this with k = 5). The k samples of an item are not
  independent, so its interval is a percentile bootstrap over items, not a binomial one.
"""

from __future__ import annotations

import random
from collections import Counter

from medcot.eval.metrics import wilson_interval

BOOTSTRAP_RESAMPLES = 2000


def vote(labels: list[str | None]) -> str | None:
    """The most common non-None label; ties go to the label given first."""
    counts = Counter(label for label in labels if label is not None)
    return counts.most_common(1)[0][0] if counts else None


def bootstrap_mean_interval(values: list[float], seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of per-item values (deterministic: fixed seed)."""
    if not values:
        return 0.0, 1.0
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(BOOTSTRAP_RESAMPLES))
    return means[int(0.025 * BOOTSTRAP_RESAMPLES)], means[int(0.975 * BOOTSTRAP_RESAMPLES) - 1]


def sample_metrics(records: list[dict]) -> dict | None:
    """pass@k and mean@k with intervals, from records holding `samples`; None for one answer per item."""
    per_item = [r["samples"] for r in records if r.get("samples")]
    if not per_item:
        return None
    k = min(len(s) for s in per_item)
    right = [sum(bool(x["correct"]) for x in s) for s in per_item]
    passed = sum(c > 0 for c in right)
    means = [c / len(s) for c, s in zip(right, per_item)]
    lo, hi = wilson_interval(passed, len(per_item))
    mlo, mhi = bootstrap_mean_interval(means)
    return {
        "k": k,
        "pass_at_k": passed / len(per_item), "pass_ci_low": lo, "pass_ci_high": hi,
        "mean_at_k": sum(means) / len(means), "mean_ci_low": mlo, "mean_ci_high": mhi,
    }
