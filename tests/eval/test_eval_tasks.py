"""Benchmark tasks: loading the shared normalized files, the embedded sample, hub-column mapping, and
the errors a malformed or unknown file gets (file, row and field named)."""

import json

import pytest

from medcot.errors import DataError
from medcot.eval.tasks import TASKS, spread

SIZES = {"medqa": 636, "medmcqa": 2091, "pubmedqa": 500, "mmlu_medical": 543}


def test_tasks_load_the_shared_normalized_files(shared_data):
    folder = shared_data / "eval" / "normalized"
    for name, n in SIZES.items():
        items = TASKS[name].load(str(folder))
        assert len(items) == n
        assert len({it.id for it in items}) == n
    mmlu = TASKS["mmlu_medical"].load(str(folder), limit=12)
    assert len(mmlu) == 12 and len({it.subject for it in mmlu}) >= 5  # the limit spreads over subjects
    pub = TASKS["pubmedqa"].load(str(folder), limit=5)
    assert all(it.options is None and it.answer in ("yes", "no", "maybe") and it.context for it in pub)


def test_embedded_sample_loads_and_renders():
    for name, task in TASKS.items():
        items = task.load("embedded")
        assert len(items) == 25
        text = task.render(items[0])
        assert items[0].question in text
        if items[0].options:
            assert all(f"{k}. {v}" in text for k, v in items[0].options.items())
            assert task.chance(items) == 0.25
        else:
            assert items[0].context in text and "yes, no or maybe" in text
            assert task.chance(items) == pytest.approx(1 / 3)


def test_spread_is_even_and_deterministic():
    xs = list(range(100))
    assert spread(xs, 4) == [0, 25, 50, 75]
    assert spread(xs, None) == xs and spread(xs, 500) == xs


def _write(folder, name, rows):
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"id": "q1", "benchmark": "medqa_usmle_4opt", "question": "Which?", "options": {"A": "a", "B": "b", "C": "c", "D": "d"},
        "answer": "B"}


@pytest.mark.parametrize(
    "bad_row,message",
    [
        ({**GOOD, "answer": "E"}, "row 2: field 'answer': 'E' is not one of A, B, C, D"),
        ({k: v for k, v in GOOD.items() if k != "question"}, "row 2: field 'question': missing"),
        ({**GOOD, "question": "  "}, "row 2: field 'question': must be a non-empty string"),
        ({**GOOD, "options": {"A": "a", "C": "c"}}, "row 2: field 'options': keys must be A, B, C, ... in order"),
        ({**GOOD, "options": {"A": "a", "B": ""}}, "row 2: field 'options': option B must be a non-empty string"),
        ({**GOOD, "options": None}, "row 2: field 'options': must be an object"),
        ({**GOOD, "benchmark": "gpqa_medical"}, "row 2: field 'benchmark': 'gpqa_medical' is not a medqa item"),
        ({**GOOD, "id": "q0"}, "row 2: field 'id': 'q0' repeats row 1"),
        ('{"id": "q9", "question": ', "row 2: invalid JSON"),
        ('["not", "an", "object"]', "row 2: expected a JSON object"),
    ],
)
def test_malformed_rows_name_file_row_and_field(tmp_path, bad_row, message):
    path = _write(tmp_path / "data", "medqa_bad.jsonl", [{**GOOD, "id": "q0"}, bad_row])
    with pytest.raises(DataError) as e:
        TASKS["medqa"].load(str(tmp_path / "data"))
    assert str(path) in str(e.value) and message in str(e.value)


def test_pubmedqa_rows_need_context_and_a_yes_no_maybe_answer(tmp_path):
    row = {"id": "p1", "benchmark": "pubmedqa_pqal", "question": "Does it?", "options": None, "answer": "Yes",
           "context": "Abstract."}
    folder = tmp_path / "d"
    _write(folder, "pubmedqa.jsonl", [row])
    assert TASKS["pubmedqa"].load(str(folder))[0].answer == "yes"  # case-insensitive labels in files
    _write(folder, "pubmedqa.jsonl", [row, {**row, "id": "p2", "context": None}])
    with pytest.raises(DataError, match=r"row 2: field 'context': missing"):
        TASKS["pubmedqa"].load(str(folder))
    _write(folder, "pubmedqa.jsonl", [{**row, "answer": "probably"}])
    with pytest.raises(DataError, match=r"row 1: field 'answer': 'probably' is not one of yes, no, maybe"):
        TASKS["pubmedqa"].load(str(folder))


def test_unknown_sources_and_missing_files_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        TASKS["medqa"].load(str(tmp_path / "nope"))
    _write(tmp_path, "other.jsonl", [GOOD])
    with pytest.raises(FileNotFoundError, match=r"no file for benchmark 'medqa'.*medqa\*\.jsonl.*other\.jsonl"):
        TASKS["medqa"].load(str(tmp_path))
    _write(tmp_path, "medqa_a.jsonl", [GOOD])
    _write(tmp_path, "medqa_b.jsonl", [GOOD])
    with pytest.raises(FileNotFoundError, match=r"2 files \(medqa_a.jsonl, medqa_b.jsonl\)"):
        TASKS["medqa"].load(str(tmp_path))


def test_hub_rows_map_to_the_item_format():
    """Column mapping of each hub dataset (rows shaped like the real ones; no network)."""
    medqa = TASKS["medqa"].from_hub_row(
        {"question": "Q?", "answer": "b", "options": {"A": "a", "B": "b", "C": "c", "D": "d"}, "answer_idx": "B",
         "meta_info": "step1", "metamap_phrases": []}, 7, None)
    medmcqa = TASKS["medmcqa"].from_hub_row(
        {"id": "e9ad821a", "question": "Q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 2,
         "choice_type": "single", "exp": None, "subject_name": "Anatomy", "topic_name": None}, 3, None)
    pubmed = TASKS["pubmedqa"].from_hub_row(
        {"pubid": 21645374, "question": "Q?", "context": {"contexts": ["One.", "Two."], "labels": ["A", "B"]},
         "long_answer": "L", "final_decision": "yes"}, 0, "pqa_labeled")
    mmlu = TASKS["mmlu_medical"].from_hub_row(
        {"question": "Q?", "subject": "anatomy", "choices": ["a", "b", "c", "d"], "answer": 3}, 5, "anatomy")
    items = {name: TASKS[name].validate(row, "hub", 1) for name, row in
             [("medqa", medqa), ("medmcqa", medmcqa), ("pubmedqa", pubmed), ("mmlu_medical", mmlu)]}
    assert items["medqa"].answer == "B" and items["medqa"].id == "medqa_test_7"
    assert items["medmcqa"].answer == "C" and items["medmcqa"].options["D"] == "d"
    assert items["pubmedqa"].context == "One. Two." and items["pubmedqa"].id == "pubmedqa_21645374"
    assert items["mmlu_medical"].answer == "D" and items["mmlu_medical"].subject == "anatomy"
    unlabelled = {**TASKS["medmcqa"].from_hub_row({"question": "Q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d",
                                                   "cop": -1}, 0, None)}
    with pytest.raises(DataError, match=r"hub: row 1: field 'answer'"):
        TASKS["medmcqa"].validate(unlabelled, "hub", 1)
