"""Eval: generative medical benchmarks with reasoning-aware answer extraction.

    medcot eval --adapter runs/demo --compare

- `tasks/`: one small task per benchmark (MedQA, MedMCQA, PubMedQA, MMLU medical): load → prompt → extract → score
- `extract.py`: the answer a model's output commits to, and the rule that found it
- `metrics.py`: accuracy with Wilson 95% intervals; paired McNemar test for before vs after
- `overlap.py`: n-gram contamination check between the training data and the benchmark items
- `run.py`: the resumable eval (items.jsonl), the thinking budget, `evaluate_for_train` for `medcot train`
- `report.py`: report.md / report.html with the before-vs-after chart
"""
