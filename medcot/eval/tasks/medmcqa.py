"""MedMCQA (4 options): Indian medical entrance exam questions (AIIMS / NEET PG). Chance: 25%.

Hub: openlifescienceai/medmcqa, split `validation` (4,183 items; the test split has no answers),
columns `id`, `question`, `opa`..`opd`, `cop` (0-3, the correct option), `subject_name`.
"""

from __future__ import annotations

from medcot.eval.tasks.common import LETTERS, Item, MultipleChoiceTask


class MedMCQA(MultipleChoiceTask):
    name = "medmcqa"
    title = "MedMCQA (dev, 4 options)"
    file_prefix = "medmcqa"
    hub_id = "openlifescienceai/medmcqa"
    hub_split = "validation"

    def from_hub_row(self, row: dict, index: int, config: str | None) -> dict:
        cop = row.get("cop")
        return {
            "id": f"medmcqa_dev_{row.get('id') or index}",
            "benchmark": self.name,
            "question": row.get("question"),
            "options": {k: row.get(f"op{k.lower()}") for k in "ABCD"},
            # cop is 0-based in the hub copy; -1 (or None) marks an unlabelled row and fails validation
            "answer": LETTERS[cop] if isinstance(cop, int) and 0 <= cop < 4 else cop,
            "subject": row.get("subject_name"),
        }

    def lm_eval_request(self, item: Item) -> tuple[str, dict[str, str]]:
        """lm-eval's `medmcqa` format (lm_eval/tasks/medmcqa/utils_medmcqa.py): a "Choices:" line before the options."""
        lines = "".join(f"{k}. {v}\n" for k, v in item.options.items())
        return f"Question: {item.question}\nChoices:\n{lines}Answer:", {k: f" {k}" for k in item.options}
