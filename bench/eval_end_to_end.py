"""`medcot eval`, end to end: the real command in a subprocess, timed from start to exit; a table and JSON.

Generated tokens are read back from the run's `items.jsonl` (every item's `num_tokens`; the forced `</think>`
is not counted), so tokens/s is the command's whole wall time (model load, compile, prefill, scoring,
report) against what it generated, plus the eval's own wall time (`summary.json`, items loaded to report).
A baseline tokens/s (`--baseline-tokens-per-s`, with `--baseline-note` saying where it was measured) gives
the speed-up; the old generation path it was measured with is gone, so it is quoted, not re-run.

    # CPU smoke test: the embedded model on 4 shipped MedQA items
    python -m bench.eval_end_to_end --benchmarks medqa --limit 4 --thinking-budget 16 --batch-size 4
    # the GPU machine: the 8B architecture with RANDOM weights (python -m bench.make_random_model), 1,024 items
    python -m bench.eval_end_to_end --model /tmp/r1-8b-random --source .whl2/data/eval --benchmarks medqa,medmcqa \\
        --limit 512 --thinking-budget 1024 --batch-size 256 --override model.dtype=bf16 --out e2e.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.provenance import machine

REPO = Path(__file__).resolve().parents[1]


def generated_tokens(items_path: Path) -> tuple[int, int, int]:
    """(items, generated tokens, answers whose reasoning was forced closed) from an eval's items.jsonl."""
    n = tokens = forced = 0
    for line in items_path.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        n += 1
        for sample in r.get("samples") or [r]:  # eval.samples > 1: each sample's own count (the record has the mean)
            tokens += sample["num_tokens"]
            forced += bool(sample.get("forced"))
    return n, int(tokens), forced


def run(args, out_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "medcot", "eval", f"model.name_or_path={args.model}",
           f"eval.source={args.source}", f"eval.benchmarks={args.benchmarks}", f"eval.limit={args.limit}",
           f"eval.thinking_budget={args.thinking_budget}", f"eval.answer_tokens={args.answer_tokens}",
           f"eval.batch_size={args.batch_size}", f"eval.output_dir={out_dir}", *args.override]
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=False, cwd=REPO, text=True, capture_output=True)
    wall = time.perf_counter() - t0
    sys.stderr.write(proc.stderr[-4000:])
    if proc.returncode != 0:
        raise SystemExit(f"medcot eval exited with {proc.returncode}")
    summary = json.loads((out_dir / "summary.json").read_text())
    n, tokens, forced = generated_tokens(out_dir / "items.jsonl")
    eval_wall = summary["wall_s"]
    return {"items": n, "generated_tokens": tokens, "forced_items": forced, "process_wall_s": round(wall, 1),
            "eval_wall_s": eval_wall, "tokens_per_s": round(tokens / wall, 1),
            "eval_tokens_per_s": round(tokens / eval_wall, 1), "items_per_s": round(n / wall, 2),
            "command": cmd[1:]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--source", default="embedded", help="eval.source")
    p.add_argument("--benchmarks", default="medqa")
    p.add_argument("--limit", type=int, default=4, help="eval.limit (items per benchmark)")
    p.add_argument("--thinking-budget", type=int, default=1024)
    p.add_argument("--answer-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16, help="eval.batch_size (the engine's concurrent requests)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    p.add_argument("--baseline-tokens-per-s", type=float, default=188.7,
                   help="tokens/s of the path being compared with (default: medcot eval at batch 16 before the engine)")
    p.add_argument("--baseline-note", default="medcot eval's HF-generate path, batch 16, H200, bf16, 2026-11-25 "
                   "(docs/results/2026-11-25_h200_eval_throughput_bf16.json)")
    p.add_argument("--out")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="medcot_eval_e2e_") as tmp:
        row = run(a, Path(tmp) / "eval")
    report = {"bench": "eval_end_to_end", "date": time.strftime("%Y-%m-%d"), "model": a.model,
              "source": a.source, "benchmarks": a.benchmarks, "limit": a.limit, "thinking_budget": a.thinking_budget,
              "answer_tokens": a.answer_tokens, "batch_size": a.batch_size, "overrides": a.override, **row,
              "baseline_tokens_per_s": a.baseline_tokens_per_s, "baseline": a.baseline_note,
              "speedup_vs_baseline": round(row["tokens_per_s"] / a.baseline_tokens_per_s, 2),
              "machine": machine()}
    print(f"\nmedcot eval end to end: {a.model}, {a.benchmarks} x {a.limit}, thinking budget {a.thinking_budget}, "
          f"batch {a.batch_size}")
    print(f"{'items':>6} {'tokens':>9} {'forced':>7} {'wall s':>8} {'tok/s':>9} {'eval-only tok/s':>16} {'vs baseline':>12}")
    print(f"{row['items']:>6} {row['generated_tokens']:>9} {row['forced_items']:>7} {row['process_wall_s']:>8.1f} "
          f"{row['tokens_per_s']:>9.1f} {row['eval_tokens_per_s']:>16.1f} {report['speedup_vs_baseline']:>11.2f}x")
    print(f"baseline: {a.baseline_tokens_per_s} tok/s, {a.baseline_note}")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
