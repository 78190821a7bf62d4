"""`medcot train` with eval.train_eval_limit > 0 scores the benchmarks before and after training."""

import json

from medcot.cli import main


def test_train_runs_a_small_eval_before_and_after(tmp_path, tiny_train_argv):
    argv = tiny_train_argv(tmp_path, "with-eval", "eval.train_eval_limit=2", "eval.thinking_budget=4",
                           "eval.answer_tokens=4", "eval.benchmarks=[medqa,pubmedqa]")
    assert main(argv) == 0
    run = tmp_path / "with-eval"
    manifest = json.loads((run / "manifest.json").read_text())
    for phase in ("eval_before", "eval_after"):
        assert set(manifest[phase]) == {"medqa", "pubmedqa"}
        for score in manifest[phase].values():
            assert score["n"] == 2 and 0.0 <= score["accuracy"] <= 1.0
    report = (run / "report.md").read_text()
    assert "## Benchmarks before and after" in report and "| medqa | 2 |" in report


def test_train_without_eval_limit_writes_no_benchmark_section(tiny_run_dir):
    assert "Benchmarks before and after" not in (tiny_run_dir / "report.md").read_text()
    assert json.loads((tiny_run_dir / "manifest.json").read_text())["eval_before"] == {}
