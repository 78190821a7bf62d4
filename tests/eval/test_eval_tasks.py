"""Benchmark tasks: loading the shared normalized files, the embedded sample, hub-column mapping, and
the errors a malformed or unknown file gets (file, row and field named)."""

import json

import pytest

from medcot.errors import ConfigError, DataError
from medcot.eval.tasks import TASKS, spread

# gpqa_medical: the file's 190 items are 38 questions listed 5 times (as in HuatuoGPT-o1's bundle)
SIZES = {"medqa": 636, "medmcqa": 2091, "pubmedqa": 500, "mmlu_medical": 543, "mmlu_pro_medical": 767,
         "gpqa_medical": 38}


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
        if name == "gpqa_medical":
            with pytest.raises(ConfigError, match="no shipped sample"):
                task.load("embedded")
            continue
        items = task.load("embedded")
        assert len(items) == 25
        text = task.render(items[0])
        assert items[0].question in text
        if items[0].options:
            assert all(f"{k}. {v}" in text for k, v in items[0].options.items())
            assert task.chance(items) == pytest.approx(sum(1 / len(it.options) for it in items) / 25)
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


def test_mmlu_pro_has_up_to_ten_options_and_its_prompt_lists_them(shared_data):
    items = TASKS["mmlu_pro_medical"].load(str(shared_data / "eval" / "normalized"))
    sizes = {len(it.options) for it in items}
    assert max(sizes) == 10 and min(sizes) < 10
    ten = next(it for it in items if len(it.options) == 10)
    assert "J. " in TASKS["mmlu_pro_medical"].render(ten) and "A, B, C, D, E, F, G, H, I or J" in \
        TASKS["mmlu_pro_medical"].render(ten)
    assert 0.1 <= TASKS["mmlu_pro_medical"].chance(items) < 0.13  # 1/10 for most, more for the shorter ones


def test_gpqa_repeats_are_one_question_each(shared_data):
    """HuatuoGPT-o1 lists each GPQA question 5 times: merged, so n counts questions (no text is printed)."""
    path = shared_data / "eval" / "normalized" / "gpqa_medical.shared.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    items = TASKS["gpqa_medical"].load(str(path.parent))
    assert len(rows) == 5 * len(items)
    assert len({it.question for it in items}) == len(items)
    assert {it.id for it in items} <= {r["id"] for r in rows}
    assert TASKS["gpqa_medical"].load(str(path.parent), limit=10) == spread(items, 10)


class FakeHub:
    """Stands in for `datasets.load_dataset`: records the call, returns the given rows."""

    def __init__(self, rows):
        self.rows, self.calls = rows, []

    def __call__(self, path, name=None, split=None, token=None):
        self.calls.append({"path": path, "name": name, "split": split, "token": token})
        return self.rows


def test_mmlu_pro_hub_keeps_health_and_biology(monkeypatch):
    import datasets
    rows = [{"question_id": i, "question": f"Q{i}?", "options": ["a", "b", "c"] + (["d"] * (i % 2)),
             "answer": "B", "answer_index": 1, "category": cat}
            for i, cat in enumerate(["health", "law", "biology", "physics", "health"])]
    hub = FakeHub(rows)
    monkeypatch.setattr(datasets, "load_dataset", hub)
    items = TASKS["mmlu_pro_medical"].load("hub")
    assert [it.question for it in items] == ["Q0?", "Q2?", "Q4?"]
    assert [it.id for it in items] == ["mmlupro_med_0", "mmlupro_med_1", "mmlupro_med_2"]
    assert items[0].options == {"A": "a", "B": "b", "C": "c"} and items[0].answer == "B"
    assert hub.calls == [{"path": "TIGER-Lab/MMLU-Pro", "name": None, "split": "test", "token": None}]


def _gpqa_row(i, domain):
    return {"Record ID": f"rec{i}", "Question": f"Question {i}?", "Correct Answer": f"right {i}",
            "Incorrect Answer 1": "w1", "Incorrect Answer 2": "w2", "Incorrect Answer 3": "w3",
            "High-level domain": domain}


def test_gpqa_hub_needs_a_token_and_keeps_biology(monkeypatch):
    import datasets
    import huggingface_hub
    rows = [_gpqa_row(i, d) for i, d in enumerate(["Biology", "Physics", "Biology", "Chemistry"])]
    hub = FakeHub(rows)
    monkeypatch.setattr(datasets, "load_dataset", hub)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(ConfigError, match="Idavidrein/gpqa is gated.*HF_TOKEN"):
        TASKS["gpqa_medical"].load("hub")
    assert hub.calls == []  # refused before any download
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_user_token")
    items = TASKS["gpqa_medical"].load("hub")
    assert hub.calls == [{"path": "Idavidrein/gpqa", "name": "gpqa_main", "split": "train", "token": "hf_user_token"}]
    assert [it.question for it in items] == ["Question 0?", "Question 2?"]
    for it, i in zip(items, (0, 2)):
        assert it.options[it.answer] == f"right {i}" and sorted(it.options.values()) == sorted(
            [f"right {i}", "w1", "w2", "w3"])
    assert TASKS["gpqa_medical"].load("hub") == items  # the option order is the same on every load
    positions = {TASKS["gpqa_medical"].from_hub_row(_gpqa_row(i, "Biology"), i, None)["answer"] for i in range(40)}
    assert len(positions) == 4  # shuffled: the right answer is not always A


def test_lm_eval_prompts_match_the_harness_tasks():
    """Each benchmark's context and choices as lm-evaluation-harness states them (see each task's docstring)."""
    from medcot.eval.tasks.common import Item
    opts = {"A": "a1", "B": "b1", "C": "c1", "D": "d1"}
    mc = Item(id="x", benchmark="b", question="Which?", options=opts, answer="A", subject="college_medicine")
    ctx, choices = TASKS["medqa"].lm_eval_request(mc)
    assert ctx == "Question: Which?\nA. a1\nB. b1\nC. c1\nD. d1\nAnswer:" and choices == {k: f" {k}" for k in "ABCD"}
    assert TASKS["medmcqa"].lm_eval_request(mc)[0] == "Question: Which?\nChoices:\nA. a1\nB. b1\nC. c1\nD. d1\nAnswer:"
    assert TASKS["mmlu_medical"].lm_eval_request(mc)[0] == (
        "The following are multiple choice questions (with answers) about college medicine.\n\n"
        "Which?\nA. a1\nB. b1\nC. c1\nD. d1\nAnswer:")
    assert TASKS["mmlu_pro_medical"].lm_eval_request(mc)[0] == "Which?\nA. a1\nB. b1\nC. c1\nD. d1\nAnswer:"
    ctx, choices = TASKS["gpqa_medical"].lm_eval_request(mc)
    assert ctx == ("What is the correct answer to this question:Which?\nChoices:\n(A) a1\n(B) b1\n(C) c1\n(D) d1\n"
                   "Answer:") and choices["C"] == " (C)"
    pub = Item(id="p", benchmark="pubmedqa", question="Does it?", options=None, answer="no", context="Abstract text.")
    assert TASKS["pubmedqa"].lm_eval_request(pub) == ("Abstract: Abstract text.\nQuestion: Does it?\nAnswer:",
                                                      {"yes": " yes", "no": " no", "maybe": " maybe"})
    question, options, gold = TASKS["pubmedqa"].huatuo_item(pub)
    assert options == {"A": "yes", "B": "no", "C": "maybe"} and gold == "B"
    assert question.startswith("Abstract text.\n\nUsing the above document as a reference") and question.endswith(
        "most appropriate.\nDoes it?")


def test_the_config_names_exactly_the_registered_benchmarks():
    """config.py validates eval.benchmarks without importing medcot.eval (it sits below it), so its list of
    names and the task registry must agree; the default set is a subset of it."""
    from medcot.config import EvalArgs
    from medcot.eval.tasks import TASKS

    assert set(EvalArgs.ALL_BENCHMARKS) == set(TASKS)
    assert set(EvalArgs().benchmarks) <= set(TASKS)
