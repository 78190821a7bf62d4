"""`medcot train --stage grpo | sft+grpo`: open (or resume) a run folder and run the stages.

    medcot train --config configs/demo-grpo-cpu.yaml                          # GRPO on the embedded model, CPU
    medcot train --config configs/r1-distill-llama-8b.yaml --stage sft+grpo \\
        grpo.source=../shared/data/dev_pools/normalized/medqa_usmle_4opt_dev.jsonl

`grpo`: GRPO from the base model into RUN/. `sft+grpo`: the chain-of-thought fine-tune into RUN/sft/ (train/sft.py,
its own report), then GRPO into RUN/ from the base with the SFT adapter merged in, so the KL reference is the
SFT model. `--resume RUN` skips a finished stage (its result.json) and continues the other from its newest
checkpoint. The GRPO items and their contamination check are verified before SFT starts: a run that would be
refused is refused at once, not after the fine-tune.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from medcot.config import Config
from medcot.errors import SetupError
from medcot.eval.run import evaluate_for_train
from medcot.io import write_atomic
from medcot.model.load import resolve_device
from medcot.rl.grpo import GrpoResult, grpo
from medcot.rl.items import check_contamination, load_items
from medcot.train import distributed
from medcot.train.run import open_run
from medcot.train.sft import sft

log = logging.getLogger(__name__)

STAGES = ("grpo", "sft+grpo")


def train_grpo(cfg: Config | None = None, resume: str | Path | None = None,
               on_log: Callable[[str], None] = log.info) -> GrpoResult:
    """Run (or resume) `train.stage` grpo or sft+grpo and write the run folder.

    Raises:
        SetupError: started under a launcher with several processes (GRPO runs in one).
        ContaminationError: the GRPO items overlap the eval benchmarks (grpo.exclude_overlap=false).
        TrainingDiverged / Interrupted: as `medcot train`.
    """
    cfg, run_dir = open_run(cfg, resume)
    world = distributed.init(cfg.train.distributed, resolve_device(cfg.model).type == "cuda")
    try:
        if world.size > 1:
            raise SetupError(f"train.stage={cfg.train.stage} runs in one process (rollouts and updates share one "
                             f"device); start it without torchrun / accelerate launch ({world.size} processes here)")
        start_from = None
        if cfg.train.stage == "sft+grpo":
            if not (run_dir / "sft" / "result.json").is_file():
                # Fail fast: a run GRPO would refuse must not spend the fine-tune first (GRPO checks again).
                check_contamination(load_items(cfg.grpo, cfg.train.seed).train, cfg)
            if not (run_dir / "config.yaml").is_file():  # what --resume reads, from the first stage on
                write_atomic(run_dir / "config.yaml", cfg.to_yaml())
            on_log("stage 1/2: chain-of-thought SFT into " + str(run_dir / "sft"))
            sft(cfg, run_dir / "sft", world, on_log, run_root=run_dir, evaluate=evaluate_for_train)
            start_from = run_dir / "sft" / "adapter"
            on_log("stage 2/2: GRPO from the base with the SFT adapter merged in")
        return grpo(cfg, run_dir, on_log, start_from=start_from)
    finally:
        distributed.shutdown(world)


def summary_lines(result: GrpoResult) -> list[str]:
    """What `medcot train` prints at the end of a GRPO run."""
    lines = [f"Run folder        {result.run_dir}", f"Steps             {result.steps}"]
    s, e = result.reward_start, result.reward_end
    if s:
        lines.append(f"Training reward   {s['reward']:.3f} -> {e['reward']:.3f}   (format {s['reward/format']:.2f} -> "
                     f"{e['reward/format']:.2f}, accuracy {s['accuracy']:.0%} -> {e['accuracy']:.0%}; first vs last "
                     "quarter of the steps)")
    b, a = result.heldout_before, result.heldout_after
    if b.get("n"):
        lines.append(f"Held-out items    accuracy {b['accuracy']:.0%} -> {a['accuracy']:.0%}, format {b['format']:.2f} -> "
                     f"{a['format']:.2f}   ({b['n']} items, greedy)")
    lines += [f"Wall time         {result.wall_s:.0f} s   ({result.tokens_per_s:,.1f} completion tokens/s)",
              f"Peak memory       {result.peak_mem_gib:.2f} GiB",
              f"Report            {result.run_dir / 'report.md'}",
              f"Try it            medcot ask \"<question>\" --adapter {result.run_dir}"]
    return lines
