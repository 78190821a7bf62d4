"""Several processes: real 2-process runs over gloo on the CPU (torchrun), DDP and FSDP, against one process.

One optimizer step trains on the same rows whatever the process count, so a 2-process run must
reproduce the 1-process run (same losses, same adapter), write its run folder once, and its
checkpoints must resume on a different number of processes.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medcot.cli import main
from medcot.config import load_config
from medcot.data.prompts import Encoded
from medcot.errors import ConfigError
from medcot.train.distributed import deal_rows, equal_groups

pytestmark = pytest.mark.slow  # several real processes per test (torchrun, gloo)

REPO = Path(__file__).resolve().parents[1]
STEPS = ["train.max_steps=4", "train.gradient_accumulation_steps=2", "train.save_steps=2"]


def _torchrun(argv: list[str], tmp_path: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           "-m", "medcot", *argv]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_train_argv) -> Path:
    out = tmp_path_factory.mktemp("one")
    assert main(tiny_train_argv(out, "one", *STEPS)) == 0
    return out / "one"


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_reproduce_one(strategy, tmp_path, tiny_train_argv, one_process):
    argv = tiny_train_argv(tmp_path, "two", *STEPS, f"train.distributed={strategy}")
    out = _torchrun(argv, tmp_path)
    run = tmp_path / "two"

    assert _losses(run) == pytest.approx(_losses(one_process), abs=1e-4)  # each step logged once, by rank 0
    ref, got = _adapter(one_process), _adapter(run)
    assert ref.keys() == got.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=1e-4)
    assert any(v.abs().max() > 0 for k, v in got.items() if "lora_B" in k)  # it trained
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["processes"] == 2
    # Rank 0 alone speaks: one summary on stdout, the distributed line once.
    assert out.stdout.count("Run folder") == 1
    assert (out.stdout + out.stderr).count(f"distributed: 2 processes, {strategy}") == 1
    assert not list(tmp_path.glob("*.tmp-*")) and not list(run.glob(".*tmp-*"))


def test_checkpoint_of_two_fsdp_processes_resumes_on_one(tmp_path, tiny_train_argv, one_process):
    """A 2-process FSDP run 'crashes' after its step-2 checkpoint; one process finishes it exactly."""
    argv = tiny_train_argv(tmp_path, "moved", *STEPS, "train.distributed=fsdp")
    _torchrun(argv, tmp_path)
    run = tmp_path / "moved"
    shutil.rmtree(run / "checkpoints" / "step-000004")
    shutil.rmtree(run / "adapter")
    (run / "result.json").unlink()

    assert main(["train", "--resume", str(run)]) == 0
    assert _losses(run) == pytest.approx(_losses(one_process), abs=1e-4)
    ref, got = _adapter(one_process), _adapter(run)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=1e-4)


def test_checkpoint_of_one_process_resumes_on_two_ddp(tmp_path, tiny_train_argv, one_process):
    run = tmp_path / "grown"
    shutil.copytree(one_process, run)
    shutil.rmtree(run / "checkpoints" / "step-000004")
    shutil.rmtree(run / "adapter")
    (run / "result.json").unlink()
    cfg = load_config(run / "config.yaml", ["train.distributed=ddp"])
    (run / "config.yaml").write_text(cfg.to_yaml())

    _torchrun(["train", "--resume", str(run)], tmp_path)
    assert _losses(run) == pytest.approx(_losses(one_process), abs=1e-4)
    ref, got = _adapter(one_process), _adapter(run)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=1e-4)


# -- how a step is shared -------------------------------------------------------------------------


def _rows(lengths: list[int]) -> list[Encoded]:
    return [Encoded(input_ids=list(range(n)), labels=list(range(n)), prompt_len=0) for n in lengths]


def test_deal_rows_deals_every_row_once_in_equal_counts_with_balanced_tokens():
    rows = _rows([900, 100, 850, 120, 800, 150, 700, 90])
    hands = deal_rows(rows, 2)
    assert sorted(id(r) for h in hands for r in h) == sorted(id(r) for r in rows)
    assert [len(h) for h in hands] == [4, 4]
    tokens = [sum(len(r.input_ids) for r in h) for h in hands]
    assert abs(tokens[0] - tokens[1]) <= 200  # in file order halves would differ by 1,550
    # Order inside a hand follows the step's order (a pure function of the step: resumable).
    assert all([rows.index(r) for r in h] == sorted(rows.index(r) for r in h) for h in hands)


def test_equal_groups_gives_every_rank_as_many_micro_batches():
    rows = _rows([10, 20, 30, 40])
    groups = equal_groups([rows], all_counts=[3, 1])
    assert len(groups) == 3 and [r for g in groups for r in g] == rows
    with pytest.raises(RuntimeError, match="evenly"):
        equal_groups([rows[:1]], all_counts=[2, 1])


def test_rows_per_step_must_divide_among_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps.*3 processes.*= 8 rows"):
        load_config(None, ["train.per_device_batch_size=2", "train.gradient_accumulation_steps=4"])
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert load_config(None, ["train.per_device_batch_size=2", "train.gradient_accumulation_steps=4"])
    with pytest.raises(ConfigError, match=r"train.optimizer: adamw_8bit cannot update FSDP-sharded"):
        load_config(None, ["train.distributed=fsdp", "train.optimizer=adamw_8bit"])
    monkeypatch.setenv("WORLD_SIZE", "3")  # every process trains its own full step: nothing to divide
    assert load_config(None, ["train.gradient_accumulation_steps=4", "train.scale_batch=true"]).train.scale_batch


def test_accelerate_launch_runs_it_too(tmp_path, tiny_train_argv, one_process):
    """`accelerate launch` sets the same torch.distributed variables as torchrun: same run, same result."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "medcot", *tiny_train_argv(tmp_path, "acc", *STEPS)]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    assert "distributed: 2 processes, ddp" in out.stdout + out.stderr
    assert _losses(tmp_path / "acc") == pytest.approx(_losses(one_process), abs=1e-4)


def test_scale_batch_gives_every_process_a_full_step(tmp_path, tiny_train_argv):
    """train.scale_batch=true: 2 processes x (2 rows x 2 accumulation) = 8 rows per step, as a 1-process run
    with 4 accumulation steps trains (same rows, same order, same loss normalisation)."""
    steps = ["train.max_steps=2", "train.save_steps=0"]
    assert main(tiny_train_argv(tmp_path, "one8", *steps, "train.gradient_accumulation_steps=4")) == 0
    out = _torchrun(tiny_train_argv(tmp_path, "two8", *steps, "train.gradient_accumulation_steps=2",
                                    "train.scale_batch=true"), tmp_path)
    assert "each step's 8 rows are shared" in out.stdout + out.stderr
    assert _losses(tmp_path / "two8") == pytest.approx(_losses(tmp_path / "one8"), abs=1e-4)
    ref, got = _adapter(tmp_path / "one8"), _adapter(tmp_path / "two8")
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=1e-4)
