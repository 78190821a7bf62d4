"""End to end: `medcot eval --adapter RUN --compare` on the tiny model, 3 items per benchmark."""

import json
from pathlib import Path

import pytest

from medcot.cli import main
from medcot.config import load_config


def test_eval_compare_cli(tiny_overrides, tiny_adapter_run, shared_data, tmp_path, capsys):
    source = shared_data / "eval" / "normalized"
    rc = main(["eval", "--adapter", str(tiny_adapter_run), "--compare", f"eval.source={source}", *tiny_overrides])
    assert rc == 0
    out = tmp_path / "eval"
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["models"]) == ["base", "adapter"]
    assert set(summary["comparison"]) == {"medqa", "medmcqa", "pubmedqa", "mmlu_medical"}
    assert all(c["n_paired"] == 3 for c in summary["comparison"].values())
    records = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert len(records) == 2 * 4 * 3
    assert {r["model"] for r in records} == {"base", "adapter"}
    by_model = {m: [r["output"] for r in records if r["model"] == m] for m in ("base", "adapter")}
    assert by_model["base"] != by_model["adapter"]  # the adapter was really switched on (and off for base)
    assert set(summary["cot_loss"]) == {"base", "adapter"}
    assert summary["cot_loss"]["base"]["loss"] != summary["cot_loss"]["adapter"]["loss"]
    md = (out / "report.md").read_text()
    assert "Δ after − before" in md and "McNemar" in md
    printed = capsys.readouterr().out
    assert "base 0/3" in printed or "base 1/3" in printed or "base 2/3" in printed or "base 3/3" in printed
    assert "->  adapter" in printed and str(out / "report.md") in printed


def test_eval_errors_are_clean(tmp_path, capsys):
    assert main(["eval", "--compare", f"eval.output_dir={tmp_path}"]) == 2
    assert "add --adapter RUN_DIR" in capsys.readouterr().err
    assert main(["eval", f"eval.source={tmp_path / 'missing'}", f"eval.output_dir={tmp_path}"]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["eval", "eval.benchmarks=medqa,gpqa"]) == 2
    assert "eval.benchmarks: ['gpqa'] not among" in capsys.readouterr().err


def test_eval_help_and_shipped_config(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--compare" in text and "--overlap-only" in text and "--adapter" in text
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "eval-demo-cpu.yaml")
    assert cfg.eval.source == "embedded" and cfg.eval.limit and cfg.model.device == "cpu"
