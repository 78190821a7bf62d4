"""The answer extractor against hand-written model outputs (tests/eval/extractor_cases.jsonl)."""

import json
from pathlib import Path

import pytest

from medcot.eval.extract import extract_choice, extract_yes_no
from medcot.eval.tasks import render_mc

CASES = [json.loads(line) for line in (Path(__file__).parent / "extractor_cases.jsonl").read_text().splitlines()]


def test_case_set_is_big_and_varied():
    assert len(CASES) >= 50
    assert len({c["id"] for c in CASES}) == len(CASES)
    kinds = {c["task"] for c in CASES}
    assert kinds == {"choice", "yes_no"}
    assert sum(c["expected"] is None for c in CASES) >= 10  # unparseable outputs are part of the set
    assert sum("</think>" not in c["output"] for c in CASES) >= 5  # and outputs that never closed the reasoning


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_extractor_case(case):
    if case["task"] == "choice":
        got = extract_choice(case["output"], case["options"])
    else:
        got = extract_yes_no(case["output"])
    assert got.label == case["expected"], f"{case['note']}: got {got}"
    assert (got.label is None) == (got.method == "none" or got.method.endswith(":conflict"))


def test_method_records_where_the_answer_was_found():
    opts = {"A": "Aspirin", "B": "Heparin", "C": "Warfarin", "D": "Alteplase"}
    assert extract_choice("reasoning\n</think>\nThe answer is C.", opts).method == "after_think:explicit"
    assert extract_choice("so the answer is C. But", opts).method == "whole_output:explicit"
    assert extract_choice("reasoning\n</think>\nHeparin drip.", opts).method == "after_think:option_text"
    assert extract_choice("reasoning\n</think>\n(D)", opts).method == "after_think:leading"
    assert extract_yes_no("r\n</think>\nNo.").method == "after_think:leading"


def test_letters_outside_the_options_are_not_answers():
    opts = {"A": "one", "B": "two"}
    assert extract_choice("x\n</think>\nThe answer is D.", opts).label is None


def test_render_mc_lists_options_and_asks_for_the_letter():
    text = render_mc("Which drug?", {"A": "Aspirin", "B": "Heparin", "C": "Warfarin"})
    assert text.startswith("Which drug?\n\nA. Aspirin\nB. Heparin\nC. Warfarin\n\n")
    assert "A, B or C" in text and "The answer is X" in text
