"""The questions GRPO trains on: multiple-choice (or yes/no/maybe) items with a known answer, and the
contamination check that must pass before any of them is trained on.

Items are in the eval item format (medcot/eval/tasks/common.py), so one benchmark task renders the prompt,
extracts the answer and scores it exactly as `medcot eval` does:
- a local `.jsonl` file of items, e.g. the dev pools in `../shared/data/dev_pools/normalized/` (MedQA dev,
  MedMCQA train); `grpo.task=auto` takes the task from the rows' `benchmark` field;
- a hub dataset id, its rows mapped by the task's `from_hub_row` (`grpo.task`, `grpo.hub_config`, `grpo.split`).

Contamination: the training questions are indexed and every item of the configured eval benchmarks
(`eval.benchmarks` from `eval.source`, all items, not only `eval.limit`) is checked against them with
medcot/eval/overlap.py, the check `medcot eval` reports. Any overlap stops the stage with the counts, unless
`grpo.exclude_overlap=true`: then the training items the flagged eval items point to are dropped, and the
check runs again until nothing overlaps (an eval question copied into several training items needs several
rounds).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from medcot.config import Config, GrpoArgs
from medcot.data.sources import is_local
from medcot.errors import ConfigError, ContaminationError, DataError
from medcot.eval import overlap
from medcot.eval.tasks import TASKS, Item, Task


@dataclass
class Items:
    source: str
    task: Task
    train: list[Item]
    val: list[Item]  # held out: never trained on


def load_items(g: GrpoArgs, seed: int) -> Items:
    """Load, validate and split `grpo.source`: `grpo.val_size` held out, then up to `grpo.num_samples` to train on.

    Raises:
        FileNotFoundError: a local file that does not exist.
        ConfigError: grpo.task=auto where the task cannot be read from the file.
        DataError: a malformed row (file, row and field named), or too few items.
    """
    if is_local(g.source):  # medcot's one rule for a path vs a hub dataset id
        path = Path(g.source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"grpo.source={g.source!r} does not exist")
        task = TASKS[g.task] if g.task != "auto" else _task_of_file(path)
        items = task.load_file(path)
    else:
        if g.task == "auto":
            raise ConfigError(f"grpo.source={g.source!r} is a hub dataset: set grpo.task to the benchmark whose "
                              f"columns it has ({', '.join(TASKS)})")
        task = TASKS[g.task]
        items = _load_hub(g, task)
    if len(items) <= g.val_size:
        raise DataError(f"{g.source}: {len(items)} items cannot give grpo.val_size={g.val_size} held-out items and "
                        "still leave items to train on")
    order = list(items)
    random.Random(seed).shuffle(order)
    val, train = order[: g.val_size], order[g.val_size :]
    if g.num_samples is not None:
        train = train[: g.num_samples]
    return Items(source=g.source, task=task, train=train, val=val)


def _task_of_file(path: Path) -> Task:
    """The task whose name the first row's `benchmark` field starts with ("medqa_usmle_4opt_dev" -> medqa)."""
    with path.open(encoding="utf-8") as f:
        first = f.readline()
    try:
        benchmark = json.loads(first).get("benchmark", "")
    except (json.JSONDecodeError, AttributeError):
        raise DataError(f"{path}: row 1 is not a JSON object") from None
    found = sorted((name for name in TASKS if str(benchmark).startswith(name)), key=len)
    if not found:
        raise ConfigError(f"{path}: row 1's benchmark field {benchmark!r} names none of {', '.join(TASKS)}; "
                          "set grpo.task to the one whose format the items follow")
    return TASKS[found[-1]]


def _load_hub(g: GrpoArgs, task: Task) -> list[Item]:
    from datasets import (
        load_dataset,  # network; datasets reads HF_TOKEN from the environment
    )

    ds = load_dataset(g.source, g.hub_config, split=g.split)
    where = f"{g.source} ({g.split})"
    rows = [dict(r) for r in ds if task.keep_hub_row(dict(r))]  # as eval reads the task's own hub dataset
    return [task.validate(task.from_hub_row(row, i, g.hub_config), where, i + 1) for i, row in enumerate(rows)]


@dataclass
class Contamination:
    kept: list[Item]
    dropped: list[Item]
    summary: dict = field(default_factory=dict)  # per benchmark: items, overlapping (first check), for the report


def check_contamination(train: list[Item], cfg: Config) -> Contamination:
    """Refuse (or, with grpo.exclude_overlap, drop) training items that overlap the configured eval benchmarks.

    Raises:
        ContaminationError: overlaps found and grpo.exclude_overlap is false; the message has the counts.
    """
    e = cfg.eval
    benchmarks = {name: TASKS[name].load(e.source) for name in e.benchmarks}
    kept, dropped, summary = list(train), [], {}
    while True:
        # `rows` = positions in `kept`, so a flagged item's train_row is the index of the training item to drop
        index = overlap.build_index([it.question for it in kept], e.overlap_ngram, rows=list(range(len(kept))))
        reports = {name: overlap.check(name, items, index, e.overlap_threshold) for name, items in benchmarks.items()}
        if not summary:
            summary = {name: {"items": r.n_items, "overlapping": r.n_overlapping} for name, r in reports.items()}
        rows = {f.train_row for r in reports.values() for f in r.flagged}
        if not rows:
            break
        dropped += [kept[i] for i in sorted(rows)]
        kept = [it for i, it in enumerate(kept) if i not in rows]
    if dropped and not cfg.grpo.exclude_overlap:
        counts = ", ".join(f"{name} {s['overlapping']}/{s['items']}" for name, s in summary.items() if s["overlapping"])
        raise ContaminationError(
            f"grpo.source: {len(dropped)} of {len(train)} training items overlap the eval benchmarks (eval items "
            f"flagged: {counts}; eval.source={e.source}, >= {e.overlap_threshold:.0%} of {e.overlap_ngram}-grams). "
            "Training on them would inflate those scores. Set grpo.exclude_overlap=true to drop them, or train on "
            "other items (the eval halves are never for training)."
        )
    if not kept:
        raise DataError("grpo.exclude_overlap=true dropped every training item: nothing is left to train on")
    return Contamination(kept=kept, dropped=dropped, summary=summary)
