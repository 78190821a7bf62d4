"""Contamination check: a constructed overlap is found, a paraphrase is not, flagged items can be excluded."""

import json

import pytest

from medcot.cli import main
from medcot.config import load_config
from medcot.errors import ConfigError
from medcot.eval.overlap import build_index, item_overlap
from medcot.eval.run import exclude_overlapping, run_eval
from medcot.eval.tasks import TASKS

STEM = ("A 61-year-old man has decreased urinary output and malaise two weeks after emergency cardiac "
        "catheterization with stenting for unstable angina pectoris. Which is the most likely cause?")
PARAPHRASE = ("Fourteen days after coronary stenting, an older diabetic patient passes less urine and feels unwell; "
              "what explains it?")
SHORT = "Drug of choice for absence seizures is"
UNRELATED = ("A 4-year-old girl is brought to the clinic with a barking cough and inspiratory stridor that worsened "
             "overnight. What is the most appropriate next step?")
OPTS = {"A": "one", "B": "two", "C": "three", "D": "four"}


@pytest.fixture()
def overlap_setup(tmp_path):
    items = [("copied", STEM), ("paraphrased", "Two weeks after stenting for unstable angina, a man of 61 makes "
              "less urine than before and feels unwell for days. What is the most likely reason for it?"),
             ("short", SHORT), ("unrelated", UNRELATED)]
    folder = tmp_path / "bench"
    folder.mkdir()
    (folder / "medqa_test.jsonl").write_text("".join(
        json.dumps({"id": i, "benchmark": "medqa", "question": q, "options": OPTS, "answer": "A"}) + "\n" for i, q in items))
    train = tmp_path / "train.jsonl"
    rows = [f"Consider this vignette carefully. {STEM} Explain your reasoning.", PARAPHRASE,
            f"In clinical practice, what is the {SHORT.lower()} in children?", "What causes gout flares?"]
    rows += [f"Unrelated training question number {i} about renal physiology." for i in range(20)]
    train.write_text("".join(json.dumps({"Question": q, "Complex_CoT": "r", "Response": "a"}) + "\n" for q in rows))
    cfg = load_config(None, ["eval.benchmarks=medqa", f"eval.source={folder}", f"data.source={train}",
                             f"eval.output_dir={tmp_path / 'out'}"])
    return cfg, tmp_path


def test_ngram_scores():
    index = build_index([f"prefix words here {STEM}"], n=8)
    assert item_overlap(STEM, index).score == 1.0 and item_overlap(STEM, index).train_row == 1  # 1-based rows
    rows = build_index(["unrelated words only here", f"prefix words here {STEM}"], n=8, rows=[4, 9])
    assert item_overlap(STEM, rows).train_row == 9  # the row the training file gave, not the list position
    assert item_overlap(UNRELATED, index).score < 0.2
    assert item_overlap("too short", index).score == 0.0  # under 4 words: not testable


def test_constructed_overlap_is_flagged_and_excluded(overlap_setup):
    cfg, tmp_path = overlap_setup
    result = run_eval(cfg, overlap_only=True)
    ov = json.loads((tmp_path / "out" / "overlap.json").read_text())
    rep = ov["benchmarks"]["medqa"]
    assert {f["id"] for f in rep["flagged"]} == {"copied", "short"}
    assert {f["train_row"] for f in rep["flagged"]} == {1, 3}  # rows of train.jsonl, 1-based
    assert rep["n_items"] == 4 and ov["training_questions"] == 24
    assert "training file row 1" in (tmp_path / "out" / "overlap.md").read_text()
    items = {"medqa": TASKS["medqa"].load(cfg.eval.source)}
    kept, excluded = exclude_overlapping(items, result.summary["overlap"])
    assert [it.id for it in kept["medqa"]] == ["paraphrased", "unrelated"] and excluded == {"medqa": 2}


def test_exclusion_without_a_check_is_an_error():
    with pytest.raises(ConfigError, match="needs the contamination check"):
        exclude_overlapping({"medqa": []}, None)


def test_data_overlap_command(overlap_setup, capsys):
    cfg, tmp_path = overlap_setup
    rc = main(["data", "overlap", "eval.benchmarks=medqa", f"eval.source={cfg.eval.source}",
               f"data.source={cfg.data.source}", f"eval.output_dir={tmp_path / 'cli'}"])
    assert rc == 0
    assert "medqa 2/4 items" in capsys.readouterr().out


def test_data_overlap_fails_clearly_when_the_training_data_cannot_be_loaded(overlap_setup, shared_data, capsys):
    """The shared training file has lower-case columns: without the mapping the check cannot run, and says so."""
    cfg, tmp_path = overlap_setup
    train = shared_data / "train" / "normalized" / "medical_o1_style_train.jsonl"
    argv = ["data", "overlap", "eval.benchmarks=medqa", f"eval.source={cfg.eval.source}", f"data.source={train}",
            f"eval.output_dir={tmp_path / 'cli'}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "contamination check needs the training questions" in err and "data.question_column" in err
    assert not (tmp_path / "cli" / "overlap.md").exists()  # no "Skipped" report
    mapped = ["data.question_column=question", "data.reasoning_column=reasoning", "data.answer_column=answer"]
    assert main(argv + mapped) == 0
    assert "items share" in capsys.readouterr().out
