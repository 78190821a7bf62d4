"""Tokens/s of `medcot train` on 1 vs N GPUs (DDP and FSDP), each run a real `torchrun ... -m medcot train`.

    python -m bench.multi_gpu --model /tmp/r1-8b-random --data rows.jsonl --runs 1:none,2:ddp,2:fsdp \
        --steps 12 --warmup 3 --out docs/results/DATE_2xh200_multi_gpu_4bit.json [section.key=value ...]

Every run trains the same steps on the same rows (per_device_batch_size x gradient_accumulation_steps
rows per step, shared among the processes), so tokens/s compare directly. Throughput is taken from
the run's own metrics.jsonl (steps after --warmup), peak memory from rank 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_one(nproc: int, strategy: str, weak: bool, args, workdir: Path) -> dict:
    name = f"gpus{nproc}-{strategy}" + ("-weak" if weak else "")
    # Strong scaling (default): the N processes share the recipe's step (same rows per step as 1 GPU).
    # Weak scaling (train.scale_batch=true): every GPU keeps the recipe's own per-device work (batch x
    # accumulation), so a step trains N times the rows, as a Trainer with per-device settings does.
    accum = args.accumulation
    overrides = [f"train.gradient_accumulation_steps={accum}", f"train.scale_batch={'true' if weak else 'false'}",
        f"model.name_or_path={args.model}", f"data.source={args.data}", f"data.question_column={args.question_column}",
        f"data.reasoning_column={args.reasoning_column}", f"data.answer_column={args.answer_column}",
        f"train.per_device_batch_size={args.batch}", f"train.max_steps={args.steps}", "train.save_steps=0", "train.report_to=none", "train.sample_questions=0",
        "data.val_size=2", "generate.max_new_tokens=8", f"train.output_dir={workdir}", f"train.run_name={name}",
        f"train.distributed={strategy if strategy != 'none' else 'ddp'}", *args.overrides,
    ]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "medcot", "train", "--config", args.config, *overrides]
    t0 = time.time()
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=args.timeout,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
    wall = time.time() - t0
    (workdir / f"{name}.log").write_text(out.stdout + out.stderr)
    if out.returncode != 0:
        return {"gpus": nproc, "strategy": strategy, "weak": weak, "error": (out.stdout + out.stderr)[-2000:], "wall_s": wall}
    metrics = [json.loads(l) for l in (workdir / name / "metrics.jsonl").read_text().splitlines()]
    timed = [m for m in metrics if m["step"] > args.warmup]
    tokens = sum(m["tokens_per_s"] * m["step_time_s"] for m in timed)
    seconds = sum(m["step_time_s"] for m in timed)
    return {"gpus": nproc, "strategy": strategy, "weak": weak, "rows_per_step": accum * args.batch * (nproc if weak else 1), "tokens_per_s": tokens / seconds, "step_time_s": seconds / len(timed),
            "peak_mem_gib_rank0": max(m["mem_gib"] for m in metrics), "final_loss": metrics[-1]["loss"],
            "steps_timed": len(timed), "wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--config", default=str(REPO / "configs" / "r1-distill-llama-8b.yaml"))
    p.add_argument("--question-column", default="question")
    p.add_argument("--reasoning-column", default="reasoning")
    p.add_argument("--answer-column", default="answer")
    p.add_argument("--runs", default="1:none,2:ddp,2:fsdp",
                   help="comma list of PROCESSES:STRATEGY[:weak] (weak: per-GPU work fixed, rows per step x N)")
    p.add_argument("--batch", type=int, default=2, help="train.per_device_batch_size (the recipe's 2)")
    p.add_argument("--accumulation", type=int, default=4, help="train.gradient_accumulation_steps on 1 GPU (the recipe's 4)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--timeout", type=int, default=400)
    p.add_argument("--out", required=True)
    p.add_argument("overrides", nargs="*", help="extra config overrides for every run")
    args = p.parse_args()

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.runs.split(","):
            nproc, strategy, *mode = spec.split(":")
            r = run_one(int(nproc), strategy, mode == ["weak"], args, Path(tmp))
            results.append(r)
            print(json.dumps(r)[:400], flush=True)
    base = next((r for r in results if r["gpus"] == 1 and "tokens_per_s" in r), None)
    print(f"\n{'GPUs':>4} {'strategy':>8} {'scaling':>8} {'rows/step':>9} {'tokens/s':>10} {'speed-up':>9} {'step s':>7} {'peak GiB (rank 0)':>18} {'loss':>7}")
    for r in results:
        if "error" in r:
            print(f"{r['gpus']:>4} {r['strategy']:>8} {'weak' if r['weak'] else 'strong':>8}   FAILED: {r['error'].strip().splitlines()[-1][:80]}")
            continue
        r["speedup_vs_1"] = r["tokens_per_s"] / base["tokens_per_s"] if base else None
        print(f"{r['gpus']:>4} {r['strategy']:>8} {'weak' if r['weak'] else 'strong':>8} {r['rows_per_step']:>9} {r['tokens_per_s']:>10,.0f} {r['speedup_vs_1'] or 0:>8.2f}x "
              f"{r['step_time_s']:>7.2f} {r['peak_mem_gib_rank0']:>18.2f} {r['final_loss']:>7.4f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"runs": results, "steps": args.steps, "warmup": args.warmup,
                                          "overrides": args.overrides, "config": args.config}, indent=2))


if __name__ == "__main__":
    main()
