"""The extractor on a held-out set of realistic R1-style outputs (tests/eval/heldout_extraction.jsonl).

The set was written before the extraction rules were reworked and is never tuned on: the rules are
developed against tests/eval/test_extract_kinds.py; this file only measures them. Issue 16's bar is 95%.
"""

import json
from collections import Counter
from pathlib import Path

from medcot.eval.extract import extract_choice, extract_yes_no

CASES = [json.loads(line) for line in (Path(__file__).parent / "heldout_extraction.jsonl").read_text().splitlines()]


def test_heldout_set_covers_the_failure_kinds():
    assert len(CASES) >= 60 and len({c["id"] for c in CASES}) == len(CASES)
    kinds = Counter(c["kind"] for c in CASES)
    for kind in ("several", "revised", "lowercase", "quoted", "dash", "latex", "tag", "final_clause", "negation",
                 "chinese", "determiner_no"):
        assert kinds[kind] >= 2, kind
    assert sum(c["expected"] is None for c in CASES) >= 5  # unparseable stays an outcome
    assert all("</think>" in c["output"] for c in CASES if c["kind"] != "no_think")


def test_heldout_accuracy_is_at_least_95_percent():
    wrong = []
    for c in CASES:
        got = extract_choice(c["output"], c["options"]) if c["task"] == "choice" else extract_yes_no(c["output"])
        if got.label != c["expected"]:
            wrong.append(f"{c['id']} ({c['kind']}): expected {c['expected']}, got {got}")
    accuracy = 1 - len(wrong) / len(CASES)
    print(f"held-out extraction accuracy: {len(CASES) - len(wrong)}/{len(CASES)} = {accuracy:.1%}")
    assert accuracy >= 0.95, "\n".join(wrong)
