"""Data: loading every supported format, errors that name file / row / field, splitting, `medcot data check`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from medcot.cli import main
from medcot.config import DataArgs
from medcot.data.rows import LoadedData, Record, load_records, split_records
from medcot.errors import ColumnsError, DataError

ASSETS = Path(__file__).parent / "assets"
TINY = ASSETS / "tiny_cot.jsonl"


def _rows(n: int = 5) -> list[dict]:
    return [{"Question": f"question {i}?", "Complex_CoT": f"reasoning {i}", "Response": f"answer {i}"} for i in range(1, n + 1)]


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _load(path: Path, **kw) -> LoadedData:
    return load_records(DataArgs(source=str(path), **kw))


def _error(path: Path, **kw) -> str:
    with pytest.raises(DataError) as e:
        _load(path, **kw)
    return str(e.value)


# -- loading --------------------------------------------------------------------------------------


def test_fixture_rows_load_with_1_based_rows():
    loaded = _load(TINY)
    assert len(loaded.records) == 10 and loaded.skipped == []
    assert loaded.columns == ["Question", "Complex_CoT", "Response"]
    assert [r.row for r in loaded.records] == list(range(1, 11))
    first = loaded.records[0]
    assert first.question.startswith("A 24-year-old woman") and first.answer == "Acute pyelonephritis."


def test_fields_are_stripped_and_extra_columns_ignored(tmp_path):
    row = {"id": 7, "Question": "  q?\n", "Complex_CoT": "\tr ", "Response": " a ", "extra": [1, 2]}
    loaded = _load(_jsonl(tmp_path / "d.jsonl", [row]))
    assert loaded.records == [Record(question="q?", reasoning="r", answer="a", row=1)]


def test_blank_lines_are_skipped_and_rows_count_file_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = _rows(2)
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n\n")
    assert [r.row for r in _load(path).records] == [1, 3]  # the row an editor shows


def test_json_list_and_data_wrapper(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(_rows(3)))
    assert [r.answer for r in _load(path).records] == ["answer 1", "answer 2", "answer 3"]
    path.write_text(json.dumps({"data": _rows(2)}))
    assert len(_load(path).records) == 2


def test_csv_with_bom_and_quoted_newlines(tmp_path):
    path = tmp_path / "d.csv"
    with path.open("w", newline="", encoding="utf-8-sig") as f:
        w = csv.DictWriter(f, fieldnames=["Question", "Complex_CoT", "Response"])
        w.writeheader()
        w.writerow({"Question": "q1, with a comma?", "Complex_CoT": "line one\nline two", "Response": "a1"})
        w.writerow({"Question": "q2?", "Complex_CoT": "r2", "Response": "a2"})
    loaded = _load(path)
    assert loaded.columns == ["Question", "Complex_CoT", "Response"]  # the BOM is not part of the first name
    assert loaded.records[0].question == "q1, with a comma?"
    assert loaded.records[0].reasoning == "line one\nline two"
    assert [r.row for r in loaded.records] == [1, 2]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(_rows(4)), path)
    loaded = _load(path)
    assert [r.question for r in loaded.records] == [f"question {i}?" for i in range(1, 5)]


def test_parquet_non_string_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    rows = _rows(2)
    table = pa.table({"Question": [r["Question"] for r in rows], "Complex_CoT": [1, 2], "Response": ["a", "b"]})
    pq.write_table(table, path)
    msg = _error(path)
    assert f"{path}: row 1: field 'Complex_CoT' must be a string, got int" in msg


def test_column_mapping(tmp_path):
    rows = [{"q": "what?", "cot": "because", "ans": "that"}]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    loaded = _load(path, question_column="q", reasoning_column="cot", answer_column="ans")
    assert loaded.records == [Record(question="what?", reasoning="because", answer="that", row=1)]


def test_embedded_demo_sample_loads():
    loaded = load_records(DataArgs())
    assert len(loaded.records) >= 100 and loaded.skipped == []
    assert loaded.source.endswith("medical_o1_demo.jsonl")


def test_shared_normalized_training_file_with_column_mapping(shared_data):
    path = shared_data / "train" / "normalized" / "medical_o1_style_train.jsonl"
    loaded = _load(path, question_column="question", reasoning_column="reasoning", answer_column="answer")
    assert len(loaded.records) == 205 and loaded.skipped == []
    assert all(r.question and r.reasoning and r.answer for r in loaded.records)
    # With the default (seed) column names the same file is a columns error that lists what it has.
    msg = _error(path)
    assert "missing columns ['Question', 'Complex_CoT', 'Response']" in msg
    assert "'question'" in msg and "'reasoning'" in msg and "'answer'" in msg


def test_shared_original_files(shared_data):
    original = shared_data / "train" / "original"
    demo = _load(original / "huatuogpt_o1_demo" / "demo_data.json")  # .json, seed column names
    assert len(demo.records) == 198
    head = _load(
        original / "medical_o1_sft_en_head10" / "translated_medical_o1_input_en_to_th.csv",  # .csv with a BOM
        question_column="original_question_en", reasoning_column="complex_cot", answer_column="response",
    )
    assert len(head.records) == 10 and head.columns[0] == "original_question_en"


# -- bad input: file, 1-based row and field -------------------------------------------------------


@pytest.mark.parametrize(
    ("bad_row", "needle"),
    [
        ({"Question": "q?", "Response": "a"}, "row 3: field 'Complex_CoT' is missing"),
        ({"Question": "q?", "Complex_CoT": None, "Response": "a"}, "row 3: field 'Complex_CoT' is null"),
        ({"Question": "q?", "Complex_CoT": "r", "Response": ""}, "row 3: field 'Response' is empty"),
        ({"Question": " \n\t", "Complex_CoT": "r", "Response": "a"}, "row 3: field 'Question' is empty"),
        ({"Question": 42, "Complex_CoT": "r", "Response": "a"}, "row 3: field 'Question' must be a string, got int"),
        ({"Question": "q", "Complex_CoT": ["a", "b"], "Response": "a"}, "row 3: field 'Complex_CoT' must be a string, got list"),
        ('{"Question": "q?", "Complex_CoT": "r",', "row 3: invalid JSON (Expecting property name enclosed in double "
                                                  "quotes at column 39)"),
        ('{"Question": "q?', "row 3: invalid JSON (Unterminated string starting at column 14)"),
        ('["a list", "not an object"]', "row 3: expected an object with fields, got list"),
    ],
    ids=["missing", "null", "empty", "whitespace", "int", "list", "invalid-json", "unterminated", "not-object"],
)
def test_bad_row_names_file_row_and_field(tmp_path, bad_row, needle):
    path = _jsonl(tmp_path / "d.jsonl", _rows(2) + [bad_row] + _rows(2))
    msg = _error(path)
    assert msg.startswith(f"{path}: ")
    assert needle in msg
    assert "--skip-bad-rows" in msg  # says how to go on


def test_wrong_encoding_names_file_and_row(tmp_path):
    path = tmp_path / "d.jsonl"
    good = "".join(json.dumps(r) + "\n" for r in _rows(3))
    latin1 = '{"Question": "caf\u00e9?", "Complex_CoT": "r", "Response": "a"}\n'.encode("latin-1")
    path.write_bytes(good.encode() + latin1)
    msg = _error(path)
    assert f"{path}: row 4: not valid UTF-8 (byte 0xe9" in msg and "re-save the file as UTF-8" in msg


def test_wrong_encoding_is_a_file_error_even_with_skip_bad_rows(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes("Question,Complex_CoT,Response\n".encode() + "caf\u00e9?,r,a\n".encode("latin-1"))
    msg = _error(path, skip_bad_rows=True)
    assert str(path) in msg and "not valid UTF-8" in msg


def test_missing_columns_lists_the_columns_found(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"question": "q", "cot": "r", "Response": "a"}])
    with pytest.raises(ColumnsError) as e:
        _load(path, skip_bad_rows=True)  # a file-level problem: skipping rows cannot fix it
    msg = str(e.value)
    assert msg.startswith(f"{path}: missing columns ['Question', 'Complex_CoT']")
    assert "columns found: ['question', 'cot', 'Response']" in msg
    assert "data.question_column" in msg  # how to fix it


def test_csv_row_errors(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("Question,Complex_CoT,Response\nq1,r1,a1\nq2,,a2\n")
    assert f"{path}: row 2: field 'Complex_CoT' is empty" in _error(path)
    path.write_text("Question,Complex_CoT,Response\nq1,r1,a1\nq2,r2\n")  # a short row: the field is missing
    assert f"{path}: row 2: field 'Response' is missing" in _error(path)


def test_json_file_errors(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[{"Question": "q"')
    assert f"{path}: invalid JSON (Expecting ',' delimiter at line 1, column 18)" in _error(path)
    path.write_text('[\n{"Question": "q')
    assert f"{path}: invalid JSON (Unterminated string starting at line 2, column 14)" in _error(path)
    path.write_text('{"rows": []}')
    assert "expected a JSON list of row objects" in _error(path)
    path.write_text(json.dumps(_rows(2) + ["text"]))
    assert f"{path}: row 3: expected an object with fields, got str" in _error(path)


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _load(tmp_path / "nope.jsonl")
    txt = tmp_path / "rows.txt"
    txt.write_text("hello\n")
    assert "unsupported file type '.txt'" in _error(txt)


def test_skip_bad_rows_counts_and_names_each_row(tmp_path):
    rows = _rows(3) + [{"Question": "q", "Complex_CoT": "", "Response": "a"}, "{not json"] + _rows(2) + [
        {"Question": 1, "Complex_CoT": "r", "Response": "a"}
    ]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    loaded = _load(path, skip_bad_rows=True)
    assert len(loaded.records) == 5
    assert [r.row for r in loaded.records] == [1, 2, 3, 6, 7]
    assert len(loaded.skipped) == 3
    assert "row 4: field 'Complex_CoT' is empty" in loaded.skipped[0]
    assert "row 5: invalid JSON" in loaded.skipped[1]
    assert "row 8: field 'Question' must be a string" in loaded.skipped[2]
    # Without the flag the first bad row stops the load.
    assert "row 4: field 'Complex_CoT' is empty" in _error(path)


def test_no_usable_rows(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"Question": "q", "Complex_CoT": "r", "Response": " "}] * 2)
    assert f"{path}: no usable rows (2 skipped as bad)" in _error(path, skip_bad_rows=True)


# -- split ----------------------------------------------------------------------------------------


def _records(n: int) -> list[Record]:
    return [Record(question=f"q{i}", reasoning="r", answer="a", row=i) for i in range(1, n + 1)]


def test_split_is_deterministic_disjoint_and_complete():
    records = _records(40)
    args = DataArgs(val_size=8, seed=1)
    a, b = split_records(records, args), split_records(records, args)
    assert a == b
    assert len(a.val) == 8 and len(a.train) == 32
    assert {r.row for r in a.val}.isdisjoint(r.row for r in a.train)
    assert sorted(r.row for r in a.val + a.train) == list(range(1, 41))
    other = split_records(records, DataArgs(val_size=8, seed=2))
    assert [r.row for r in other.val] != [r.row for r in a.val]  # the seed matters
    assert [r.row for r in a.val] != list(range(1, 9))  # shuffled, not the file head


def test_split_num_samples_and_limits():
    records = _records(40)
    s = split_records(records, DataArgs(val_size=8, seed=1, num_samples=10))
    full = split_records(records, DataArgs(val_size=8, seed=1))
    assert s.val == full.val  # sampling never changes the held-out rows
    assert s.train == full.train[:10]
    assert len(split_records(records, DataArgs(val_size=8, num_samples=1000)).train) == 32
    with pytest.raises(DataError, match="cannot give data.val_size=40"):
        split_records(records, DataArgs(val_size=40))


# -- `medcot data check` --------------------------------------------------------------------------


def test_data_check_good_file(capsys):
    assert main(["data", "check", str(TINY), "--no-tokens"]) == 0
    out = capsys.readouterr().out
    assert f"{TINY}: 10 valid rows, 0 bad rows" in out
    assert "columns: Question, Complex_CoT, Response" in out


def test_data_check_reports_token_lengths(capsys, tiny_model_dir):
    assert main(["data", "check", str(TINY), f"model.name_or_path={tiny_model_dir}", "train.max_seq_length=140"]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("tokens ("))
    assert "10 rows" in line and "over max_seq_length=140 (dropped)" in line


def test_data_check_bad_file_fails_without_traceback(tmp_path, capsys):
    path = _jsonl(tmp_path / "d.jsonl", _rows(2) + [{"Question": "q", "Complex_CoT": "r", "Response": ""}])
    assert main(["data", "check", str(path), "--no-tokens"]) == 2
    out = capsys.readouterr()
    assert f"medcot data: error: {path}: row 3: field 'Response' is empty" in out.err
    assert "Traceback" not in out.err + out.out


def test_data_check_skip_bad_rows_lists_them_and_exits_1(tmp_path, capsys):
    path = _jsonl(tmp_path / "d.jsonl", _rows(2) + ["{oops", {"Question": "q", "Complex_CoT": 3, "Response": "a"}])
    assert main(["data", "check", str(path), "--no-tokens", "--skip-bad-rows"]) == 1
    out = capsys.readouterr().out
    assert f"{path}: 2 valid rows, 2 bad rows" in out
    assert "bad: " in out and "row 3: invalid JSON" in out and "row 4: field 'Complex_CoT' must be a string" in out


def test_data_check_missing_file_and_columns(tmp_path, capsys):
    assert main(["data", "check", str(tmp_path / "nope.jsonl"), "--no-tokens"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
    path = _jsonl(tmp_path / "d.jsonl", [{"q": "a", "r": "b", "a": "c"}])
    assert main(["data", "check", str(path), "--no-tokens"]) == 2
    err = capsys.readouterr().err
    assert "missing columns" in err and "columns found: ['q', 'r', 'a']" in err and "Traceback" not in err


def test_data_check_with_column_mapping(shared_data, capsys):
    path = shared_data / "train" / "normalized" / "medical_o1_style_train.jsonl"
    argv = ["data", "check", str(path), "--no-tokens",
            "data.question_column=question", "data.reasoning_column=reasoning", "data.answer_column=answer"]
    assert main(argv) == 0
    assert "205 valid rows, 0 bad rows" in capsys.readouterr().out


def test_data_check_takes_max_seq_length_from_the_config_in_use(tmp_path, capsys, tiny_model_dir):
    """Token lengths are checked against the limit training will use: --config's, not the default."""
    from medcot.config import TrainArgs

    config = tmp_path / "train.yaml"
    config.write_text(f"model:\n  name_or_path: {tiny_model_dir}\ntrain:\n  max_seq_length: 150\n"
                      "data:\n  overlong: truncate\n")
    assert main(["data", "check", str(TINY), "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "over max_seq_length=150 (truncated)" in out
    assert f"train.max_seq_length=150 and data.overlong=truncate from {config}" in out

    assert main(["data", "check", str(TINY), f"model.name_or_path={tiny_model_dir}"]) == 0
    out = capsys.readouterr().out
    assert f"over max_seq_length={TrainArgs().max_seq_length} (dropped)" in out
    assert "from the defaults (pass the training config with --config) + overrides" in out


@pytest.mark.parametrize(("source", "local"), [
    ("FreedomIntelligence/medical-o1-reasoning-SFT", False), ("medqa", False), ("owner/name", False),
    ("rows.jsonl", True), ("data/rows.CSV", True), ("./rows", True), ("~/rows", True), ("/abs/rows", True),
    ("a/b/c", True),
])
def test_one_rule_tells_a_local_path_from_a_hub_id(source, local):
    from medcot.data.sources import is_local

    assert is_local(source) is local


def test_an_existing_folder_named_like_a_hub_id_is_local(tmp_path, monkeypatch):
    from medcot.data.sources import is_local

    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner" / "name").mkdir(parents=True)
    assert is_local("owner/name")


@pytest.mark.parametrize("source", ["./missing-rows", "no/such/file"])
def test_training_rows_and_raw_text_treat_a_missing_path_alike(source):
    """Both loaders share the rule: a path that is not there is a missing file, never a hub download."""
    from medcot.config import DataArgs, PretrainArgs
    from medcot.data.corpus import iter_documents
    from medcot.data.rows import load_records

    with pytest.raises(FileNotFoundError):
        load_records(DataArgs(source=source))
    with pytest.raises(FileNotFoundError):
        iter_documents(PretrainArgs(source=source))
