"""Eval: medical benchmarks, three protocols, reasoning-aware answer extraction.

    medcot eval --adapter runs/demo --compare

- `tasks/`: one small task per benchmark (MedQA, MedMCQA, PubMedQA, MMLU medical, MMLU-Pro medical, GPQA
  medical): load → prompt → extract → score, plus how HuatuoGPT-o1 and lm-eval state the item
- `protocols/`: `eval.protocol` medcot (training prompt, thinking budget), huatuo (HuatuoGPT-o1's
  evaluation and scorer), loglik (lm-evaluation-harness's option log-likelihood)
- `extract.py`, `statements.py`: the answer a model's output commits to, and the rule that found it
- `consistency.py`: several samples per item: majority vote, pass@k, mean accuracy per sample
- `metrics.py`: accuracy with Wilson 95% intervals; paired McNemar test for before vs after
- `overlap.py`: n-gram contamination check between the training data and the benchmark items
- `run.py`: the resumable eval (items.jsonl), `evaluate_for_train` for `medcot train`
- `report.py`: report.md / report.html with the before-vs-after chart
"""
