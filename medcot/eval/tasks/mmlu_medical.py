"""MMLU medical subsets (anatomy, clinical knowledge, college biology, college medicine, medical
genetics, professional medicine; test split, 4 options). Chance: 25%.

Hub: cais/mmlu, one config per subject, split `test`, columns `question`, `subject`, `choices`
(a list of 4) and `answer` (0-3).
"""

from __future__ import annotations

from medcot.eval.tasks.common import LETTERS, Item, MultipleChoiceTask

SUBJECTS = (
    "anatomy", "clinical_knowledge", "college_biology", "college_medicine", "medical_genetics",
    "professional_medicine",
)


class MMLUMedical(MultipleChoiceTask):
    name = "mmlu_medical"
    title = "MMLU medical (6 subjects)"
    file_prefix = "mmlu_medical"
    hub_id = "cais/mmlu"
    hub_configs = SUBJECTS
    hub_split = "test"

    def from_hub_row(self, row: dict, index: int, config: str | None) -> dict:
        choices = row.get("choices")
        answer = row.get("answer")
        return {
            "id": f"mmlu_{config}_test_{index}",
            "benchmark": self.name,
            "subject": config,
            "question": row.get("question"),
            "options": dict(zip(LETTERS, choices)) if isinstance(choices, list) else choices,
            "answer": LETTERS[answer] if isinstance(answer, int) and 0 <= answer < len(choices or []) else answer,
        }

    def lm_eval_request(self, item: Item) -> tuple[str, dict[str, str]]:
        """lm-eval's `mmlu_<subject>` format (lm_eval/tasks/mmlu/default/_default_template_yaml and the subject's
        description line), zero-shot as on the Open Medical-LLM leaderboard."""
        about = f"The following are multiple choice questions (with answers) about {(item.subject or 'medicine').replace('_', ' ')}.\n\n"
        lines = "".join(f"{k}. {v}\n" for k, v in item.options.items())
        return f"{about}{item.question.strip()}\n{lines}Answer:", {k: f" {k}" for k in item.options}
