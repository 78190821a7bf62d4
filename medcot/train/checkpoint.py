"""Checkpoints: everything a run needs to continue exactly where it stopped, written atomically.

A checkpoint folder `checkpoints/step-000020/` holds the trainable (LoRA) weights only, the optimizer and scheduler
state, the RNG states and `state.json` (a `FitState`). It is written under a temporary name and renamed when
complete, so a crash mid-write never leaves a checkpoint that looks whole: `latest_checkpoint`
only considers `step-*` folders with `state.json` in them, and `discard_unfinished` removes what a killed
write left behind.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medcot.errors import SetupError
from medcot.io import write_dir_atomic


@dataclass
class FitState:
    """How far a stage got: with the tensors, all a checkpoint needs to continue where it stopped.

    `step` is the one count of optimizer updates done: the loop starts from it, a checkpoint is named
    after it and stores it, and nothing else keeps a copy that could disagree.
    """

    step: int = 0
    tokens_seen: int = 0
    fit_time: float = 0.0  # seconds spent in optimizer steps (for tokens/s)
    wall_s: float = 0.0  # the stage's wall time up to this checkpoint, over every session that led to it
    before: dict = field(default_factory=dict)  # the "before" phase's results: validation loss, answers, eval

    _COUNTERS = ("step", "tokens_seen", "fit_time", "wall_s")

    def to_json(self) -> str:
        # Flat, as state.json has always been: a checkpoint from an earlier medcot still resumes.
        return json.dumps({**{k: getattr(self, k) for k in self._COUNTERS}, **self.before}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "FitState":
        data = json.loads(text)
        counters = {k: data.pop(k) for k in cls._COUNTERS if k in data}
        return cls(**counters, before=data)


def seed_rngs(seed: int) -> None:
    """Seed every RNG a checkpoint saves, so a run's random state is a function of its seed, resumed or not."""
    random.seed(seed)
    torch.manual_seed(seed)  # CUDA's too


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


def save_checkpoint(stage_dir: Path, engine, optimizer, scheduler, state: FitState, world=None, keep: int = 2) -> Path:
    """Write checkpoint `state.step` and delete all but the newest `keep` ones.

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
    root = stage_dir / "checkpoints"
    final = root / f"step-{state.step:06d}"
    if world.main:
        with write_dir_atomic(final) as tmp:
            save_file({k: v.contiguous() for k, v in weights.items()}, tmp / "trainable.safetensors")
            torch.save(optim, tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(_rng_state(), tmp / "rng.pt")
            (tmp / "state.json").write_text(state.to_json())
        for old in sorted(p for p in root.glob("step-*") if (p / "state.json").exists())[:-keep]:
            trash = old.with_name(f".{old.name}.old")
            os.replace(old, trash)  # hidden at once: a kill mid-delete leaves no half checkpoint under its name
            shutil.rmtree(trash)
    barrier(world)
    return final


def latest_checkpoint(stage_dir: Path) -> Path | None:
    done = sorted(p for p in (stage_dir / "checkpoints").glob("step-*") if (p / "state.json").exists())
    return done[-1] if done else None


def discard_unfinished(stage_dir: Path) -> None:
    """Remove what a kill -9 cut short (rank 0, before training): the temporary folder of a checkpoint write,
    or an old checkpoint half deleted. Never mistaken for checkpoints (their names start with a dot), but each
    may be as large as one."""
    for tmp in (stage_dir / "checkpoints").glob(".step-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def load_checkpoint(path: Path, engine, optimizer, scheduler) -> FitState:
    """Restore trainable weights, optimizer, scheduler and RNG from `path`; return its state."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
    )

    from medcot.train.distributed import load_optimizer_state, unwrap
    state = FitState.from_json((path / "state.json").read_text())
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    if scheduler.last_epoch != state.step:
        # medcot before 2026-12 stored a stale step in checkpoints written after a resume; continuing from
        # one would silently repeat steps, so it is refused rather than guessed at.
        raise SetupError(f"{path}: state.json says step {state.step} but its learning-rate schedule has taken "
                         f"{scheduler.last_epoch} steps; delete this checkpoint to resume from the one before it")
    weights = load_file(path / "trainable.safetensors")
    set_model_state_dict(unwrap(engine), weights, options=StateDictOptions(full_state_dict=True, strict=False))
    load_optimizer_state(engine, optimizer, torch.load(path / "optimizer.pt", weights_only=False))
    _set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return state
