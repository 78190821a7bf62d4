"""What every benchmark shares: the item format, loading and validating items, and the Task base.

An item is one line of a normalized file (the format of `../shared/data/eval/normalized/`):
`{"id", "benchmark", "question", "options": {"A": ...} | null, "answer", ...}`; PubMedQA items also
carry `context`, MMLU items `subject`. A task turns an item into the question text that goes inside
the training prompt, pulls the answer out of a model's output, and scores it.

Items come from three places, all validated the same way (errors name file, row and field):
- 'embedded': `medcot/assets/eval/`, a 25-item sample of each benchmark (shipped, no network; not GPQA,
  whose authors ask that its questions are not redistributed);
- a folder holding one normalized `<benchmark>*.jsonl` per benchmark;
- 'hub': the benchmark's dataset on the Hugging Face hub, its columns mapped to the item format
  (gated datasets need the user's token: HF_TOKEN or `huggingface-cli login`).

Besides the generative prompt (`render`), a task states its item the way the two published protocols
do: `huatuo_item` (HuatuoGPT-o1's evaluation) and `lm_eval_request` (lm-evaluation-harness).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from medcot.data.sources import iter_jsonl
from medcot.errors import ConfigError, DataError
from medcot.eval.extract import Extraction

EMBEDDED_EVAL_DIR = Path(__file__).resolve().parents[2] / "assets" / "eval"
LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class Item:
    id: str
    benchmark: str
    question: str
    options: dict[str, str] | None  # letter -> option text; None for yes/no/maybe questions
    answer: str  # a letter, or yes/no/maybe
    context: str | None = None  # PubMedQA: the abstract without its conclusion
    subject: str | None = None  # MMLU: the subject


class Task:
    """One benchmark: load → render the question → extract the answer → score.

    Subclasses set the class attributes and, where the benchmark differs, override `render`,
    `extract` or `from_hub_row`.
    """

    name: str  # the key in eval.benchmarks
    title: str  # shown in reports
    eval_type = "generative"  # the model writes reasoning and an answer; we parse the answer
    file_prefix: str  # a normalized file for this task is named <file_prefix>*.jsonl
    hub_id: str
    hub_configs: tuple[str | None, ...] = (None,)
    hub_split: str
    hub_gated = False  # the hub dataset needs an accepted licence and the user's token
    shipped = True  # a sample is in medcot/assets/eval/
    answer_case_insensitive = False  # PubMedQA accepts "Yes"/"YES" for yes in files

    # -- loading ---------------------------------------------------------------------------------

    def load(self, source: str, limit: int | None = None) -> list[Item]:
        """Items of this benchmark from 'embedded', 'hub' or a folder; `limit` spreads evenly over them.

        Raises:
            FileNotFoundError: no (or more than one) file for this benchmark in the folder.
            DataError: a malformed file or row; the message names file, row and field.
        """
        if source == "hub":
            items = self._load_hub()
        elif source == "embedded" and not self.shipped:
            raise ConfigError(
                f"{self.name} has no shipped sample (its items may not be redistributed); use "
                f"eval.source=<folder> (e.g. ../shared/data/eval/normalized) or eval.source=hub"
                + (" with HF_TOKEN set" if self.hub_gated else "")
            )
        else:
            folder = EMBEDDED_EVAL_DIR if source == "embedded" else Path(source)
            items = self.load_file(self.find_file(folder))
        return spread(items, limit)

    def find_file(self, folder: Path) -> Path:
        if not folder.is_dir():
            raise FileNotFoundError(
                f"eval.source={str(folder)!r} is not a folder; use 'embedded', 'hub' or a folder of normalized "
                f"<benchmark>*.jsonl files (e.g. ../shared/data/eval/normalized)"
            )
        found = sorted(folder.glob(f"{self.file_prefix}*.jsonl"))
        if len(found) != 1:
            names = ", ".join(p.name for p in sorted(folder.glob("*.jsonl"))) or "none"
            what = "no file" if not found else f"{len(found)} files ({', '.join(p.name for p in found)})"
            raise FileNotFoundError(
                f"{folder}: {what} for benchmark {self.name!r}; expected exactly one {self.file_prefix}*.jsonl "
                f"(.jsonl files there: {names}). Leave {self.name} out with eval.benchmarks=... if you don't have it."
            )
        return found[0]

    def load_file(self, path: Path) -> list[Item]:
        return self._validate_rows(_iter_jsonl(path), str(path))

    def _load_hub(self) -> list[Item]:
        from datasets import (
            load_dataset,  # network; datasets reads HF_TOKEN from the environment
        )

        token = None
        if self.hub_gated:
            from huggingface_hub import get_token
            token = get_token()  # HF_TOKEN, else the token `huggingface-cli login` saved
            if not token:
                raise ConfigError(
                    f"{self.hub_id} is gated: accept its terms on huggingface.co/datasets/{self.hub_id}, then set "
                    f"HF_TOKEN (or run huggingface-cli login); or use eval.source=<folder> with a local copy"
                )
        rows: list[tuple[int, Any]] = []
        for config in self.hub_configs:
            ds = load_dataset(self.hub_id, config, split=self.hub_split, token=token)
            kept = [dict(r) for r in ds if self.keep_hub_row(dict(r))]
            rows += [(len(rows) + 1, self.from_hub_row(r, i, config)) for i, r in enumerate(kept)]
        where = f"{self.hub_id} ({self.hub_split})"
        return self._validate_rows(iter(rows), where)

    def keep_hub_row(self, row: dict) -> bool:
        """Whether a hub row belongs to this benchmark (a subset of a larger dataset filters here)."""
        return True

    def from_hub_row(self, row: dict, index: int, config: str | None) -> dict:
        """Map row `index` of the hub split (of `config`, counting kept rows) to the normalized item format."""
        raise NotImplementedError

    def _validate_rows(self, rows: Iterator[tuple[int, Any]], where: str) -> list[Item]:
        items: list[Item] = []
        seen: dict[str, int] = {}
        for rownum, row in rows:
            if isinstance(row, DataError):
                raise row
            item = self.validate(row, where, rownum)
            if item.id in seen:
                raise DataError(f"{where}: row {rownum}: field 'id': {item.id!r} repeats row {seen[item.id]}")
            seen[item.id] = rownum
            items.append(item)
        if not items:
            raise DataError(f"{where}: no items for benchmark {self.name!r}")
        return items

    def validate(self, row: Any, where: str, rownum: int) -> Item:
        """Check one row against the normalized format and this benchmark's answer set."""
        def bad(field: str, problem: str) -> DataError:
            return DataError(f"{where}: row {rownum}: field {field!r}: {problem}")

        if not isinstance(row, dict):
            raise DataError(f"{where}: row {rownum}: expected a JSON object, got {type(row).__name__}")
        for field in ("id", "question", "answer"):
            value = row.get(field)
            if isinstance(value, int) and field == "id":
                value = str(value)
            if not isinstance(value, str) or not value.strip():
                raise bad(field, "missing" if value is None else f"must be a non-empty string, got {value!r}")
        benchmark = row.get("benchmark", self.name)
        if not isinstance(benchmark, str) or not benchmark.startswith(self.name):
            raise bad("benchmark", f"{benchmark!r} is not a {self.name} item (is this the right file?)")
        options = self._validate_options(row.get("options"), bad)
        answer = row["answer"].strip()
        allowed = list(options) if options else list(self.labels(None))
        if self.answer_case_insensitive:
            answer = answer.lower()
        if answer not in allowed:
            raise bad("answer", f"{row['answer']!r} is not one of {', '.join(allowed)}")
        for field in ("context", "subject"):
            if row.get(field) is not None and not isinstance(row[field], str):
                raise bad(field, f"must be a string, got {type(row[field]).__name__}")
        return Item(
            id=str(row["id"]), benchmark=benchmark, question=row["question"].strip(), options=options,
            answer=answer, context=row.get("context"), subject=row.get("subject"),
        )

    # -- per-benchmark behaviour ---------------------------------------------------------------

    def _validate_options(self, options: Any, bad) -> dict[str, str] | None:
        raise NotImplementedError

    def labels(self, item: Item | None) -> tuple[str, ...]:
        raise NotImplementedError

    def chance(self, items: list[Item]) -> float:
        """Accuracy of uniform guessing over these items' answer choices."""
        return sum(1 / len(self.labels(it)) for it in items) / max(len(items), 1)

    def render(self, item: Item) -> str:
        """The question text that goes into the training prompt's {question} slot."""
        raise NotImplementedError

    def extract(self, output: str, item: Item) -> Extraction:
        raise NotImplementedError

    def huatuo_item(self, item: Item) -> tuple[str, dict[str, str], str]:
        """(question, lettered options, gold letter) as HuatuoGPT-o1's eval_data.json states this item."""
        return item.question, item.options, item.answer

    def lm_eval_request(self, item: Item) -> tuple[str, dict[str, str]]:
        """(context, {label: continuation}) of lm-evaluation-harness's multiple-choice task for this benchmark.

        The default is lm-eval's `medqa_4options` (lm_eval/tasks/medqa/preprocess_medqa.py): the question,
        the lettered options, "Answer:", and each letter after a space.
        """
        lines = "".join(f"{k}. {v}\n" for k, v in item.options.items())
        return f"Question: {item.question}\n{lines}Answer:", {k: f" {k}" for k in item.options}

    def score(self, item: Item, extraction: Extraction) -> bool:
        """Correct iff the extracted label is the gold one; unparseable (label None) is wrong."""
        return extraction.label is not None and extraction.label == item.answer


class MultipleChoiceTask(Task):
    """A question with lettered options; the model should end with the letter of the right one."""

    def _validate_options(self, options: Any, bad) -> dict[str, str]:
        if not isinstance(options, dict) or len(options) < 2:
            raise bad("options", f"must be an object of at least 2 lettered options, got {options!r}")
        keys = list(options)
        if keys != list(LETTERS[: len(keys)]):
            raise bad("options", f"keys must be A, B, C, ... in order, got {', '.join(map(str, keys))}")
        for k, v in options.items():
            if not isinstance(v, str) or not v.strip():
                raise bad("options", f"option {k} must be a non-empty string, got {v!r}")
        return {k: v.strip() for k, v in options.items()}

    def labels(self, item: Item | None) -> tuple[str, ...]:
        return tuple(item.options) if item is not None and item.options else tuple(LETTERS[:4])

    def render(self, item: Item) -> str:
        return render_mc(item.question, item.options)

    def extract(self, output: str, item: Item) -> Extraction:
        from medcot.eval.extract import extract_choice
        return extract_choice(output, item.options)


def render_mc(question: str, options: dict[str, str]) -> str:
    """Question, the lettered options one per line, then what the final answer should look like.

    The instruction asks for the letter in a fixed phrase ("The answer is X") because that is what
    the extractor looks for first; option text and bare letters are only fallbacks.
    """
    letters = list(options)
    choices = "\n".join(f"{k}. {v}" for k, v in options.items())
    listed = ", ".join(letters[:-1]) + f" or {letters[-1]}"
    return (
        f"{question}\n\n{choices}\n\n"
        f"Choose the single best option. After your reasoning, finish with \"The answer is X\", "
        f"where X is the letter {listed}."
    )


def spread(items: list[Item], limit: int | None) -> list[Item]:
    """`limit` items evenly spaced over the list (all when limit is None or larger).

    Files are sorted by subject or split (MMLU by subject, PubMedQA by official split), so taking the
    first `limit` would measure one subject only; even spacing keeps every part represented, and is
    deterministic, so a resumed or repeated eval sees the same items.
    """
    if limit is None or limit >= len(items):
        return list(items)
    return [items[i * len(items) // limit] for i in range(limit)]


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"Eval file {str(path)!r} does not exist")
    if path.suffix.lower() != ".jsonl":
        raise DataError(f"{path}: eval files must be normalized .jsonl (one item object per line)")
    yield from iter_jsonl(path)
