"""RL: reinforcement learning with verifiable rewards (GRPO), the stage after SFT (docs/grpo.md).

It sits above eval because its reward is eval's own answer extractor and its data must pass eval's
contamination check; it reuses train's trainer pieces (LoRA, optimizer, checkpoints, tracking).

    run.py        `medcot train --stage grpo | sft+grpo`: the run folder, SFT first where asked
    grpo.py       the stage: rollouts → rewards → advantages → clipped update with KL; resume, metrics
    items.py      the questions with known answers, and the contamination check before training
    rewards.py    correctness (eval's extractor), format, length penalty: small pure functions
    algorithm.py  group-normalised advantages, token log-probabilities, the loss, loss normalisation
    rollout.py    completions through medcot's generation functions; the update's batches
    report.py     manifest, grpo.png, report.md
"""
