"""Where rows come from: the one rule that tells a local path from a hub dataset id, and the readers of
local files (.jsonl, .json, .csv, .parquet) that training rows, raw text and eval items share.

Every reader names the file and the 1-based row of a problem.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Iterator

from medcot.errors import DataError

LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def is_local(source: str) -> bool:
    """A path on this machine, not a hub dataset id.

    A hub id is "name" or "owner/name"; anything that exists here, has a data-file suffix, starts like a
    path ("/", ".", "~") or has more than one "/" is local, so a mistyped path fails as a missing file
    instead of as a confusing hub download.
    """
    path = Path(source).expanduser()
    return (path.exists() or path.suffix.lower() in LOCAL_SUFFIXES or source.startswith(("/", ".", "~"))
            or source.count("/") > 1)


def decode(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}: row {line}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); "
            "re-save the file as UTF-8"
        ) from None


def iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield (1-based line, parsed object) per non-blank line; a bad line yields a DataError instead,
    so the caller decides whether it stops the load or is skipped."""
    for lineno, line in enumerate(decode(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            yield lineno, DataError(f"{path}: row {lineno}: invalid JSON ({_json_problem(e)})")


def _json_problem(e: json.JSONDecodeError, line: bool = False) -> str:
    """The decoder's message with its position; some messages already end in "at" ("Unterminated string
    starting at"), which then reads on into the position instead of repeating it."""
    where = f"line {e.lineno}, column {e.colno}" if line else f"column {e.colno}"
    return f"{e.msg} {where}" if e.msg.endswith(" at") else f"{e.msg} at {where}"


def iter_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield (1-based row, raw row) from a local file. Rows that are not objects are yielded as-is."""
    suffix = path.suffix.lower()
    if not path.is_file():
        raise FileNotFoundError(f"Data file {str(path)!r} does not exist")
    if suffix == ".jsonl":
        yield from iter_jsonl(path)
    elif suffix == ".json":
        try:
            data = json.loads(decode(path))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON ({_json_problem(e, line=True)})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of row objects (or {{\"data\": [...]}})")
        yield from enumerate(data, start=1)
    elif suffix == ".csv":
        reader = csv.DictReader(io.StringIO(decode(path), newline=""))
        for i, row in enumerate(reader, start=1):
            # A short row leaves its last fields None (DictReader's restval): they are missing, not null.
            yield i, {k: v for k, v in row.items() if k is not None and v is not None}
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from enumerate(pq.read_table(path).to_pylist(), start=1)
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r} (use {', '.join(LOCAL_SUFFIXES)})")
