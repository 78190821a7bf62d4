"""PubMedQA (PQA-L): a research question and its abstract (without the conclusion); answer
yes / no / maybe. Chance: 33.3% (guessing uniformly over three labels).

Hub: qiaojin/PubMedQA, config `pqa_labeled`, split `train` (all 1,000 expert-labelled items),
columns `pubid`, `question`, `context` ({"contexts": [...], ...}), `final_decision`.
"""

from __future__ import annotations

from typing import Any

from medcot.errors import DataError
from medcot.eval.extract import Extraction, extract_yes_no
from medcot.eval.tasks.common import Item, Task

LABELS = ("yes", "no", "maybe")
# How HuatuoGPT-o1's eval_data.json states a PubMedQA item: the abstract, this sentence, the question,
# and yes / no / maybe as options A / B / C.
HUATUO_BRIDGE = ("\n\nUsing the above document as a reference, please review the following question and choose "
                 "the option you find most appropriate.\n")


class PubMedQA(Task):
    name = "pubmedqa"
    title = "PubMedQA (PQA-L, yes/no/maybe)"
    file_prefix = "pubmedqa"
    hub_id = "qiaojin/PubMedQA"
    hub_configs = ("pqa_labeled",)
    hub_split = "train"
    answer_case_insensitive = True

    def from_hub_row(self, row: dict, index: int, config: str | None) -> dict:
        ctx = row.get("context")
        contexts = ctx.get("contexts") if isinstance(ctx, dict) else ctx
        return {
            "id": f"pubmedqa_{row.get('pubid', index)}",
            "benchmark": self.name,
            "question": row.get("question"),
            "options": None,
            # the abstract's sections joined with a space, as in the normalized files
            "context": " ".join(contexts) if isinstance(contexts, list) else contexts,
            "answer": row.get("final_decision"),
        }

    def validate(self, row: Any, where: str, rownum: int) -> Item:
        item = super().validate(row, where, rownum)
        if not item.context or not item.context.strip():
            raise DataError(
                f"{where}: row {rownum}: field 'context': missing or empty "
                "(a PubMedQA question is answered from its abstract)"
            )
        return item

    def _validate_options(self, options: Any, bad) -> None:
        if options not in (None, {}, []):
            raise bad("options", f"PubMedQA items have no options (yes/no/maybe), got {options!r}")
        return None

    def labels(self, item: Item | None) -> tuple[str, ...]:
        return LABELS

    def render(self, item: Item) -> str:
        return (
            f"Context: {item.context}\n\nQuestion: {item.question}\n\n"
            "Based on the context, answer yes, no or maybe. After your reasoning, finish with "
            "\"The answer is yes\", \"The answer is no\" or \"The answer is maybe\"."
        )

    def extract(self, output: str, item: Item) -> Extraction:
        return extract_yes_no(output)

    def huatuo_item(self, item: Item) -> tuple[str, dict[str, str], str]:
        options = dict(zip("ABC", LABELS))
        gold = "ABC"[LABELS.index(item.answer)]
        return f"{item.context}{HUATUO_BRIDGE}{item.question}", options, gold

    def lm_eval_request(self, item: Item) -> tuple[str, dict[str, str]]:
        """lm-eval's `pubmedqa` format (lm_eval/tasks/pubmedqa/preprocess_pubmedqa.py). lm-eval joins the abstract's
        sections with newlines; the normalized files hold them joined with a space."""
        return f"Abstract: {item.context}\nQuestion: {item.question}\nAnswer:", {w: f" {w}" for w in LABELS}
