"""The pre-training corpus: loaders, error messages, block packing, the held-out split, the shipped sample."""

from __future__ import annotations

import csv
import importlib.util
import json
from itertools import accumulate
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from medcot.config import PretrainArgs
from medcot.data.collate import count_loss_tokens, pack_collate
from medcot.data.corpus import (
    EMBEDDED_CORPUS,
    PackStats,
    iter_documents,
    pack_blocks,
    split_documents,
)
from medcot.data.prompts import IGNORE_INDEX
from medcot.data.sources import iter_jsonl
from medcot.errors import DataError

REPO = Path(__file__).resolve().parents[1]
DOCS = ["Aspirin irreversibly inhibits COX-1.", "Line one, with a comma\nand \"quotes\".", "Short."]


@pytest.fixture(scope="module")
def tok(embedded_dir):
    return AutoTokenizer.from_pretrained(embedded_dir)


def _stream(tok, docs: list[str]) -> list[list[int]]:
    return [tok(d)["input_ids"] + [tok.eos_token_id] for d in docs]


def _abstracts(n: int) -> list[str]:
    return [row["text"] for _, row in list(iter_jsonl(EMBEDDED_CORPUS))[:n]]


# -- packing -------------------------------------------------------------------------------------


def test_blocks_are_full_and_reproduce_the_token_stream(tok):
    docs = _abstracts(6) + ["Short."]
    stats = PackStats()
    blocks = list(pack_blocks(docs, tok, 128, stats))
    per_doc = _stream(tok, docs)
    stream = [t for d in per_doc for t in d]
    assert blocks and all(len(b.input_ids) == 128 and sum(b.doc_lens) == 128 for b in blocks)
    assert all(b.labels == b.input_ids and b.prompt_len == 0 for b in blocks)
    assert [t for b in blocks for t in b.input_ids] == stream[: 128 * len(blocks)]
    assert stats == PackStats(documents=7, tokens=len(stream), blocks=len(blocks),
                              dropped_tokens=len(stream) - 128 * len(blocks))
    assert 0 <= stats.dropped_tokens < 128
    # Pieces end exactly at document ends and block ends, nowhere else.
    piece_ends = {128 * i + e for i, b in enumerate(blocks) for e in accumulate(b.doc_lens)}
    kept = 128 * len(blocks)
    expected = {e for e in accumulate(len(d) for d in per_doc) if e <= kept} | set(range(128, kept + 1, 128))
    assert piece_ends == expected


def test_a_document_longer_than_a_block_spans_blocks(tok):
    text = _abstracts(1)[0]
    n = len(_stream(tok, [text])[0])
    blocks = list(pack_blocks([text], tok, 32))
    assert len(blocks) == n // 32 and all(b.doc_lens == (32,) for b in blocks)


def test_pack_collate_sees_documents_inside_a_block(tok):
    blocks = list(pack_blocks(["Short.", "Tiny one.", *_abstracts(2)], tok, 48))[:2]
    assert len(blocks[0].doc_lens) >= 3
    batch = pack_collate(blocks)
    ids, labels, positions = (batch[k][0].tolist() for k in ("input_ids", "labels", "position_ids"))
    starts = [0]
    for b in blocks:
        for n in b.doc_lens:
            starts.append(starts[-1] + n)
    starts = starts[:-1]
    for i in range(len(ids)):
        doc_start = max(s for s in starts if s <= i)
        assert positions[i] == i - doc_start
        assert labels[i] == (IGNORE_INDEX if i == doc_start else ids[i])
    n_loss = int((batch["labels"][..., 1:] != IGNORE_INDEX).sum())
    assert count_loss_tokens(blocks) == n_loss == 2 * 48 - len(starts)


def test_pack_blocks_pulls_documents_lazily(tok):
    docs = _abstracts(10)
    lengths = [len(d) for d in _stream(tok, docs)]
    pulled = []

    def stream():
        for d in docs:
            pulled.append(d)
            yield d

    need = next(i + 1 for i, total in enumerate(accumulate(lengths)) if total >= 300)
    first = next(pack_blocks(stream(), tok, 300))
    assert len(first.input_ids) == 300 and len(pulled) == need < len(docs)


def test_pack_blocks_rejects_unusable_settings(tok):
    with pytest.raises(ValueError, match="block_size must be >= 2"):
        next(pack_blocks(["text"], tok, 1))


# -- held-out split ------------------------------------------------------------------------------


def test_split_holds_out_the_first_documents_and_stays_lazy():
    pulled = []

    def stream():
        for i in range(100):
            pulled.append(i)
            yield f"doc {i}"

    val, train = split_documents(stream(), 3)
    assert val == ["doc 0", "doc 1", "doc 2"] and len(pulled) == 4
    assert next(train) == "doc 3" and list(train)[-1] == "doc 99"


def test_split_needs_a_document_left_to_train_on():
    with pytest.raises(DataError, match=r"has 2 documents: pretrain.val_docs=2 leaves none"):
        split_documents(["a", "b"], 2)


# -- loaders -------------------------------------------------------------------------------------


def _write(path: Path, docs: list[str], column: str = "text") -> Path:
    rows = [{"id": i, column: d} for i, d in enumerate(docs)]
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif path.suffix == ".csv":
        with path.open("w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["id", column])
            writer.writeheader()
            writer.writerows(rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("suffix,total", [(".jsonl", 3), (".csv", 3), (".parquet", 3), (".json", None)])
def test_files_yield_their_text_column(tmp_path, suffix, total):
    path = _write(tmp_path / f"corpus{suffix}", DOCS, column="body")
    docs = iter_documents(PretrainArgs(source=str(path), text_column="body"))
    assert docs.total == total
    assert list(docs) == DOCS and list(docs) == DOCS  # iterable again


def test_folder_yields_each_txt_file_in_sorted_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.txt").write_text(DOCS[2] + "\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text(DOCS[0], encoding="utf-8")
    (tmp_path / "a2.txt").write_text("  " + DOCS[1], encoding="utf-8")
    (tmp_path / "notes.md").write_text("not a document", encoding="utf-8")
    docs = iter_documents(PretrainArgs(source=str(tmp_path)))
    assert docs.total == 3 and list(docs) == DOCS


def test_embedded_is_the_shipped_sample():
    docs = iter_documents(PretrainArgs())
    assert docs.total == 200 and docs.source == str(EMBEDDED_CORPUS)
    assert sum(1 for _ in docs) == 200


def test_hub_source_goes_through_load_dataset(tmp_path, monkeypatch):
    import datasets

    data = _write(tmp_path / "hub.jsonl", DOCS)
    calls, real_load = [], datasets.load_dataset

    def fake_load(path, name, split, streaming):  # a real Dataset / IterableDataset, built offline
        calls.append((path, name, split, streaming))
        return real_load("json", data_files=str(data), split=split, streaming=streaming,
                                     cache_dir=str(tmp_path / f"cache-{streaming}"))

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    for streaming in (False, True):
        docs = iter_documents(PretrainArgs(source="org/corpus", hub_config="en", streaming=streaming))
        # A stream's size comes only from metadata, which a local json "hub" dataset lacks.
        assert list(docs) == DOCS and docs.total == (None if streaming else 3)
    assert calls == [("org/corpus", "en", "train", False), ("org/corpus", "en", "train", True)]
    with pytest.raises(DataError, match=r"org/corpus: row 1: no field 'abstract'"):
        list(iter_documents(PretrainArgs(source="org/corpus", text_column="abstract")))


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("lines,message", [
    ([{"body": "x"}], r"row 1: no field 'text' \(found \['body'\]\); name the text column with pretrain.text_column"),
    ([{"text": "ok"}, {"text": 7}], r"row 2: field 'text' must be a string, got int"),
    ([{"text": "ok"}, {"text": "ok"}, {"text": "  \n"}], r"row 3: field 'text' is empty"),
    ([{"text": "ok"}, "not json"], r"row 2: invalid JSON"),
])
def test_bad_rows_name_file_row_and_field(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=str(path) + ": " + message):
        list(iter_documents(PretrainArgs(source=str(path))))


def test_csv_row_numbers_count_records(tmp_path):
    path = _write(tmp_path / "c.csv", ["ok", "multi\nline", ""])
    with pytest.raises(DataError, match=r"c.csv: row 3: field 'text' is empty"):
        list(iter_documents(PretrainArgs(source=str(path))))


@pytest.mark.parametrize("source", ["missing.jsonl", "./missing_folder", "/no/such/corpus"])
def test_missing_paths_are_named(tmp_path, monkeypatch, source):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"pretrain.source '{source}' does not exist"):
        iter_documents(PretrainArgs(source=source))


def test_empty_inputs_are_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no .txt files"):
        iter_documents(PretrainArgs(source=str(tmp_path / "empty")))
    (tmp_path / "blank.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"blank.jsonl: no documents"):
        list(iter_documents(PretrainArgs(source=str(tmp_path / "blank.jsonl"))))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("text", encoding="utf-8")
    (tmp_path / "docs" / "b.txt").write_text(" \n", encoding="utf-8")
    with pytest.raises(DataError, match=r"b.txt: the document is empty"):
        list(iter_documents(PretrainArgs(source=str(tmp_path / "docs"))))
    (tmp_path / "one.txt").write_text("text", encoding="utf-8")
    with pytest.raises(DataError, match=r"one.txt: unsupported file type"):
        iter_documents(PretrainArgs(source=str(tmp_path / "one.txt")))


# -- the shipped sample --------------------------------------------------------------------------


def test_shipped_sample_leaves_out_evaluated_and_official_test_items(shared_data):
    sample = [row for _, row in iter_jsonl(EMBEDDED_CORPUS)]
    shared = {row["id"].removeprefix("pubmedqa_"): row
              for _, row in iter_jsonl(shared_data / "eval" / "normalized" / "pubmedqa_pqal.shared.jsonl")}
    evaluated = {row["id"].removeprefix("pubmedqa_")
                 for _, row in iter_jsonl(REPO / "medcot" / "assets" / "eval" / "pubmedqa_pqal.sample.jsonl")}
    pmids = [row["id"].removeprefix("pubmed_") for row in sample]
    assert len(pmids) == len(set(pmids)) == 200 and EMBEDDED_CORPUS.stat().st_size < 400_000
    assert not set(pmids) & evaluated
    assert all(shared[p]["official_split"] == "trainval" for p in pmids)
    assert all(row["text"] == shared[p]["context"] for p, row in zip(pmids, sample))


def test_shipped_sample_is_what_the_script_writes(tmp_path, shared_data):
    spec = importlib.util.spec_from_file_location("make_pubmed_sample", REPO / "scripts" / "make_pubmed_sample.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(tmp_path / "out.jsonl") == 200
    assert (tmp_path / "out.jsonl").read_bytes() == EMBEDDED_CORPUS.read_bytes()
