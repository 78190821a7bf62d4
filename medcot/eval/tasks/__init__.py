"""One small task per benchmark (load → prompt → extract → score), nanochat-style."""

from __future__ import annotations

from medcot.eval.tasks.common import (
    EMBEDDED_EVAL_DIR,
    Item,
    MultipleChoiceTask,
    Task,
    render_mc,
    spread,
)
from medcot.eval.tasks.gpqa_medical import GPQAMedical
from medcot.eval.tasks.medmcqa import MedMCQA
from medcot.eval.tasks.medqa import MedQA
from medcot.eval.tasks.mmlu_medical import MMLUMedical
from medcot.eval.tasks.mmlu_pro_medical import MMLUProMedical
from medcot.eval.tasks.pubmedqa import PubMedQA

TASKS: dict[str, Task] = {t.name: t for t in (MedQA(), MedMCQA(), PubMedQA(), MMLUMedical(), MMLUProMedical(),
                                              GPQAMedical())}

__all__ = ["EMBEDDED_EVAL_DIR", "Item", "MultipleChoiceTask", "Task", "TASKS", "render_mc", "spread"]
