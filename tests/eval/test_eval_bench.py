"""bench/eval_throughput.py runs end to end (random tiny Llama, CPU) and writes its JSON."""

import importlib.util
import json
from pathlib import Path

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
