"""Contamination check: which benchmark items also occur in the training data in use.

medical-o1-reasoning-SFT was built from MedQA and MedMCQA *training* questions, and copies of
benchmark questions travel between datasets, so a fine-tune can be scored on questions it has
seen. For each benchmark item we measure how much of its question stem occurs in the training
questions:

- stems of at least `n` words (default 8): the fraction of the stem's word n-grams that occur in
  any training question (after lower-casing and dropping punctuation). A stem copied into a
  training question scores ~1; an unrelated stem that shares a stock phrase ("which of the
  following is the most likely diagnosis") stays near 0. GPT-3 used 13-grams on web text; many
  medical stems are short, so the default is 8.
- shorter stems (many MedMCQA questions are 5-10 words): 1 when the whole stem occurs inside a
  training question, else 0; stems under 4 words are too generic to test and count as 0.

An item overlaps when its score reaches `threshold`; `eval.exclude_overlap=true` leaves those items
out of the eval. Only questions are compared (reasoning and answers are long, generic medical prose
that would match stock phrases, and the benchmark question is what leaks).

What it cannot see: paraphrases. medical-o1's questions are GPT-4o rewrites of the source exam
questions. The 4 HuatuoGPT-o1 demo rows whose *source* question is verbatim a MedQA dev item
(../shared/data README) score 0.00-0.08 here against their rewritten `Question`: verbatim reuse is
caught, rewritten reuse is not.

    medcot eval --overlap-only                       # the report, no model needed
    medcot eval eval.exclude_overlap=true ...        # score only the items that don't overlap
"""

from __future__ import annotations

import bisect
import re
from collections import Counter
from dataclasses import dataclass, field

MIN_SHORT_WORDS = 4


def _words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


@dataclass
class TrainingIndex:
    """Word n-grams of the training questions, each mapped to the first row it occurs in."""

    n: int
    grams: dict[int, int] = field(repr=False)  # hash of the n-gram -> row of the first training question with it
    joined: str = field(repr=False)  # every normalized question, " | "-separated, for the short-stem substring test
    starts: list[int] = field(repr=False)  # offset of each question in `joined`
    rows: list[int] = field(repr=False)  # 1-based source row of each question (as every other message counts rows)
    num_questions: int = 0


def build_index(questions: list[str], n: int, rows: list[int] | None = None) -> TrainingIndex:
    """Index the training questions; `rows`: each one's 1-based row in its file (default: 1, 2, ...)."""
    rows = list(rows) if rows is not None else list(range(1, len(questions) + 1))
    grams: dict[int, int] = {}
    parts, starts, pos = [], [], 0
    for row, q in zip(rows, questions):
        w = _words(q)
        for i in range(len(w) - n + 1):
            grams.setdefault(hash(" ".join(w[i : i + n])), row)
        text = " " + " ".join(w) + " |"
        starts.append(pos)
        parts.append(text)
        pos += len(text)
    return TrainingIndex(n=n, grams=grams, joined="".join(parts), starts=starts, rows=rows,
                         num_questions=len(questions))


@dataclass
class ItemOverlap:
    id: str
    score: float  # fraction of the stem found in the training questions (see the module docstring)
    train_row: int | None  # 1-based row of the training question sharing the most with it (None: no overlap)


def item_overlap(question: str, index: TrainingIndex) -> ItemOverlap:
    w = _words(question)
    if len(w) >= index.n:
        hits = [index.grams.get(hash(" ".join(w[i : i + index.n]))) for i in range(len(w) - index.n + 1)]
        found = [h for h in hits if h is not None]
        row = Counter(found).most_common(1)[0][0] if found else None
        return ItemOverlap(id="", score=len(found) / len(hits), train_row=row)
    if len(w) < MIN_SHORT_WORDS:
        return ItemOverlap(id="", score=0.0, train_row=None)
    at = index.joined.find(" " + " ".join(w) + " ")
    if at < 0:
        return ItemOverlap(id="", score=0.0, train_row=None)

    return ItemOverlap(id="", score=1.0, train_row=index.rows[bisect.bisect_right(index.starts, at) - 1])


@dataclass
class OverlapReport:
    benchmark: str
    n_items: int
    n_overlapping: int  # score >= threshold
    n_any: int  # score > 0
    max_score: float
    flagged: list[ItemOverlap] = field(default_factory=list)  # the overlapping items, highest score first

    def to_dict(self) -> dict:
        return {
            "benchmark": self.benchmark, "n_items": self.n_items, "n_overlapping": self.n_overlapping,
            "n_any": self.n_any, "max_score": round(self.max_score, 4),
            "flagged": [{"id": f.id, "score": round(f.score, 4), "train_row": f.train_row} for f in self.flagged],
        }


def check(benchmark: str, items, index: TrainingIndex, threshold: float) -> OverlapReport:
    """Score every item of one benchmark against the training index."""
    scores = []
    for it in items:
        o = item_overlap(it.question, index)
        o.id = it.id
        scores.append(o)
    flagged = sorted((o for o in scores if o.score >= threshold), key=lambda o: -o.score)
    return OverlapReport(
        benchmark=benchmark, n_items=len(scores), n_overlapping=len(flagged),
        n_any=sum(o.score > 0 for o in scores), max_score=max((o.score for o in scores), default=0.0),
        flagged=flagged,
    )
