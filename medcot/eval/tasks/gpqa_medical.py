"""GPQA medical subset: GPQA's biology questions (graduate-level, "Google-proof"), 4 options. Chance: 25%.

The subset HuatuoGPT-o1 reports on (`GPQA_Medical_test` in its evaluation/data/eval_data.json): the 78
biology questions of GPQA main, each listed 5 times with the same options, 390 items in all. The 5
copies are one question: scoring them as 5 items would count 78 questions as 390 and make the
interval too narrow, so repeated copies are merged on load (one item per question). With sampling,
`eval.samples=5` puts the 5 answers back, and their mean accuracy is the number HuatuoGPT-o1's table
reports.

Gated: GPQA's authors ask that its questions are not revealed online (training-data leakage). medcot
ships no sample; tests and docs read `../shared/data/eval/normalized`. Hub: Idavidrein/gpqa, config
`gpqa_main`, split `train`, rows whose `High-level domain` is Biology (needs the user's token); columns
`Record ID`, `Question`, `Correct Answer`, `Incorrect Answer 1..3`. The hub has no option order: the
four answers are shuffled with a seed from the record id, so the order is the same on every run.
"""

from __future__ import annotations

import logging
import random

from medcot.eval.tasks.common import LETTERS, Item, MultipleChoiceTask

log = logging.getLogger(__name__)


class GPQAMedical(MultipleChoiceTask):
    name = "gpqa_medical"
    title = "GPQA medical (biology, 4 options)"
    file_prefix = "gpqa_medical"
    hub_id = "Idavidrein/gpqa"
    hub_configs = ("gpqa_main",)
    hub_split = "train"
    hub_gated = True
    shipped = False

    def keep_hub_row(self, row: dict) -> bool:
        return row.get("High-level domain") == "Biology"

    def from_hub_row(self, row: dict, index: int, config: str | None) -> dict:
        correct = (row.get("Correct Answer") or "").strip()
        answers = [correct] + [(row.get(f"Incorrect Answer {i}") or "").strip() for i in (1, 2, 3)]
        random.Random(str(row.get("Record ID", index))).shuffle(answers)
        return {
            "id": f"gpqa_med_{index}",
            "benchmark": self.name,
            "question": row.get("Question"),
            "options": dict(zip(LETTERS, answers)),
            "answer": LETTERS[answers.index(correct)],
        }

    def _validate_rows(self, rows, where: str) -> list[Item]:
        items = super()._validate_rows(rows, where)
        first: dict[tuple, Item] = {}
        for it in items:
            first.setdefault((it.question, tuple(it.options.items()), it.answer), it)
        merged = list(first.values())
        if len(merged) < len(items):
            log.info("%s: %d items are %d questions repeated; scored once each (eval.samples=k samples them k times)",
                     where, len(items), len(merged))
        return merged

    def lm_eval_request(self, item: Item) -> tuple[str, dict[str, str]]:
        """lm-eval's `gpqa_main_zeroshot` format (lm_eval/tasks/gpqa/zeroshot/_gpqa_zeroshot_yaml)."""
        choices = "".join(f"({k}) {v}\n" for k, v in item.options.items())
        return (f"What is the correct answer to this question:{item.question}\nChoices:\n{choices}Answer:",
                {k: f" ({k})" for k in item.options})
