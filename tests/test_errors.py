"""What a user sees when something is wrong or they press Ctrl-C: one line, a non-zero exit, no traceback,
and nothing half-written. Checks that can fail before the model loads fail before it loads."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medcot import errors
from medcot.cli import main

REPO = Path(__file__).resolve().parents[1]


def _no_model_load(monkeypatch):
    """Fail the test if a model would load: the error must come first."""
    import medcot.model.load

    monkeypatch.setattr(medcot.model.load, "load_base", lambda *a, **k: pytest.fail("the model loaded before the error"))


def test_every_user_error_is_a_medcot_error():
    for name in ("ConfigError", "DataError", "ColumnsError", "ModelSetupError", "SetupError", "InsecureBindError",
                 "TrainingDiverged", "Interrupted", "Overloaded", "Unavailable"):
        assert issubclass(getattr(errors, name), errors.MedcotError), name
    assert errors.Interrupted.exit_code == 130 and errors.ConfigError.exit_code == 2


@pytest.mark.parametrize("tracker", ["wandb", "tensorboard"])
def test_a_missing_tracker_package_fails_before_the_model_loads(tiny_train_argv, tmp_path, monkeypatch, capsys, tracker):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == tracker else real(name, *a))
    _no_model_load(monkeypatch)
    argv = tiny_train_argv(tmp_path, "run", f"train.report_to={tracker}")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"train.report_to={tracker} but {tracker} is not installed" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists(), "a run folder was left behind"


def test_an_unwritable_output_folder_fails_before_the_model_loads(tiny_train_argv, tmp_path, monkeypatch, capsys):
    if os.geteuid() == 0:  # root writes anywhere: use a path under a regular file instead
        blocker = tmp_path / "a-file"
        blocker.write_text("")
        out = blocker / "runs"
    else:
        out = tmp_path / "locked"
        out.mkdir(mode=0o500)
    _no_model_load(monkeypatch)
    assert main(tiny_train_argv(out, "run")) == 2
    err = capsys.readouterr().err
    assert "train.output_dir" in err and "writable" in err


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    t0 = time.monotonic()
    while not (path.is_file() and path.read_text().strip()):
        if proc.poll() is not None:
            pytest.fail(f"the command ended (rc {proc.returncode}) before {path} had content:\n{proc.stderr.read()}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            pytest.fail(f"{path} never got content")
        time.sleep(0.2)


def _default_sigint() -> None:
    # A shell starts background jobs (`cmd &`, nohup) with SIGINT ignored, children inherit that, and Python then
    # installs no KeyboardInterrupt handler: the process a user would Ctrl-C must get the default disposition.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
def test_ctrl_c_during_eval_says_what_was_kept_and_a_rerun_resumes(tiny_model_dir, tmp_path):
    """A real `medcot eval` process gets SIGINT after its first answered batch: one line, exit 130, no
    traceback; the same command then resumes from the kept items instead of starting over."""
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "medcot", "eval", f"model.name_or_path={tiny_model_dir}", "model.device=cpu",
           "model.dtype=fp32", f"eval.output_dir={out}", "eval.benchmarks=[medqa]", "eval.limit=25",
           "eval.batch_size=1", "eval.thinking_budget=null", "generate.max_new_tokens=200"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                            preexec_fn=_default_sigint)
    _wait_for(out / "items.jsonl", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    kept = len((out / "items.jsonl").read_text().splitlines())
    assert f"interrupted; {kept} answered items are kept in" in err and "run the same command again" in err
    assert 0 < kept < 25
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert len((out / "items.jsonl").read_text().splitlines()) == 25  # the kept items were not answered twice


@pytest.mark.slow
def test_ctrl_c_during_ask_prints_one_line(tiny_model_dir, tmp_path):
    cmd = [sys.executable, "-m", "medcot", "ask", "Why does a patient with pneumonia have fever?",
           f"model.name_or_path={tiny_model_dir}", "model.device=cpu", "model.dtype=fp32",
           "generate.max_new_tokens=100000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                            preexec_fn=_default_sigint)
    assert proc.stdout.readline().startswith("--- reasoning ---")  # generation has started
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "Traceback" not in err and "medcot ask: interrupted" in err
