"""Run integrity: a run interrupted any number of times, in real `python -m medcot train` processes, ends
exactly where the same run without interruptions ends: same adapter, optimizer state, scheduler position,
RNG state and per-step losses, and exactly `train.max_steps` optimizer updates; its wall time is counted once.

Interruptions are SIGTERM timed on the processes' own log lines (one during the "before" phase, others
mid-training; under torchrun too) and a kill -9 between a checkpoint's temporary write and its rename. The
tiny random Llama keeps each process to seconds.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
# Enough steps that a SIGTERM sent on a step's log line lands well before the end; a reasoning budget that
# keeps the "before" phase busy for a moment after it announces itself.
STEPS = 16
COMMON = [f"train.max_steps={STEPS}", "train.save_steps=4", "train.learning_rate=2.0e-3",
          "train.sample_thinking_budget=48"]

# `python -m medcot` with the rename that completes one checkpoint held back, so the test can kill -9 the
# process after the checkpoint's temporary folder is fully written and before it is renamed into place.
PAUSE_BEFORE_RENAME = '''
import os, runpy, sys, time
target = sys.argv.pop(1)
real_replace = os.replace
def replace(src, dst, *args, **kwargs):
    if os.path.basename(dst) == target and ".tmp-" in os.path.basename(src):
        print(f"paused before renaming {src}", file=sys.stderr, flush=True)
        time.sleep(600)
    return real_replace(src, dst, *args, **kwargs)
os.replace = replace
runpy.run_module("medcot", run_name="__main__", alter_sys=True)
'''


class Session:
    """One training process (or torchrun and its workers), its output read line by line as it comes."""

    def __init__(self, cmd: list[str], cwd: Path, torchrun: bool = False):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
        for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(k, None)
        self.torchrun = torchrun
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        self.lines: list[tuple[float, str]] = []  # (arrival time, line)
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._queue.put((time.monotonic(), line.rstrip("\n")))
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float = 300) -> str:
        """Block until a line matches `pattern` (a regex); fail if the process ends or time runs out first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                item = self._queue.get(timeout=1)
            except queue.Empty:
                continue
            if item is None:
                self._queue.put(None)
                pytest.fail(f"ended before printing {pattern!r}:\n{self.output[-4000:]}")
            self.lines.append(item)
            if re.search(pattern, item[1]):
                return item[1]
        self.proc.kill()
        pytest.fail(f"no line matching {pattern!r} within {timeout} s:\n{self.output[-4000:]}")

    def finish(self, timeout: float = 300) -> int:
        rc = self.proc.wait(timeout=timeout)
        self.ended = time.monotonic()
        while (item := self._queue.get(timeout=30)) is not None:
            self.lines.append(item)
        return rc

    def arrival(self, pattern: str) -> float:
        return next(t for t, line in self.lines if re.search(pattern, line))

    @property
    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)


def _medcot(argv: list[str], cwd: Path, torchrun: bool = False) -> Session:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"] if torchrun \
        else [sys.executable]
    return Session([*launcher, "-m", "medcot", *argv], cwd, torchrun)


def _interrupt(session: Session, at: str) -> int:
    """SIGTERM once a line matches `at`; the process checkpoints its current step and stops. Returns that step."""
    session.wait_for(at)
    session.proc.send_signal(signal.SIGTERM)
    rc = session.finish()
    # No traceback through medcot's code (torchrun prints one of its own for the signal it got).
    frames = [line for line in session.output.splitlines() if line.lstrip().startswith('File "') and "/medcot/" in line]
    assert not frames, session.output[-4000:]
    saved = re.search(r"Interrupted by SIGTERM; checkpoint saved at step (\d+)\. Resume with: medcot train --resume",
                      session.output)
    assert saved, session.output[-4000:]
    assert rc == 130 or (session.torchrun and rc != 0)  # torchrun reports its workers' failure its own way
    return int(saved.group(1))


def _resumed_at(session: Session, run: Path, step: int) -> None:
    assert f"resumed from {run / 'checkpoints' / f'step-{step:06d}'} at step {step}/{STEPS}" in session.output


def _assert_checkpoints_hold_their_step(run: Path) -> None:
    for ckpt in (run / "checkpoints").glob("step-*"):
        step = int(ckpt.name.removeprefix("step-"))
        assert json.loads((ckpt / "state.json").read_text())["step"] == step, ckpt
        assert torch.load(ckpt / "scheduler.pt", weights_only=False)["last_epoch"] == step, ckpt


def _steps_logged(session: Session) -> list[int]:
    return [int(m.group(1)) for _, line in session.lines if (m := re.match(rf"step (\d+)/{STEPS} \| loss", line))]


def _same(got, want, where: str) -> None:
    """Bitwise equality through nested dicts, lists and tensors (optimizer, scheduler and RNG states)."""
    if torch.is_tensor(want):
        assert torch.equal(got, want), f"{where} differs"
    elif isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for k in want:
            _same(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _same(g, w, f"{where}[{i}]")
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def _assert_same_run(run: Path, straight: Path) -> None:
    """The interrupted and resumed run ends exactly as the uninterrupted one."""
    adapter = "adapter/adapter_model.safetensors"
    got, want = load_file(run / adapter), load_file(straight / adapter)
    _same(got, want, "adapter")

    last = f"checkpoints/step-{STEPS:06d}"
    for name in ["optimizer.pt", "scheduler.pt", "rng.pt"]:
        _same(*(torch.load(r / last / name, weights_only=False) for r in (run, straight)), name)
    _same(*(load_file(r / last / "trainable.safetensors") for r in (run, straight)), "trainable")
    _assert_checkpoints_hold_their_step(run)
    # Exactly max_steps optimizer updates led to these weights (AdamW counts them per parameter), and the
    # learning-rate schedule stands at its end.
    optim = torch.load(run / last / "optimizer.pt", weights_only=False)
    assert {float(s["step"]) for s in optim["state"].values()} == {float(STEPS)}
    assert torch.load(run / last / "scheduler.pt", weights_only=False)["last_epoch"] == STEPS
    # Checkpoints hold what trains and nothing frozen (the tiny Llama ties lm_head to the embeddings).
    lora = set(got)
    assert {k.replace(".default", "") for k in load_file(run / last / "trainable.safetensors")} == lora
    assert {k.replace(".default", "") for k in optim["state"]} == lora

    state, state_want = (json.loads((r / last / "state.json").read_text()) for r in (run, straight))
    assert state["step"] == STEPS and state["tokens_seen"] == state_want["tokens_seen"]
    assert state["val_loss_before"] == state_want["val_loss_before"]
    assert state["answers_before"] == state_want["answers_before"]

    metrics, metrics_want = ([json.loads(line) for line in (r / "metrics.jsonl").read_text().splitlines()]
                             for r in (run, straight))
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))  # each step once
    for key in ["loss", "lr", "grad_norm"]:
        assert [m[key] for m in metrics] == [m[key] for m in metrics_want], key

    result, result_want = (json.loads((r / "result.json").read_text()) for r in (run, straight))
    for key in ["steps", "val_loss_before", "val_loss_after", "answers_before", "answers_after"]:
        assert result[key] == result_want[key], key


def _assert_wall_time(run: Path, sessions: list[Session]) -> None:
    """Counted once: at most the time the sessions spent on the stage (from their "run folder" line to their
    exit), at least the optimizer steps themselves; the same in result, manifest, report and summary."""
    wall = json.loads((run / "result.json").read_text())["wall_s"]
    window = sum(s.ended - s.arrival(r"^run folder: ") for s in sessions)
    steps_time = sum(json.loads(l)["step_time_s"] for l in (run / "metrics.jsonl").read_text().splitlines())
    assert steps_time <= wall <= window + 0.1 * len(sessions), (steps_time, wall, window)
    assert json.loads((run / "manifest.json").read_text())["wall_time_s"] == round(wall, 1)
    assert f"wall time {wall:.0f} s" in (run / "report.md").read_text()
    assert f"Wall time         {wall:.0f} s" in sessions[-1].output


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_train_argv) -> Path:
    """The uninterrupted run every interrupted one must reproduce, in the same kind of process."""
    out = tmp_path_factory.mktemp("straight")
    session = _medcot(tiny_train_argv(out, "straight", *COMMON), out)
    assert session.finish() == 0, session.output[-4000:]
    assert _steps_logged(session) == list(range(1, STEPS + 1))
    _assert_wall_time(out / "straight", [session])
    return out / "straight"


@pytest.mark.slow
def test_two_sigterms_at_different_steps_then_two_resumes_equal_one_run(tmp_path, tiny_train_argv, straight):
    run = tmp_path / "twice"
    first = _medcot(tiny_train_argv(tmp_path, "twice", *COMMON), tmp_path)
    k1 = _interrupt(first, at=rf"^step 2/{STEPS} ")
    second = _medcot(["train", "--resume", str(run)], tmp_path)
    k2 = _interrupt(second, at=rf"^step {k1 + 2}/{STEPS} ")
    assert 2 <= k1 < k2 < STEPS
    _resumed_at(second, run, k1)
    _assert_checkpoints_hold_their_step(run)  # step-k2 and any before it were written after a resume
    third = _medcot(["train", "--resume", str(run)], tmp_path)
    assert third.finish() == 0, third.output[-4000:]
    _resumed_at(third, run, k2)

    # SIGTERM checkpoints the step it interrupts, so nothing is redone: the three processes together ran
    # each of the max_steps optimizer steps exactly once.
    assert _steps_logged(first) + _steps_logged(second) + _steps_logged(third) == list(range(1, STEPS + 1))
    _assert_same_run(run, straight)
    _assert_wall_time(run, [first, second, third])


@pytest.mark.slow
def test_three_interruptions_before_phase_mid_run_and_mid_checkpoint_write(tmp_path, tiny_train_argv, straight):
    run = tmp_path / "thrice"

    # 1. SIGTERM in the "before" phase. The run folder exists from its first log line; the phase says what
    #    it is doing; the process stops at once and keeps the folder for --resume.
    first = _medcot(tiny_train_argv(tmp_path, "thrice", *COMMON), tmp_path)
    first.wait_for(r"^run folder: ")
    assert (run / "config.yaml").is_file()
    first.wait_for(r"^before: validation loss on 2 held-out rows, then 1 sample answer")
    first.proc.send_signal(signal.SIGTERM)
    assert first.finish() == 130
    assert f"Interrupted by SIGTERM; the run folder keeps its config and every checkpoint saved so far. " \
           f"Resume with: medcot train --resume {run}" in first.output
    assert "Traceback" not in first.output and not (run / "checkpoints").exists()

    # 2. Resumed from no checkpoint (step 0), then SIGTERM mid-training.
    second = _medcot(["train", "--resume", str(run)], tmp_path)
    k1 = _interrupt(second, at=rf"^step 2/{STEPS} ")
    assert "(no checkpoint yet: it stopped before its first step; starting at step 0)" in second.output
    assert _steps_logged(second)[0] == 1

    # 3. Resumed, then kill -9 while the next checkpoint is written in full but not yet renamed into place.
    target = f"step-{(k1 // 4 + 1) * 4:06d}"  # the next train.save_steps=4 checkpoint
    script = tmp_path / "pause_before_rename.py"
    script.write_text(PAUSE_BEFORE_RENAME)
    third = Session([sys.executable, str(script), target, "train", "--resume", str(run)], tmp_path)
    paused = third.wait_for(r"^paused before renaming ")
    tmp = Path(paused.removeprefix("paused before renaming "))
    assert (tmp / "state.json").is_file() and not (run / "checkpoints" / target).exists()
    third.proc.kill()
    assert third.finish() == -signal.SIGKILL
    _resumed_at(third, run, k1)

    # 4. The previous checkpoint is the newest usable one; resuming from it redoes the lost steps and
    #    finishes; the dead write's temporary folder is cleared away.
    fourth = _medcot(["train", "--resume", str(run)], tmp_path)
    assert fourth.finish() == 0, fourth.output[-4000:]
    _resumed_at(fourth, run, k1)
    assert not tmp.exists()
    assert _steps_logged(fourth) == list(range(k1 + 1, STEPS + 1))
    _assert_same_run(run, straight)
    _assert_wall_time(run, [first, second, third, fourth])


@pytest.mark.slow
def test_ddp_run_interrupted_twice_equals_one_ddp_run(tmp_path, tiny_train_argv):
    """2 processes over gloo under torchrun: SIGTERM to torchrun (as a scheduler sends it), which passes it
    on to its workers; they stop at the same step, rank 0 writes the checkpoint, both resume."""
    ddp = [*COMMON, "train.distributed=ddp", "train.gradient_accumulation_steps=2", "train.per_device_batch_size=1"]
    straight = _medcot(tiny_train_argv(tmp_path, "straight", *ddp), tmp_path, torchrun=True)
    assert straight.finish() == 0, straight.output[-4000:]
    run = tmp_path / "ddp"
    first = _medcot(tiny_train_argv(tmp_path, "ddp", *ddp), tmp_path, torchrun=True)
    k1 = _interrupt(first, at=rf"^step 2/{STEPS} ")
    second = _medcot(["train", "--resume", str(run)], tmp_path, torchrun=True)
    k2 = _interrupt(second, at=rf"^step {k1 + 2}/{STEPS} ")
    assert 2 <= k1 < k2 < STEPS
    third = _medcot(["train", "--resume", str(run)], tmp_path, torchrun=True)
    assert third.finish() == 0, third.output[-4000:]
    for session, step in [(second, k1), (third, k2)]:
        _resumed_at(session, run, step)
    assert _steps_logged(first) + _steps_logged(second) + _steps_logged(third) == list(range(1, STEPS + 1))
    _assert_same_run(run, tmp_path / "straight")
    assert json.loads((run / "manifest.json").read_text())["processes"] == 2
