"""`medcot train`: open (or resume) a run folder and run the stages `train.stage` names.

    medcot train --config configs/demo-cpu.yaml            # embedded model, CPU, minutes
    medcot train --config configs/r1-distill-llama-8b.yaml # the seed recipe on a CUDA GPU
    medcot train --resume runs/20261125-101500             # continue an interrupted run

`sft` is the chain-of-thought fine-tune (train/sft.py). With `pretrain+sft` the continued pre-training
stage (train/pretrain.py) runs first and SFT starts from its merged adapter; under a launcher, several
processes share each step (train/distributed.py).
"""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path
from typing import Callable

from medcot.config import Config, load_config
from medcot.errors import SetupError
from medcot.model.load import resolve_device
from medcot.train import distributed, report
from medcot.train.pretrain import pretrain
from medcot.train.sft import sft
from medcot.train.trainer import Evaluator, TrainResult

log = logging.getLogger(__name__)


def train(cfg: Config | None = None, resume: str | Path | None = None, on_log: Callable[[str], None] = log.info,
          evaluate: Evaluator | None = None) -> TrainResult:
    """Run (or resume) the stages `train.stage` names and write the run folder.

    Under a launcher with several processes every rank runs this; only rank 0 writes.

    Raises:
        TrainingDiverged: NaN/inf loss; the last good checkpoint stays on disk.
        Interrupted: SIGINT/SIGTERM; a checkpoint was saved first.
    """
    cfg, run_dir = _open_run(cfg, resume)
    world = distributed.init(cfg.train.distributed, resolve_device(cfg.model).type == "cuda")
    try:
        run_dir = distributed.broadcast(run_dir, world)  # the default name is rank 0's timestamp
        if not world.main:
            on_log = _silent
        if world.size > 1:
            on_log(f"distributed: {world.size} processes, {world.strategy}; each step's "
                   f"{distributed.rows_per_step(cfg.train, world)} rows are shared among them"
                   + ("" if cfg.train.scale_batch else " (train.scale_batch=true gives each process a full step)"))
        if cfg.train.stage == "sft":
            return sft(cfg, run_dir, world, on_log, evaluate=evaluate)
        pre = pretrain(cfg, run_dir / "pretrain", world, on_log)
        if cfg.train.stage == "pretrain":
            return pre
        result = sft(cfg, run_dir, world, on_log, start_from=run_dir / "pretrain" / "adapter", evaluate=evaluate)
        if cfg.pretrain.compare:
            on_log("comparison: the same SFT stage from the base model without pre-training")
            baseline = sft(cfg, run_dir / "without-pretrain", world, on_log, run_root=run_dir, evaluate=evaluate)
            if world.main:
                report.append_pretrain_comparison(run_dir, pre, result, baseline)
        return result
    finally:
        distributed.shutdown(world)


def _open_run(cfg: Config | None, resume: str | Path | None) -> tuple[Config, Path]:
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").is_file():
            raise SetupError(f"{run_dir} is not a medcot run folder (no config.yaml); cannot resume")
        return load_config(run_dir / "config.yaml"), run_dir  # a resumed run must not change recipe
    assert cfg is not None, "train() needs a config or a run folder to resume"
    name = cfg.train.run_name or datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(cfg.train.output_dir) / name
    if run_dir.exists() and any(run_dir.iterdir()):
        raise SetupError(f"{run_dir} already exists; pick another train.run_name or resume it with --resume {run_dir}")
    return cfg, run_dir


def _silent(_: str) -> None:
    """on_log for ranks other than 0: one process speaks for the run."""
