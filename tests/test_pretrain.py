"""Continued pre-training (`train.stage=pretrain` / `pretrain+sft`) end to end on the tiny random Llama:
the run folder, held-out perplexity, the SFT stage starting from the merged pre-training adapter, the
with/without comparison, inference and export through both adapters, resume, errors, embeddings.

Runs are shared through module-scoped fixtures; each takes seconds on a CPU.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medcot.cli import main
from medcot.config import load_config
from medcot.data.corpus import EMBEDDED_CORPUS

pytestmark = pytest.mark.slow  # real pre-training + SFT runs of the embedded model

PROMPT = "A 60-year-old smoker has haemoptysis and weight loss. What is the most likely diagnosis?"
# 128-token blocks and 4 held-out abstracts of the shipped PubMed sample: a pre-training step is ~0.2 s.
PRE = ["pretrain.block_size=128", "pretrain.val_docs=4"]


def _run(argv: list[str]) -> str:
    """`medcot train` in-process; returns its stdout (the summary block)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(argv)
    assert rc == 0, out.getvalue()
    return out.getvalue()


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _steps(metrics: Path) -> list[int]:
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.strip()]


def _heldout_loss(model, cfg) -> float:
    """Held-out loss per token on the run's held-out documents, computed here from the corpus."""
    from medcot.data.corpus import iter_documents, pack_blocks, split_documents
    from medcot.model.load import load_tokenizer
    from medcot.train.trainer import validation_loss
    tok = load_tokenizer(cfg.model.name_or_path)
    val_docs, _ = split_documents(iter_documents(cfg.pretrain), cfg.pretrain.val_docs)
    blocks = list(pack_blocks(val_docs, tok, cfg.pretrain.block_size))
    # As in training (attach_lora): without the KV cache, transformers reads the position resets of a
    # packed block as document boundaries; with a cache it would attend across documents.
    model.config.use_cache = False
    return validation_loss(model, blocks, tok.pad_token_id, cfg.train.per_device_batch_size,
                           torch.autocast("cpu", enabled=False))


def _base(tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def _logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model.eval()(ids).logits


@pytest.fixture(scope="module")
def both_run(tmp_path_factory, tiny_train_argv) -> dict:
    """`medcot train --stage pretrain+sft` with the comparison, and a plain `--stage sft` run on the same config.

    A high pre-training rate so the merged adapter moves the base clearly (3 steps of a random model).
    """
    out = tmp_path_factory.mktemp("pretrain-sft")
    common = [*PRE, "pretrain.max_steps=3", "pretrain.learning_rate=2.0e-2",
              # two items per benchmark, a few tokens each: the comparison's eval rows, in seconds
              "eval.train_eval_limit=2", "eval.thinking_budget=4", "eval.answer_tokens=4"]
    argv = tiny_train_argv(out, "both", *common, "--stage", "pretrain+sft")
    stdout = _run(argv)
    sft_stdout = _run(tiny_train_argv(out, "sft-only", *common, "--stage", "sft"))
    return {"dir": out / "both", "argv": argv, "stdout": stdout, "sft": out / "sft-only", "sft_stdout": sft_stdout}


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory, tiny_train_argv) -> dict:
    """`--stage pretrain` only, with a rate high enough to learn in 8 steps."""
    out = tmp_path_factory.mktemp("pretrain-only")
    stdout = _run(tiny_train_argv(out, "pre", *PRE, "pretrain.max_steps=8", "pretrain.learning_rate=1.0e-2",
                                  "--stage", "pretrain"))
    return {"dir": out / "pre", "stdout": stdout}


# -- pretrain+sft: the run folder -----------------------------------------------------------------


def test_pretrain_sft_run_folder_layout(both_run):
    run = both_run["dir"]
    for name in ["config.yaml", "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "metrics.jsonl",
                 "report.md", "manifest.json", "result.json",
                 "pretrain/adapter/adapter_config.json", "pretrain/adapter/adapter_model.safetensors",
                 "pretrain/adapter/tokenizer.json", "pretrain/metrics.jsonl", "pretrain/report.md",
                 "pretrain/manifest.json", "pretrain/result.json", "pretrain/loss.png",
                 "without-pretrain/adapter/adapter_model.safetensors", "without-pretrain/metrics.jsonl",
                 "without-pretrain/report.md", "without-pretrain/manifest.json", "without-pretrain/result.json"]:
        assert (run / name).is_file(), f"{name} missing from the run folder"
    assert list((run / "pretrain" / "checkpoints").glob("step-*")), "no pre-training checkpoint"
    assert list((run / "checkpoints").glob("step-*")), "no SFT checkpoint"
    assert not list(run.rglob(".*tmp*")), "temporary files left behind"
    assert (run / "pretrain" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    cfg = load_config(run / "config.yaml")
    assert cfg == load_config(None, [*both_run["argv"][1:-2], "train.stage=pretrain+sft"])
    assert cfg.train.stage == "pretrain+sft" and cfg.pretrain.compare

    # One line per pre-training step; the SFT stages log their own steps in their own folders.
    assert _steps(run / "pretrain" / "metrics.jsonl") == [1, 2, 3]
    assert _steps(run / "metrics.jsonl") == [1, 2]
    assert _steps(run / "without-pretrain" / "metrics.jsonl") == [1, 2]
    for m in map(json.loads, (run / "pretrain" / "metrics.jsonl").read_text().splitlines()):
        assert math.isfinite(m["loss"]) and m["loss"] > 0 and m["tokens_per_s"] > 0

    assert f"Run folder        {run}" in both_run["stdout"]
    assert "With vs without   pre-training compared in" in both_run["stdout"]


def test_pretrain_manifest_perplexity_is_exp_of_the_heldout_loss(both_run, tiny_model_dir):
    from peft import PeftModel

    pre = both_run["dir"] / "pretrain"
    manifest, result = _json(pre / "manifest.json"), _json(pre / "result.json")
    assert manifest["stage"] == "pretrain" and manifest["steps"] == 3
    before, after = manifest["held_out_loss_before"], manifest["held_out_loss_after"]
    assert (before, after) == (result["val_loss_before"], result["val_loss_after"])
    assert manifest["perplexity_before"] == pytest.approx(math.exp(before), rel=1e-12)
    assert manifest["perplexity_after"] == pytest.approx(math.exp(after), rel=1e-12)
    assert math.isfinite(before) and math.isfinite(after) and before != after
    corpus = manifest["corpus"]
    assert corpus["held_out_documents"] == 4 and corpus["block_size"] == 128
    shipped = sum(1 for line in EMBEDDED_CORPUS.read_text().splitlines() if line.strip())
    assert corpus["documents"] == shipped - 4  # the shipped PubMed sample, minus the held-out abstracts
    assert corpus["blocks"] == (corpus["tokens"] - corpus["dropped_tail_tokens"]) // 128
    assert 0 <= corpus["dropped_tail_tokens"] < 128

    # The losses are the held-out loss of the base, and of the base + the saved adapter, recomputed here.
    cfg = load_config(both_run["dir"] / "config.yaml")
    assert _heldout_loss(_base(tiny_model_dir), cfg) == pytest.approx(before, abs=1e-5)
    reloaded = PeftModel.from_pretrained(_base(tiny_model_dir), pre / "adapter")
    assert _heldout_loss(reloaded, cfg) == pytest.approx(after, abs=1e-5)

    report = (pre / "report.md").read_text()
    assert "## Held-out perplexity" in report
    assert f"| perplexity | {math.exp(before):.2f} | {math.exp(after):.2f} |" in report


def test_pretrain_adapter_is_trained_lora_only(both_run):
    tensors = load_file(both_run["dir"] / "pretrain" / "adapter" / "adapter_model.safetensors")
    lora_b = {k: v for k, v in tensors.items() if "lora_B" in k}
    assert tensors and all("lora_A" in k or "lora_B" in k for k in tensors)  # no embeddings unless asked
    assert len(lora_b) == 7 * 2  # q/k/v/o/gate/up/down in 2 layers
    for k, v in lora_b.items():
        assert v.abs().max() > 0, f"{k} never moved from its zero init"
    config = _json(both_run["dir"] / "pretrain" / "adapter" / "adapter_config.json")
    assert not config.get("modules_to_save")


def test_sft_stage_starts_from_the_pretrained_base_and_the_baseline_from_the_plain_one(both_run):
    run, sft_only = both_run["dir"], both_run["sft"]
    with_pre, without_pre, plain = (_json(p / "result.json") for p in (run, run / "without-pretrain", sft_only))
    # LoRA B starts at zero: the loss before SFT is the loss of the model SFT starts from.
    assert with_pre["val_loss_before"] != pytest.approx(without_pre["val_loss_before"], abs=1e-4), \
        "the merged pre-training adapter did not change the model the SFT stage starts from"
    assert without_pre["val_loss_before"] == pytest.approx(plain["val_loss_before"], abs=1e-6)
    assert without_pre["val_loss_after"] == pytest.approx(plain["val_loss_after"], abs=1e-6)
    # Same base, data, steps and seed: the baseline is exactly the plain SFT run.
    want = load_file(sft_only / "adapter" / "adapter_model.safetensors")
    got = load_file(run / "without-pretrain" / "adapter" / "adapter_model.safetensors")
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], msg=f"{k}: the baseline is not the plain SFT run")
    mine = load_file(run / "adapter" / "adapter_model.safetensors")
    assert any(not torch.allclose(mine[k], want[k]) for k in want), "the SFT adapter ignores the pre-training"


def test_report_compares_with_and_without_pretraining(both_run):
    run = both_run["dir"]
    pre, with_pre, without_pre = (_json(p / "result.json") for p in (run / "pretrain", run, run / "without-pretrain"))
    report = (run / "report.md").read_text()
    assert report.count("## Did continued pre-training help?") == 1
    section = report.split("## Did continued pre-training help?")[1]
    assert (f"perplexity {math.exp(pre['val_loss_before']):.2f} → {math.exp(pre['val_loss_after']):.2f}"
            in section)
    assert f"| after pre-training | {with_pre['val_loss_before']:.4f} | {with_pre['val_loss_after']:.4f} |" in section
    assert (f"| from the base model | {without_pre['val_loss_before']:.4f} | {without_pre['val_loss_after']:.4f} |"
            in section)
    # Eval scores of both SFT runs, benchmark by benchmark, from their results.
    assert with_pre["eval_after"] and with_pre["eval_after"].keys() == without_pre["eval_after"].keys()
    for name, score in with_pre["eval_after"].items():
        other = without_pre["eval_after"][name]
        assert (f"| {name} | {score['accuracy']:.1%} (n={score['n']}) | {other['accuracy']:.1%} (n={other['n']}) |"
                in section)
    # The SFT stage's own report comes first, unchanged in form.
    assert report.index("## Validation loss") < report.index("## Did continued pre-training help?")
    assert "## Did continued pre-training help?" not in (run / "without-pretrain" / "report.md").read_text()


# -- pre-training learns --------------------------------------------------------------------------


def test_pretraining_lowers_heldout_loss(pretrain_run):
    run = pretrain_run["dir"]
    result, manifest = _json(run / "pretrain" / "result.json"), _json(run / "pretrain" / "manifest.json")
    assert result["steps"] == 8 and _steps(run / "pretrain" / "metrics.jsonl") == list(range(1, 9))
    assert result["val_loss_after"] < result["val_loss_before"] - 1e-3, result
    assert manifest["perplexity_after"] < manifest["perplexity_before"]
    # Only the pre-training stage ran.
    assert (run / "config.yaml").is_file() and load_config(run / "config.yaml").train.stage == "pretrain"
    assert not (run / "adapter").exists() and not (run / "without-pretrain").exists()
    assert not (run / "result.json").exists()
    ppl = f"{math.exp(result['val_loss_before']):.2f} -> {math.exp(result['val_loss_after']):.2f}"
    assert f"Held-out text     perplexity {ppl}" in pretrain_run["stdout"]


# -- inference and export through both adapters --------------------------------------------------


def test_inference_and_export_apply_both_adapters(both_run, tiny_model_dir):
    from peft import PeftModel

    from medcot.export.export import merged_model
    from medcot.model.load import load_for_inference, stage_adapters
    run = both_run["dir"]
    assert stage_adapters(run) == [run / "pretrain" / "adapter"]
    model, tok, cfg = load_for_inference(load_config(None, ["model.device=cpu"]), run)
    assert cfg.model.name_or_path == str(tiny_model_dir)  # the run's base, from its config.yaml
    got = _logits(model, tok)

    merged = PeftModel.from_pretrained(_base(tiny_model_dir), run / "pretrain" / "adapter").merge_and_unload()
    want = _logits(PeftModel.from_pretrained(merged, run / "adapter"), tok)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    sft_alone = _logits(PeftModel.from_pretrained(_base(tiny_model_dir), run / "adapter"), tok)
    assert not torch.allclose(got, sft_alone, atol=1e-3), "the pre-training adapter was not applied"

    exported, export_tok = merged_model(load_config(run / "config.yaml"), run, "fp32")
    assert not isinstance(exported, PeftModel)
    torch.testing.assert_close(_logits(exported, export_tok), want, atol=1e-5, rtol=1e-5)


# -- resume ---------------------------------------------------------------------------------------


def test_resume_mid_sft_skips_the_finished_pretraining(tmp_path, tiny_train_argv, caplog):
    argv = tiny_train_argv(tmp_path, "crashed", *PRE, "pretrain.max_steps=3", "pretrain.learning_rate=1.0e-2",
                           "pretrain.compare=false", "train.max_steps=3", "train.save_steps=1",
                           "--stage", "pretrain+sft")
    _run(argv)
    run = tmp_path / "crashed"
    assert not (run / "without-pretrain").exists()  # pretrain.compare=false
    assert "## Did continued pre-training help?" not in (run / "report.md").read_text()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
    uninterrupted = load_file(run / "adapter" / "adapter_model.safetensors")
    pre_files = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (run / "pretrain").rglob("*") if p.is_file()}

    # A crash during SFT step 3: its checkpoint, the adapter and everything written after it are missing.
    shutil.rmtree(run / "checkpoints" / "step-000003")
    shutil.rmtree(run / "adapter")
    for name in ["result.json", "manifest.json", "report.md", "loss.png"]:
        (run / name).unlink()

    caplog.set_level(logging.INFO)
    assert main(["train", "--resume", str(run)]) == 0
    assert f"{run / 'pretrain'}: already finished; skipping" in caplog.text
    assert f"resumed from {run / 'checkpoints' / 'step-000002'} at step 2/3" in caplog.text
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (run / "pretrain").rglob("*") if p.is_file()}
    assert after == pre_files, "the finished pre-training stage was rewritten on resume"

    for name in ["result.json", "manifest.json", "report.md", "adapter/adapter_model.safetensors"]:
        assert (run / name).is_file(), name
    assert _steps(run / "metrics.jsonl") == [1, 2, 3]
    resumed = load_file(run / "adapter" / "adapter_model.safetensors")
    assert set(resumed) == set(uninterrupted)
    for k in uninterrupted:  # resumed on the same merged base: the same weights as without the crash
        torch.testing.assert_close(resumed[k], uninterrupted[k], msg=f"{k} differs after resume")


def _resume_copy(both_run, tmp_path) -> tuple[Path, dict, dict]:
    """Resume a copy of the finished pretrain+sft run; file snapshots (mtime, bytes) before and after."""
    run = tmp_path / "finished"
    shutil.copytree(both_run["dir"], run)

    def snap() -> dict:
        return {p.relative_to(run): (p.stat().st_mtime_ns, p.read_bytes()) for p in run.rglob("*") if p.is_file()}

    before = snap()
    _run(["train", "--resume", str(run)])
    return run, before, snap()


def test_resuming_a_finished_run_retrains_nothing(both_run, tmp_path):
    run, before, after = _resume_copy(both_run, tmp_path)
    changed = sorted(str(p) for p in set(before) | set(after) if before.get(p) != after.get(p))
    assert set(changed) <= {"report.md"}, changed  # every stage was skipped: no weights, results or metrics rewritten


# -- errors ---------------------------------------------------------------------------------------


def test_missing_pretrain_source_is_named(tmp_path, tiny_train_argv, capsys):
    missing = tmp_path / "no-such-corpus.jsonl"
    assert main(tiny_train_argv(tmp_path, "nosource", f"pretrain.source={missing}", "--stage", "pretrain+sft")) == 2
    err = capsys.readouterr().err
    assert "medcot train: error:" in err and str(missing) in err and "pretrain.source" in err
    assert "Traceback" not in err
    assert not (tmp_path / "nosource").exists(), "a setup error left a run folder behind"


def test_heldout_documents_shorter_than_a_block(tmp_path, tiny_train_argv, capsys):
    # One held-out abstract (a few hundred tokens) cannot fill a block of 4096.
    argv = tiny_train_argv(tmp_path, "tinyval", "pretrain.val_docs=1", "pretrain.block_size=4096", "--stage", "pretrain")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "pretrain.val_docs=1" in err and "pretrain.block_size=4096" in err
    assert "Traceback" not in err
    assert not (tmp_path / "tinyval").exists()


def test_heldout_documents_leave_none_to_train_on(tmp_path, tiny_train_argv, capsys):
    corpus = tmp_path / "three.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"Abstract {i} about sepsis."}) + "\n" for i in range(3)))
    argv = tiny_train_argv(tmp_path, "noval", f"pretrain.source={corpus}", "pretrain.val_docs=3", "--stage", "pretrain")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "3 documents" in err and "pretrain.val_docs=3" in err and "none to train on" in err


# -- full embeddings ------------------------------------------------------------------------------


def test_train_embeddings_saves_full_embed_tokens_and_lm_head(tmp_path, tiny_train_argv, tiny_model_dir):
    from peft import PeftModel

    from medcot.model.load import load_for_inference
    _run(tiny_train_argv(tmp_path, "emb", *PRE, "pretrain.max_steps=2", "pretrain.learning_rate=1.0e-3",
                         "pretrain.train_embeddings=true", "pretrain.compare=false", "--stage", "pretrain+sft"))
    run = tmp_path / "emb"
    pre = run / "pretrain"
    base = _base(tiny_model_dir)
    embedding = base.get_input_embeddings().weight.detach()
    tensors = load_file(pre / "adapter" / "adapter_model.safetensors")
    full = {k: v for k, v in tensors.items() if "lora_" not in k}
    assert set(full) == {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"}, set(full)
    for k, v in full.items():
        assert v.shape == embedding.shape, k
        assert not torch.equal(v, embedding), f"{k} was not trained"
    assert set(_json(pre / "adapter" / "adapter_config.json")["modules_to_save"]) == {"embed_tokens", "lm_head"}
    n_lora = sum(v.numel() for k, v in tensors.items() if "lora_" in k)
    manifest = _json(pre / "manifest.json")
    assert manifest["trainable_parameters"] == n_lora + 2 * embedding.numel()
    assert "+ full embed_tokens and lm_head" in (pre / "report.md").read_text()

    # The saved weights are the trained ones: reloaded, they give the held-out loss the stage reported.
    cfg = load_config(run / "config.yaml")
    reloaded = PeftModel.from_pretrained(_base(tiny_model_dir), pre / "adapter")
    assert _heldout_loss(reloaded, cfg) == pytest.approx(manifest["held_out_loss_after"], abs=1e-5)

    # Inference merges them before the SFT adapter, as the SFT stage trained on.
    model, tok, _ = load_for_inference(load_config(None, ["model.device=cpu"]), run)
    merged = PeftModel.from_pretrained(_base(tiny_model_dir), pre / "adapter").merge_and_unload()
    torch.testing.assert_close(_logits(model, tok), _logits(PeftModel.from_pretrained(merged, run / "adapter"), tok),
                               atol=1e-5, rtol=1e-5)


# -- stage folders and adapter folders as --adapter; resuming a finished run ------------------------


def test_ask_command_printed_after_a_pretrain_run_works(pretrain_run, capsys):
    line = next(l for l in pretrain_run["stdout"].splitlines() if l.startswith("Try it"))
    adapter = line.split("--adapter ", 1)[1].strip()
    assert adapter == str(pretrain_run["dir"] / "pretrain")
    capsys.readouterr()
    assert main(["ask", "What causes gout?", "--adapter", adapter, "model.device=cpu", "generate.max_new_tokens=2"]) == 0


def test_resuming_a_finished_run_keeps_one_comparison_section(both_run, tmp_path):
    run, _, _ = _resume_copy(both_run, tmp_path)
    assert (run / "report.md").read_text().count("## Did continued pre-training help?") == 1


def test_adapter_folder_of_a_pretrain_sft_run_includes_the_pretraining(both_run, tiny_model_dir):
    from medcot.model.load import load_for_inference
    run = both_run["dir"]
    cfg = load_config(None, ["model.device=cpu", f"model.name_or_path={tiny_model_dir}"])
    model, tok, _ = load_for_inference(cfg, run)
    via_folder, tok2, _ = load_for_inference(cfg, run / "adapter")
    torch.testing.assert_close(_logits(via_folder, tok2), _logits(model, tok), atol=1e-5, rtol=1e-5)
