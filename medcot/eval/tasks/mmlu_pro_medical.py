"""MMLU-Pro medical subset: MMLU-Pro's health and biology questions, up to 10 options (A-J).

The subset HuatuoGPT-o1 reports on (`MMLU-Pro_Medical_test` in its evaluation/data/eval_data.json:
1,535 items = 818 health + 717 biology). Chance: 1 / the item's number of options (10 for most).

Hub: TIGER-Lab/MMLU-Pro, split `test`, rows of `category` health or biology; columns `question_id`,
`question`, `options` (a list of up to 10), `answer` (the letter), `category`.
"""

from __future__ import annotations

from medcot.eval.tasks.common import LETTERS, Item, MultipleChoiceTask

CATEGORIES = ("health", "biology")


class MMLUProMedical(MultipleChoiceTask):
    name = "mmlu_pro_medical"
    title = "MMLU-Pro medical (health + biology, up to 10 options)"
    file_prefix = "mmlu_pro_medical"
    hub_id = "TIGER-Lab/MMLU-Pro"
    hub_split = "test"

    def keep_hub_row(self, row: dict) -> bool:
        return row.get("category") in CATEGORIES

    def from_hub_row(self, row: dict, index: int, config: str | None) -> dict:
        options = row.get("options")
        return {
            "id": f"mmlupro_med_{index}",
            "benchmark": self.name,
            "subject": row.get("category"),
            "question": row.get("question"),
            "options": dict(zip(LETTERS, options)) if isinstance(options, list) else options,
            "answer": row.get("answer"),
        }

    def lm_eval_request(self, item: Item) -> tuple[str, dict[str, str]]:
        """lm-eval's `leaderboard_mmlu_pro` format (lm_eval/tasks/leaderboard/mmlu_pro/utils.py), zero-shot here."""
        lines = "".join(f"{k}. {v}\n" for k, v in item.options.items())
        return f"{item.question}\n{lines}Answer:", {k: f" {k}" for k in item.options}
