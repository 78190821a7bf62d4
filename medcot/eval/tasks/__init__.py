"""One small task per benchmark (load → prompt → extract → score), nanochat-style."""

from __future__ import annotations

from .common import EMBEDDED_EVAL_DIR, Item, MultipleChoiceTask, Task, render_mc, spread
from .medmcqa import MedMCQA
from .medqa import MedQA
from .mmlu_medical import MMLUMedical
from .pubmedqa import PubMedQA

TASKS: dict[str, Task] = {t.name: t for t in (MedQA(), MedMCQA(), PubMedQA(), MMLUMedical())}

__all__ = ["EMBEDDED_EVAL_DIR", "Item", "MultipleChoiceTask", "Task", "TASKS", "render_mc", "spread"]
