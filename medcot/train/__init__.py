"""Train: the stages that change weights, on one loop.

    run.py          `medcot train`: open or resume a run folder, run the stages train.stage names
    sft.py          the chain-of-thought fine-tune
    pretrain.py     continued pre-training on raw text
    trainer.py      the optimizer loop: steps, checkpoints, resume, NaN guard, Ctrl-C
    fast.py         the CUDA fast path: fused kernels, varlen attention, selective recompute
    distributed.py  several processes: DDP / FSDP2, step sharing
    checkpoint.py   resumable checkpoints (any process count)
    tracking.py     metrics.jsonl + W&B / TensorBoard
    report.py       manifest, loss plot, report.md
"""
