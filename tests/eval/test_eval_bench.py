"""bench/eval_throughput.py runs end to end (random tiny Llama, CPU) and writes its JSON."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "eval_throughput.py"


def test_throughput_bench_smoke(tmp_path, embedded_dir, capsys):
    spec = importlib.util.spec_from_file_location("eval_throughput", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    report = bench.main(["--model", "random:tiny", "--num-prompts", "4", "--max-new-tokens", "4",
                         "--batch-sizes", "4", "--fixed-length", "--device", "cpu", "--out", str(out)])
    assert json.loads(out.read_text()) == report
    seq, batched = report["results"]
    assert (seq["mode"], seq["batch_size"], batched["batch_size"]) == ("sequential", 1, 4)
    assert seq["generated_tokens"] == batched["generated_tokens"] == 4 * 4  # same work in both modes
    assert "speedup" in capsys.readouterr().out


@pytest.mark.slow  # the real command in a subprocess: ~1 min on 2 cores
def test_end_to_end_bench_counts_what_medcot_eval_generated(tmp_path, embedded_dir, capsys):
    """bench/eval_end_to_end.py runs the real `medcot eval` and reads the tokens back from its items.jsonl."""
    from bench import eval_end_to_end

    out = tmp_path / "e2e.json"
    report = eval_end_to_end.main(["--benchmarks", "medqa", "--limit", "2", "--thinking-budget", "6",
                                   "--answer-tokens", "4", "--batch-size", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == report
    assert report["items"] == 2
    # every item thinks up to the budget, then answers: at most budget + answer tokens each, the forced tag not counted
    assert 0 < report["generated_tokens"] <= 2 * (6 + 4)
    assert 0 <= report["forced_items"] <= 2
    assert abs(report["tokens_per_s"] - report["generated_tokens"] / report["process_wall_s"]) < 0.2
    assert report["speedup_vs_baseline"] == round(report["tokens_per_s"] / report["baseline_tokens_per_s"], 2)
    assert "medcot eval end to end" in capsys.readouterr().out


def test_end_to_end_bench_sums_tokens_and_forced_items(tmp_path):
    from bench.eval_end_to_end import generated_tokens

    path = tmp_path / "items.jsonl"
    rows = [{"num_tokens": 10, "forced": True}, {"num_tokens": 7},
            # eval.samples=2: the record holds the mean; the samples hold what was generated
            {"num_tokens": 4.5, "forced": 0.5, "samples": [{"num_tokens": 3, "forced": False},
                                                           {"num_tokens": 6, "forced": True}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert generated_tokens(path) == (3, 26, 2)
