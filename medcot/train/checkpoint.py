"""Checkpoints: everything a run needs to continue exactly where it stopped, written atomically.

A checkpoint folder `checkpoints/step-000020/` holds the trainable (LoRA) weights, the optimizer and scheduler
state, the RNG states and `state.json`. It is written under a temporary name and renamed when
complete, so a crash mid-write never leaves a checkpoint that looks whole: `latest_checkpoint`
only considers folders with `state.json` in them.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch

from medcot.io import write_dir_atomic


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, engine, optimizer, scheduler, state: dict, world=None, keep: int = 2) -> Path:
    """Write checkpoint `step` and delete all but the newest `keep` ones.

    Weights and optimizer state are gathered whole and keyed by parameter name, so a checkpoint
    written by N processes (DDP or FSDP) resumes on any number of them. Gathering is collective:
    every rank calls this; rank 0 writes.
    """
    from safetensors.torch import save_file

    from medcot.train.distributed import (
        World,
        barrier,
        optimizer_state,
        trainable_state,
    )
    world = world or World()
    weights, optim = trainable_state(engine), optimizer_state(engine, optimizer)
    root = run_dir / "checkpoints"
    final = root / f"step-{step:06d}"
    if world.main:
        with write_dir_atomic(final) as tmp:
            save_file({k: v.contiguous() for k, v in weights.items()}, tmp / "trainable.safetensors")
            torch.save(optim, tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(_rng_state(), tmp / "rng.pt")
            (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
        for old in sorted(p for p in root.glob("step-*") if (p / "state.json").exists())[:-keep]:
            shutil.rmtree(old)
    barrier(world)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    done = sorted(p for p in (run_dir / "checkpoints").glob("step-*") if (p / "state.json").exists())
    return done[-1] if done else None


def load_checkpoint(path: Path, engine, optimizer, scheduler) -> dict:
    """Restore trainable weights, optimizer, scheduler and RNG from `path`; return its state.json."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
    )

    from medcot.train.distributed import load_optimizer_state, unwrap
    weights = load_file(path / "trainable.safetensors")
    set_model_state_dict(unwrap(engine), weights, options=StateDictOptions(full_state_dict=True, strict=False))
    load_optimizer_state(engine, optimizer, torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    _set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return json.loads((path / "state.json").read_text())
