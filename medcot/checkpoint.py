"""Checkpoints: everything a run needs to continue exactly where it stopped, written atomically.

A checkpoint folder `checkpoints/step-000020/` holds the LoRA weights, the optimizer and scheduler
state, the RNG states and `state.json`. It is written under a temporary name and renamed when
complete, so a crash mid-write never leaves a checkpoint that looks whole: `latest_checkpoint`
only considers folders with `state.json` in them.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Iterator

import torch


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write a file under a temporary name and rename it, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


@contextlib.contextmanager
def write_dir_atomic(final: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; once the block completes, it replaces `final`.

    A crash inside the block leaves `final` as it was (and never a half-written folder under its name).
    """
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


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


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, state: dict, keep: int = 2) -> Path:
    """Write checkpoint `step` and delete all but the newest `keep` ones."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    root = run_dir / "checkpoints"
    final = root / f"step-{step:06d}"
    with write_dir_atomic(final) as tmp:
        lora = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(model).items()}
        save_file(lora, tmp / "adapter_model.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(_rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
    for old in sorted(p for p in root.glob("step-*") if (p / "state.json").exists())[:-keep]:
        shutil.rmtree(old)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    done = sorted(p for p in (run_dir / "checkpoints").glob("step-*") if (p / "state.json").exists())
    return done[-1] if done else None


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restore LoRA weights, optimizer, scheduler and RNG from `path`; return its state.json."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    _set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return json.loads((path / "state.json").read_text())
