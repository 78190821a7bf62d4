"""MedQA (USMLE, 4 options): clinical vignettes from US medical licensing exams. Chance: 25%.

Hub: GBaker/MedQA-USMLE-4-options, split `test` (1,273 items), columns `question`, `options`
({"A": ...}), `answer_idx` (the letter), `answer` (the option text).
"""

from __future__ import annotations

from medcot.eval.tasks.common import MultipleChoiceTask


class MedQA(MultipleChoiceTask):
    name = "medqa"
    title = "MedQA (USMLE, 4 options)"
    file_prefix = "medqa"
    hub_id = "GBaker/MedQA-USMLE-4-options"
    hub_split = "test"

    def from_hub_row(self, row: dict, index: int, config: str | None) -> dict:
        return {
            "id": f"medqa_test_{index}",
            "benchmark": self.name,
            "question": row.get("question"),
            "options": row.get("options"),
            "answer": row.get("answer_idx"),
        }
