"""Data: load → validate → map columns → sample → split.

A training record is `{question, reasoning, answer}` after column mapping (defaults `Question`,
`Complex_CoT`, `Response`, as in FreedomIntelligence/medical-o1-reasoning-SFT). Every problem with
an input row is reported with the file, the 1-based row and the field.

    medcot data check my_rows.jsonl
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from medcot.config import DataArgs
from medcot.data.sources import is_local, iter_rows
from medcot.embedded import DEMO_DATA
from medcot.errors import ColumnsError, DataError

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Record:
    question: str
    reasoning: str
    answer: str
    row: int  # 1-based row in the source, kept so later errors can point back to it


@dataclass
class LoadedData:
    source: str
    records: list[Record]
    skipped: list[str] = field(default_factory=list)  # one message per skipped bad row
    columns: list[str] = field(default_factory=list)


@dataclass
class Splits:
    train: list[Record]
    val: list[Record]


def resolve_source(source: str) -> str:
    return str(DEMO_DATA) if source == "embedded" else source


def _iter_hub_rows(args: DataArgs) -> Iterator[tuple[int, Any]]:
    from datasets import (
        load_dataset,  # token: datasets reads HF_TOKEN from the environment
    )

    ds = load_dataset(args.source, args.hub_config, split=args.split)
    yield from enumerate(ds, start=1)


def load_records(args: DataArgs) -> LoadedData:
    """Load and validate every row of `args.source`.

    Raises:
        FileNotFoundError: a local file that does not exist.
        DataError: a malformed file, missing columns, or (without `skip_bad_rows`) a bad row.
    """
    source = resolve_source(args.source)
    rows = iter_rows(Path(source)) if is_local(source) else _iter_hub_rows(args)
    wanted = {
        "question": args.question_column,
        "reasoning": args.reasoning_column,
        "answer": args.answer_column,
    }
    out = LoadedData(source=source, records=[])
    for rownum, row in rows:
        try:
            if isinstance(row, DataError):
                raise row
            if not isinstance(row, dict):
                raise DataError(f"{source}: row {rownum}: expected an object with fields, got {type(row).__name__}")
            if not out.columns:
                out.columns = list(row)
                missing = [c for c in wanted.values() if c not in row]
                if missing:
                    raise _missing_columns(source, missing, list(row), args)
            values = {}
            for name, column in wanted.items():
                if column not in row:
                    raise DataError(f"{source}: row {rownum}: field {column!r} is missing")
                if row[column] is None:
                    raise DataError(f"{source}: row {rownum}: field {column!r} is null")
                value = row[column]
                if not isinstance(value, str):
                    raise DataError(
                        f"{source}: row {rownum}: field {column!r} must be a string, got {type(value).__name__}"
                    )
                if not value.strip():
                    raise DataError(f"{source}: row {rownum}: field {column!r} is empty")
                values[name] = value.strip()
            out.records.append(Record(row=rownum, **values))
        except DataError as e:
            if isinstance(e, ColumnsError) or not args.skip_bad_rows:
                if isinstance(e, ColumnsError):
                    raise
                raise DataError(f"{e}\n(pass --skip-bad-rows to skip bad rows with a warning)") from None
            out.skipped.append(str(e))
    if not out.records:
        raise DataError(f"{source}: no usable rows" + (f" ({len(out.skipped)} skipped as bad)" if out.skipped else ""))
    if out.skipped:
        log.warning("Skipped %d bad rows of %s; first: %s", len(out.skipped), source, out.skipped[0])
    return out


def _missing_columns(source: str, missing: list[str], found: list[str], args: DataArgs) -> ColumnsError:
    return ColumnsError(
        f"{source}: missing columns {missing}; columns found: {found}. Map yours with "
        f"data.question_column / data.reasoning_column / data.answer_column "
        f"(now {args.question_column!r}, {args.reasoning_column!r}, {args.answer_column!r})"
    )


def split_records(records: list[Record], args: DataArgs) -> Splits:
    """Shuffle with `args.seed`; the first `val_size` rows are held out, the next `num_samples` train.

    Raises:
        DataError: too few rows for the requested split.
    """
    if len(records) <= args.val_size:
        raise DataError(
            f"{len(records)} rows cannot give data.val_size={args.val_size} held-out rows and still leave rows to train on"
        )
    order = list(records)
    random.Random(args.seed).shuffle(order)
    val, rest = order[: args.val_size], order[args.val_size :]
    if args.num_samples is not None:
        if args.num_samples > len(rest):
            log.warning(
                "data.num_samples=%d but only %d rows remain after holding out %d; training on all of them",
                args.num_samples, len(rest), args.val_size,
            )
        rest = rest[: args.num_samples]
    return Splits(train=rest, val=val)
