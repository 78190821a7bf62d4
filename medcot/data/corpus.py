"""Corpus: raw text for continued pre-training, read lazily and packed into fixed-size blocks.

A document is one text: an abstract, a guideline, one .txt file. Documents are tokenized one at a
time, each ending in EOS, and concatenated into blocks of exactly `pretrain.block_size` tokens, so
no compute goes to padding. Each block records where its documents start (`Encoded.doc_lens`):
`collate.pack_collate` restarts positions there and stops attention from crossing them.
Everything streams, so a hub corpus larger than memory trains in one pass.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from tqdm.auto import tqdm

from medcot.config import PretrainArgs
from medcot.data.prompts import Encoded
from medcot.data.sources import LOCAL_SUFFIXES, decode, is_local, iter_rows
from medcot.embedded import EMBEDDED_CORPUS
from medcot.errors import ConfigError, DataError


@dataclass(frozen=True)
class Documents:
    """A corpus: each iteration reads the document texts afresh, in the same order."""

    source: str
    total: int | None  # documents, where known without reading the text (sizes the progress bar)
    read: Callable[[], Iterator[str]]

    def __iter__(self) -> Iterator[str]:
        return self.read()


@dataclass
class PackStats:
    """Filled in by `pack_blocks` as blocks are taken; final once they are exhausted."""

    documents: int = 0
    tokens: int = 0  # every document token, EOS included, packed or dropped
    blocks: int = 0
    dropped_tokens: int = 0  # the last partial block: padding it would train on filler


def iter_documents(args: PretrainArgs) -> Documents:
    """The corpus named by `args.source`; local text is not read until the documents are iterated.

    Raises:
        FileNotFoundError: a local file that does not exist.
        DataError: a folder without .txt files or an unsupported file type; while iterating, a row
            without a non-empty string in `args.text_column` (file, row and field named), or no
            documents at all.
    """
    source = str(EMBEDDED_CORPUS) if args.source == "embedded" else args.source
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"{path}: no .txt files in this folder or below it (one document per .txt file)")
        return Documents(source, len(files), lambda: (_txt_document(p) for p in files))
    if is_local(source):
        if not path.exists():
            raise FileNotFoundError(f"pretrain.source {source!r} does not exist (a folder of .txt files or a "
                                    f"{'/'.join(LOCAL_SUFFIXES)} file)")
        if path.suffix.lower() not in LOCAL_SUFFIXES:
            raise DataError(f"{path}: unsupported file type; pretrain.source takes a folder of .txt files or a "
                            f"{'/'.join(LOCAL_SUFFIXES)} file")
        return Documents(source, _count_rows(path), lambda: _texts(source, iter_rows(path), args.text_column))
    from datasets import (  # token: datasets reads HF_TOKEN from the environment
        Dataset,
        load_dataset,
    )

    ds = load_dataset(source, args.hub_config, split=args.split, streaming=args.streaming)
    if isinstance(ds, Dataset):
        total = len(ds)
    else:  # a stream: the size is known only if the dataset card's metadata states it
        split = (ds.info.splits or {}).get(args.split)
        total = (split.num_examples or None) if split else None
    return Documents(source, total, lambda: _texts(source, enumerate(ds, start=1), args.text_column))


def _txt_document(path: Path) -> str:
    text = decode(path).strip()
    if not text:
        raise DataError(f"{path}: the document is empty")
    return text


def _texts(source: str, rows: Iterable[tuple[int, Any]], column: str) -> Iterator[str]:
    count = 0
    for rownum, row in rows:
        if isinstance(row, DataError):  # a line that is not JSON
            raise row
        if not isinstance(row, dict) or column not in row:
            found = list(row) if isinstance(row, dict) else type(row).__name__
            raise DataError(f"{source}: row {rownum}: no field {column!r} (found {found}); "
                            "name the text column with pretrain.text_column")
        text = row[column]
        if not isinstance(text, str):
            raise DataError(f"{source}: row {rownum}: field {column!r} must be a string, got {type(text).__name__}")
        if not text.strip():
            raise DataError(f"{source}: row {rownum}: field {column!r} is empty")
        count += 1
        yield text.strip()
    if not count:
        raise DataError(f"{source}: no documents")


def _count_rows(path: Path) -> int | None:
    """Rows of a local file where a pass that skips parsing the text finds them; None for .json."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open("rb") as f:
            return sum(1 for line in f if line.strip())
    if suffix == ".csv":
        with path.open(encoding="utf-8-sig", errors="replace", newline="") as f:
            return max(sum(1 for row in csv.reader(f) if row) - 1, 0)  # minus the header
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    return None


def split_documents(docs: Iterable[str], val_docs: int) -> tuple[list[str], Iterator[str]]:
    """Hold out the first `val_docs` documents for perplexity; the rest, still lazy, are for training.

    The first N rather than a random N: it is the one rule that splits a stream without knowing its
    length or buffering it, and it holds out the same documents on every run. A corpus sorted by
    topic or date gives an unrepresentative held-out set; shuffle such a file once beforehand.

    Raises:
        DataError: no document is left to train on.
    """
    stream = iter(docs)
    val = list(islice(stream, val_docs))
    first = next(stream, None)
    if first is None:
        raise DataError(f"The corpus has {len(val)} documents: pretrain.val_docs={val_docs} leaves none to train on")
    return val, chain([first], stream)


def pack_blocks(docs: Iterable[str], tokenizer, block_size: int, stats: PackStats | None = None,
                total: int | None = None, desc: str = "packing") -> Iterator[Encoded]:
    """Tokenize documents one at a time and yield blocks of exactly `block_size` tokens, loss on all.

    Each document begins the way the tokenizer begins any text (its BOS if it adds one, as prompts
    at inference do) and ends in EOS, so the model learns where a text ends. A document longer than
    the room left continues in the next block, where it counts as a new document: positions restart
    and its first token gets no loss. The last partial block is dropped (`stats.dropped_tokens`).

    Raises:
        ValueError: `block_size` below 2 (a block needs a token to predict from), or no EOS token.
    """
    if block_size < 2:
        raise ConfigError(f"pretrain.block_size must be >= 2, got {block_size}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("The tokenizer has no EOS token; set one so the model learns where a document ends")
    stats = stats if stats is not None else PackStats()
    ids: list[int] = []
    lens: list[int] = []
    for text in tqdm(docs, total=total, desc=desc, unit="doc"):
        doc = tokenizer(text)["input_ids"]
        if doc[-1:] != [eos]:
            doc.append(eos)
        stats.documents += 1
        stats.tokens += len(doc)
        start = 0
        while start < len(doc):
            piece = doc[start : start + block_size - len(ids)]
            ids += piece
            lens.append(len(piece))
            start += len(piece)
            if len(ids) == block_size:
                stats.blocks += 1
                yield Encoded(input_ids=ids, labels=list(ids), prompt_len=0, doc_lens=tuple(lens))
                ids, lens = [], []
    stats.dropped_tokens = len(ids)
