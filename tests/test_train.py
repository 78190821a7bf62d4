"""`medcot train` end to end: the run folder and its report, LoRA vs base weights, adapter reload,
checkpoints that hold only what trains, divergence, W&B offline files (debug logs included) in the run
folder, no secrets anywhere, and `medcot ask` saying why it stopped. Resuming after interruptions:
tests/test_resume.py.

The main run uses the real embedded model (SmolLM2-135M) for 2 short steps; the rest use the tiny random
Llama so they take seconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import medcot.train.trainer
from medcot.cli import main
from medcot.config import load_config

REPO = Path(__file__).resolve().parents[1]

REAL_OVERRIDES = [
    "model.device=cpu", "model.dtype=fp32",
    "data.val_size=2", "train.sample_questions=1",
    "train.max_seq_length=256", "data.overlong=truncate",  # demo rows are ~800 tokens: keep the steps short
    "train.per_device_batch_size=1", "train.gradient_accumulation_steps=1",
    "train.max_steps=2", "train.warmup_steps=0", "train.learning_rate=1.0e-3", "train.save_steps=1",
    "train.report_to=none", "generate.max_new_tokens=8",
    "train.sample_thinking_budget=16", "train.sample_answer_tokens=16",
]


@contextlib.contextmanager
def _capture_model(mp: pytest.MonkeyPatch):
    """Keep a handle on the model `train` builds: its parameters right after LoRA is attached, and the
    trained model object when the adapter is saved."""
    seen: dict = {}
    attach, save = medcot.train.trainer.attach_lora, medcot.train.trainer.Trainer.save_adapter

    def attach_spy(*args, **kwargs):
        model = attach(*args, **kwargs)
        seen["initial"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return model

    def save_spy(trainer, *args, **kwargs):
        seen["model"] = trainer.model
        return save(trainer, *args, **kwargs)

    mp.setattr(medcot.train.trainer, "attach_lora", attach_spy)
    mp.setattr(medcot.train.trainer.Trainer, "save_adapter", save_spy)
    yield seen


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, embedded_dir):
    """One short `medcot train` on the real embedded model and the embedded demo data."""
    out = tmp_path_factory.mktemp("real-runs")
    logger, handler = logging.getLogger("medcot"), _Lines()
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    stdout = io.StringIO()
    argv = ["train", f"train.output_dir={out}", "train.run_name=real", *REAL_OVERRIDES]
    started = time.time()
    try:
        with pytest.MonkeyPatch.context() as mp, _capture_model(mp) as seen, contextlib.redirect_stdout(stdout):
            rc = main(argv)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert rc == 0
    return {"dir": out / "real", "argv": argv, "stdout": stdout.getvalue(), "log": handler.lines,
            "elapsed": time.time() - started, **seen}


# -- the real embedded model ----------------------------------------------------------------------


@pytest.mark.slow
def test_run_folder_explains_itself(real_run):
    run = real_run["dir"]
    for name in ["adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/tokenizer.json",
                 "config.yaml", "manifest.json", "metrics.jsonl", "loss.png", "report.md"]:
        assert (run / name).is_file(), f"{name} missing from the run folder"
    assert not list(run.glob(".*tmp*")), "temporary files left behind"

    assert load_config(run / "config.yaml") == load_config(None, real_run["argv"][1:])

    metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert math.isfinite(m["loss"]) and m["loss"] > 0 and math.isfinite(m["grad_norm"]) and m["tokens_per_s"] > 0
    assert metrics[0]["lr"] > metrics[1]["lr"] >= 0  # linear decay, no warm-up

    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    manifest = json.loads((run / "manifest.json").read_text())
    for key in ["versions", "git_commit", "device", "wall_time_s", "tokens_per_s", "peak_memory_gib", "model", "data"]:
        assert key in manifest, key
    assert {"python", "torch", "transformers", "peft"} <= set(manifest["versions"])
    data = Path(manifest["data"]["source"])
    assert data.name == "medical_o1_demo.jsonl"
    assert manifest["data"]["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert manifest["data"]["token_lengths"]["action"] == "truncated"
    assert manifest["data"]["token_lengths"]["over_limit"] > 0  # the 256-token limit did cut rows
    assert manifest["model"]["device"] == "cpu" and manifest["model"]["dtype"] == "float32"
    assert manifest["steps"] == 2 and manifest["wall_time_s"] > 0 and manifest["tokens_per_s"] > 0
    before, after = manifest["val_loss_before"], manifest["val_loss_after"]
    assert math.isfinite(before) and math.isfinite(after) and before != after

    report = (run / "report.md").read_text()
    assert "not medical advice" in report
    assert "| loss | " in report and f"{before:.4f}" in report and f"{after:.4f}" in report
    assert report.count("### Question ") == 1  # train.sample_questions=1
    assert "![loss curve](loss.png)" in report

    # The latest checkpoints are resumable and complete; older ones are pruned (keep 2).
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    assert json.loads((run / "checkpoints" / "step-000002" / "state.json").read_text())["step"] == 2


def test_report_shows_final_answers_as_plain_text_and_names_every_file(real_run):
    run = real_run["dir"]
    report = (run / "report.md").read_text()
    # Plain markdown that reads as text: no HTML table or collapsible blocks.
    assert not any(tag in report for tag in ("<table", "<td", "<details", "<summary"))
    assert "**Before (base model)**" in report and "**After (base + adapter)**" in report
    assert "**Reference answer (from the data)**" in report
    # The thinking budget (16 reasoning tokens here) closes every reasoning, so both answers reach a final answer.
    result = json.loads((run / "result.json").read_text())
    for answer in result["answers_before"] + result["answers_after"]:
        assert "</think>" in answer
    assert report.count("Final answer:") == 2 and "(no final answer" not in report
    # The file list names every entry of the run folder, and what the adapter and checkpoints hold.
    files = report.split("\n## Files\n")[1]
    for path in run.iterdir():
        assert f"- `{path.name}{'/' if path.is_dir() else ''}`: " in files, path.name
        if path.name in ("adapter", "checkpoints"):
            for inner in path.iterdir():
                assert f"`{inner.name}" in files, inner
    assert "not written by medcot" not in files


def test_checkpoints_hold_only_what_trains(real_run):
    """SmolLM2 ties lm_head to the embeddings: the frozen alias must not ride along in the checkpoint."""
    lora = {n for n, p in real_run["model"].named_parameters() if p.requires_grad}
    checkpoint = real_run["dir"] / "checkpoints" / "step-000002"
    assert set(load_file(checkpoint / "trainable.safetensors")) == lora
    assert set(torch.load(checkpoint / "optimizer.pt", weights_only=False)["state"]) == lora
    adapter = (real_run["dir"] / "adapter" / "adapter_model.safetensors").stat().st_size
    assert (checkpoint / "trainable.safetensors").stat().st_size < 1.1 * adapter  # the same tensors, key names aside


def test_wall_time_is_counted_once(real_run):
    """At most the time `medcot train` took in this process, and the same in summary, manifest and report."""
    manifest = json.loads((real_run["dir"] / "manifest.json").read_text())
    wall = json.loads((real_run["dir"] / "result.json").read_text())["wall_s"]
    steps = [json.loads(l)["step_time_s"] for l in (real_run["dir"] / "metrics.jsonl").read_text().splitlines()]
    assert sum(steps) <= wall <= real_run["elapsed"]
    assert manifest["wall_time_s"] == round(wall, 1)
    assert f"wall time {wall:.0f} s" in (real_run["dir"] / "report.md").read_text()
    assert f"Wall time         {wall:.0f} s" in real_run["stdout"]


def test_console_shows_progress_and_summary(real_run):
    lines = real_run["log"]
    # The run folder is named first; the "before" phase says what it does before the first step.
    first = lambda pattern: next(i for i, line in enumerate(lines) if re.match(pattern, line))  # noqa: E731
    assert first(f"run folder: {re.escape(str(real_run['dir']))}$") < first("data: ") \
        < first("before: validation loss on 2 held-out rows, then 1 sample answer") \
        < first(r"before: validation loss \d+\.\d{4}; generating the sample answers") < first("step 1/2 \\|")
    log = "\n".join(lines)
    assert "trainable" in log and "parameters" in log
    assert "step 1/2 | loss" in log and "step 2/2 | loss" in log
    assert "before: validation loss" in log and "after: validation loss" in log
    out = real_run["stdout"]
    assert f"Run folder        {real_run['dir']}" in out
    assert "Validation loss" in out and " -> " in out
    assert f"medcot ask \"<question>\" --adapter {real_run['dir']}" in out


def test_lora_params_changed_and_base_params_did_not(real_run):
    initial, model = real_run["initial"], real_run["model"]
    lora_names = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert len(lora_names) == 2 * 7 * model.config.num_hidden_layers  # A and B on q/k/v/o/gate/up/down
    for n, p in model.named_parameters():
        if "lora_" in n:
            assert p.requires_grad
            assert not torch.equal(p, initial[n]), f"LoRA parameter {n} did not change"
        else:
            assert not p.requires_grad
            torch.testing.assert_close(p, initial[n], rtol=0, atol=0, msg=f"base parameter {n} changed")


def test_adapter_holds_only_lora_keys(real_run):
    from peft import get_peft_model_state_dict

    tensors = load_file(real_run["dir"] / "adapter" / "adapter_model.safetensors")
    assert set(tensors) == set(get_peft_model_state_dict(real_run["model"]))
    assert tensors and all(("lora_A" in k or "lora_B" in k) for k in tensors)
    config = json.loads((real_run["dir"] / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (16, 16)
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_adapter_reloads_with_the_same_logits(real_run, embedded_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(real_run["dir"] / "adapter")
    ids = tok("A 60-year-old smoker has haemoptysis. What is the most likely diagnosis?", return_tensors="pt")
    base = AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(**ids).logits
    reloaded = PeftModel.from_pretrained(base, real_run["dir"] / "adapter").eval()
    trained = real_run["model"].eval()
    with torch.no_grad():
        got, want = reloaded(**ids).logits, trained(**ids).logits
    torch.testing.assert_close(got, want)
    assert not torch.allclose(want, base_logits, atol=1e-4), "the adapter changes nothing"


# -- resume errors, validation rows (tiny model) ----------------------------------------------------


def test_resume_errors(tmp_path, tiny_run_dir, capsys):
    assert main(["train", "--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is not a medcot run folder (no config.yaml)" in err and "Traceback" not in err
    assert main(["train", "--resume", str(tiny_run_dir), "train.max_steps=5"]) == 2
    assert "--resume continues a run with its own saved config" in capsys.readouterr().err


def test_existing_run_folder_is_not_overwritten(tiny_run_dir, tiny_train_argv, capsys):
    before = {p: p.stat().st_mtime_ns for p in tiny_run_dir.rglob("*")}
    assert main(tiny_train_argv(tiny_run_dir.parent, tiny_run_dir.name)) == 2
    err = capsys.readouterr().err
    assert f"{tiny_run_dir} already exists" in err and f"--resume {tiny_run_dir}" in err
    assert {p: p.stat().st_mtime_ns for p in tiny_run_dir.rglob("*")} == before


def test_overlong_validation_rows_are_counted_and_reported(tmp_path, tiny_train_argv, caplog):
    """Every tiny row is over 140 tokens: the 2 held-out rows are cut like the training rows, and say so."""
    caplog.set_level(logging.INFO, logger="medcot")
    assert main(tiny_train_argv(tmp_path, "long", "train.max_seq_length=140", "data.overlong=truncate",
                                "train.max_steps=1")) == 0
    run = tmp_path / "long"
    val = json.loads((run / "manifest.json").read_text())["data"]["validation_token_lengths"]
    assert (val["count"], val["over_limit"], val["action"], val["max_seq_length"]) == (2, 2, "truncated", 140)
    assert "tokens: validation 2 rows" in caplog.text and "2 over max_seq_length=140 (truncated)" in caplog.text
    assert "validation 2 rows" in (run / "report.md").read_text()


# -- divergence -----------------------------------------------------------------------------------


def test_nan_from_the_start_stops_with_a_clear_message(tmp_path, tiny_model_dir, tiny_train_argv, capsys):
    from transformers import AutoModelForCausalLM

    poisoned = tmp_path / "poisoned-model"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    model.save_pretrained(poisoned)
    for f in tiny_model_dir.glob("tokenizer*"):
        (poisoned / f.name).write_bytes(f.read_bytes())
    (poisoned / "chat_template.jinja").write_bytes((tiny_model_dir / "chat_template.jinja").read_bytes())

    assert main(tiny_train_argv(tmp_path, "nan", f"model.name_or_path={poisoned}")) == 2
    err = capsys.readouterr().err
    assert "medcot train: error: step 1: loss nan" in err and "is not finite" in err
    assert "Last good checkpoint: none" in err and "Lower train.learning_rate" in err
    assert "Traceback" not in err
    assert not (tmp_path / "nan" / "adapter").exists()


@pytest.mark.slow
def test_nan_mid_run_keeps_the_last_good_checkpoint(tmp_path, tiny_train_argv, capsys, monkeypatch):
    attach = medcot.train.trainer.attach_lora
    calls = {"train_forwards": 0}

    def poison_at_step_3(*args, **kwargs):
        model = attach(*args, **kwargs)

        def pre_hook(module, args, kwargs):
            if module.training:
                calls["train_forwards"] += 1
                if calls["train_forwards"] == 3:  # one micro-batch per step: this is step 3
                    lora_b = next(p for n, p in module.named_parameters() if "lora_B" in n)
                    with torch.no_grad():
                        lora_b.fill_(float("nan"))

        model.register_forward_pre_hook(pre_hook, with_kwargs=True)
        return model

    monkeypatch.setattr(medcot.train.trainer, "attach_lora", poison_at_step_3)
    argv = tiny_train_argv(tmp_path, "diverged", "train.max_steps=6", "train.save_steps=1")
    assert main(argv) == 2
    err = capsys.readouterr().err
    run = tmp_path / "diverged"
    last = run / "checkpoints" / "step-000002"
    assert "step 3: loss nan" in err and f"Last good checkpoint: {last}" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    assert all(torch.isfinite(t).all() for t in load_file(last / "trainable.safetensors").values())
    assert [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert not (run / "adapter").exists()

    # The kept checkpoint resumes (the fault was transient here) and the run completes.
    monkeypatch.setattr(medcot.train.trainer, "attach_lora", attach)
    assert main(["train", "--resume", str(run)]) == 0
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()] == list(range(1, 7))


# -- tracking and secrets -------------------------------------------------------------------------


@pytest.mark.slow
def test_wandb_offline_files_and_no_secrets_anywhere(tmp_path, tiny_train_argv, no_secrets_env, capfd, caplog, monkeypatch):
    for var in ["WANDB_MODE", "WANDB_DISABLED", "WANDB_DIR"]:
        monkeypatch.delenv(var, raising=False)
    caplog.set_level(logging.DEBUG)
    assert main(tiny_train_argv(tmp_path, "tracked", "train.report_to=auto")) == 0
    run = tmp_path / "tracked"

    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, list((run / "wandb").iterdir()) if (run / "wandb").exists() else "no wandb folder"
    assert list(offline[0].glob("run-*.wandb")), "no offline W&B run file to sync"
    assert json.loads((run / "manifest.json").read_text())["tracking"] == "wandb (offline)"
    assert (run / "metrics.jsonl").is_file()  # metrics.jsonl is written whatever the tracker

    captured = capfd.readouterr()
    texts = {"stdout": captured.out, "stderr": captured.err, "log": caplog.text}
    for path in run.rglob("*"):
        if path.is_file():
            texts[str(path)] = path.read_bytes().decode("utf-8", errors="replace")
    for name, secret in no_secrets_env.items():
        for where, text in texts.items():
            assert secret not in text, f"{name} leaked into {where}"


@pytest.mark.slow
def test_wandb_debug_logs_stay_in_the_run_folder(tmp_path, tiny_train_argv):
    """wandb's service writes its debug logs under its cache folder (~/.cache/wandb by default): they belong
    with the run. A fresh process and HOME, since the service starts once per process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "XDG_CACHE_HOME"}
    env.update(HOME=str(tmp_path / "home"), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    argv = tiny_train_argv(tmp_path, "tracked", "train.report_to=auto", "train.max_steps=1")
    out = subprocess.run([sys.executable, "-m", "medcot", *argv], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert list((tmp_path / "tracked" / "wandb" / "logs").glob("core-debug-*.log"))
    home = tmp_path / "home"
    assert not [p for p in home.rglob("*") if "wandb" in p.relative_to(home).parts]


# -- ask ------------------------------------------------------------------------------------------


def test_ask_says_whether_it_ended_on_the_end_token_or_the_limit(tmp_path, tiny_model_dir, capsys):
    from medcot.data.prompts import PromptFormatter
    from medcot.model.load import load_for_inference

    question = "What causes croup?"
    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", "model.device=cpu"])
    model, tokenizer, cfg = load_for_inference(cfg, None)
    prompt = torch.tensor([PromptFormatter(tokenizer, cfg.prompt).encode_prompt(question)])
    greedy = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id)[0, prompt.shape[1]:].tolist()

    # The random model never writes its end token: the 6-token limit stops it, and ask says so.
    assert main(["ask", question, f"model.name_or_path={tiny_model_dir}", "generate.max_new_tokens=6"]) == 0
    out = capsys.readouterr()
    assert "(none: the reasoning did not finish within generate.max_new_tokens=6)" in out.out
    assert "[stopped at generate.max_new_tokens=6: the output may be cut short]" in out.err

    # A copy whose end token is the third token it writes ends there, far below the limit.
    ends = tmp_path / "ends"
    shutil.copytree(tiny_model_dir, ends)
    generation_config = json.loads((ends / "generation_config.json").read_text())
    generation_config["eos_token_id"] = [tokenizer.eos_token_id, greedy[2]]
    (ends / "generation_config.json").write_text(json.dumps(generation_config))
    assert main(["ask", question, f"model.name_or_path={ends}", "generate.max_new_tokens=50"]) == 0
    out = capsys.readouterr()
    assert "(none: the model ended its output inside its reasoning)" in out.out
    assert f"[ended on the model's end token after {greedy.index(greedy[2])} tokens]" in out.err
