"""`medcot train`: open (or resume) a run folder and run the stages `train.stage` names.

    medcot train --config configs/demo-cpu.yaml            # embedded model, CPU, minutes
    medcot train --config configs/r1-distill-llama-8b.yaml # the seed recipe on a CUDA GPU
    medcot train --resume runs/20261125-101500             # continue an interrupted run

`sft` is the chain-of-thought fine-tune (train/sft.py). With `pretrain+sft` the continued pre-training
stage (train/pretrain.py) runs first and SFT starts from its merged adapter; under a launcher, several
processes share each step (train/distributed.py).

The run folder and its config.yaml exist from the first second, before data and model load. A setup that
fails (bad data, a model that will not load, NaN at the first step) before any checkpoint was written
removes the folder it made, so the same command can simply be run again; a folder that outlived its
process some other way (kill -9, power loss) resumes with `--resume`, from step 0 if it has no checkpoint.
"""

from __future__ import annotations

import logging
import shutil
from datetime import datetime
from pathlib import Path
from typing import Callable

from medcot.config import Config, load_config
from medcot.errors import Interrupted, SetupError
from medcot.io import write_atomic
from medcot.model.load import resolve_device
from medcot.train import distributed, report
from medcot.train.pretrain import pretrain
from medcot.train.sft import sft
from medcot.train.trainer import Evaluator, TrainResult, interrupt_on_signal

log = logging.getLogger(__name__)


def train(cfg: Config | None = None, resume: str | Path | None = None, on_log: Callable[[str], None] = log.info,
          evaluate: Evaluator | None = None) -> TrainResult:
    """Run (or resume) the stages `train.stage` names and write the run folder.

    Under a launcher with several processes every rank runs this; only rank 0 writes.

    Raises:
        TrainingDiverged: NaN/inf loss; the last good checkpoint stays on disk.
        Interrupted: SIGINT/SIGTERM: during a step, after it is checkpointed; elsewhere at once. The folder
            stays for --resume.
    """
    cfg, run_dir = open_run(cfg, resume)
    world = distributed.init(cfg.train.distributed, resolve_device(cfg.model).type == "cuda")
    try:
        run_dir = distributed.broadcast(run_dir, world)  # the default name is rank 0's timestamp
        if not world.main:
            on_log = _silent
        if resume is None and world.main:
            write_atomic(run_dir / "config.yaml", cfg.to_yaml())
        restart = resume is not None and not _has_checkpoint(run_dir)
        on_log(f"run folder: {run_dir}" + (" (no checkpoint yet: it stopped before its first step; starting at "
                                           "step 0)" if restart else ""))
        if world.size > 1:
            on_log(f"distributed: {world.size} processes, {world.strategy}; each step's "
                   f"{distributed.rows_per_step(cfg.train, world)} rows are shared among them"
                   + ("" if cfg.train.scale_batch else " (train.scale_batch=true gives each process a full step)"))
        with interrupt_on_signal(lambda sig: f"Interrupted by {sig}; the run folder keeps its config and every "
                                             f"checkpoint saved so far. Resume with: medcot train --resume {run_dir}"):
            return _stages(cfg, run_dir, world, on_log, evaluate)
    except Interrupted:
        raise  # the folder stays for --resume
    except Exception:
        if resume is None and world.main and not _has_checkpoint(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)  # nothing trained: the same command can run again
        raise
    finally:
        distributed.shutdown(world)


def _stages(cfg: Config, run_dir: Path, world: distributed.World, on_log, evaluate: Evaluator | None) -> TrainResult:
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


def open_run(cfg: Config | None, resume: str | Path | None) -> tuple[Config, Path]:
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


def _has_checkpoint(run_dir: Path) -> bool:
    """Whether any stage of the run saved a step (or finished): then the folder holds work worth keeping."""
    return any(run_dir.glob("**/checkpoints/step-*/state.json")) or any(run_dir.glob("**/result.json"))


def _silent(_: str) -> None:
    """on_log for ranks other than 0: one process speaks for the run."""
