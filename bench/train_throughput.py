"""Training throughput side by side in one invocation: plain TRL, every Unsloth batch split, medcot.

Every stack trains the same optimizer steps on the same rows in the same order: real medical
chain-of-thought rows tokenized with the seed template, --rows-per-step rows per optimizer step (the
recipe's 8), LoRA r=16 alpha=16 on all 7 projections, 8-bit AdamW, lr 2e-4, max_seq_length 2048.

  plain          transformers + PEFT + TRL SFTTrainer defaults at the recipe's split (--batch-size x
                 rows/batch accumulation: pairs padded to the longer row, HF gradient checkpointing, SDPA,
                 bitsandbytes NF4 where --quant 4bit); plain-BxA for another split
  unsloth        Unsloth FastLanguageModel + TRL SFTTrainer as its notebooks do, run at EVERY batch x
                 accumulation split a user could pick for the same rows per step: 2x4, 4x2, 8x1 for 8 rows
                 (2x8, 4x4, 8x2, 16x1 for 16). `padding_free` is left unset, so Unsloth chooses it as it
                 does for its users (the result records the choice), and `unsloth` is imported before
                 transformers, as it asks. unsloth-BxA runs one split
  medcot         medcot's training step with the fast path, as `medcot train` runs it (padding-free packing
                 up to train.micro_batch_tokens, varlen attention, Liger kernels, recompute on all layers).
                 Variants by suffix: -offload (train.offload_activations), -mbtN (micro_batch_tokens=N),
                 -ckrX (checkpoint_ratio=X), -nockpt (no recompute: the fastest, most memory), -plain
                 (fast path off), -nofuse (PEFT's own LoRA forward), -budgetN (train.memory_budget_gib=N: the first step recomputes every layer
                 and measures, the rest recompute only as many layers as N GiB needs; medcot-budget40)

medcot is compared with the FASTEST Unsloth split in the same invocation (vs U-best) and, separately,
with the Unsloth split that used the least peak memory (vs U-lowmem). Each stack runs in its own
process (clean GPU memory). Reported per stack: real (non-padding) tokens/s over the measured steps,
median step time, peak allocated / reserved GPU memory, the loss on one fixed batch before training,
MFU, and the hours one epoch of the full English medical-o1-reasoning-SFT set (19,704 rows) would take.
--profile-stacks records one more step of those stacks with torch.profiler (bench/profile_summary.py).

    python -m bench.train_throughput --model /tmp/r1-8b-random --data rows.jsonl --quant 4bit \\
        --stacks plain,unsloth,medcot --out docs/results/DATE_GPU_train_4bit.json
    (GPU numbers in docs/benchmarks.md use the 8B architecture with RANDOM weights: bench/make_random_model.py)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.provenance import versions

REPO = Path(__file__).resolve().parents[1]
FULL_SET_ROWS = 19_704  # FreedomIntelligence/medical-o1-reasoning-SFT, config "en"
DENSE_BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H100/H200 SXM (datasheet), the usual MFU denominator
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
UNSLOTH_BATCHES = (2, 4, 8, 16)  # per-device batch sizes a user picks from; accumulation makes up the step
PACKAGES = ("torch", "transformers", "peft", "accelerate", "trl", "bitsandbytes", "liger-kernel", "unsloth",
            "unsloth_zoo", "triton")  # whose versions each result records


# ---------------------------------------------------------------------------------------------
# Pure helpers (tested on CPU: tests/test_bench.py).


def expand_stacks(spec: str, rows_per_step: int, batch_size: int) -> list[str]:
    """`plain` -> plain-<recipe split>; `unsloth` -> one stack per batch x accumulation split of the step."""
    out: list[str] = []
    for name in (s.strip() for s in spec.split(",") if s.strip()):
        if name == "unsloth":
            out += [f"unsloth-{b}x{rows_per_step // b}" for b in UNSLOTH_BATCHES
                    if b <= rows_per_step and rows_per_step % b == 0]
        elif name == "plain":
            out.append(f"plain-{batch_size}x{rows_per_step // batch_size}")
        else:
            out.append(name)
    for name in out:
        split = batch_split(name)
        if split and split[0] * split[1] != rows_per_step:
            raise SystemExit(f"{name}: {split[0]} x {split[1]} is not {rows_per_step} rows per step")
    return out


def batch_split(stack: str) -> tuple[int, int] | None:
    """(batch, accumulation) of a stack named ...-BxA, else None."""
    m = re.search(r"-(\d+)x(\d+)$", stack)
    return (int(m.group(1)), int(m.group(2))) if m else None


def compare(results: list[dict]) -> dict:
    """Ratios of every stack against plain, the fastest Unsloth split and the lowest-memory Unsloth split.

    Adds vs_plain / vs_unsloth_best / vs_unsloth_lowmem (tokens/s ratios) and mem_vs_unsloth_best /
    mem_vs_unsloth_lowmem (peak allocated GiB differences) to each measured result; returns which
    stacks were the references.
    """
    ok = [r for r in results if "real_tokens_per_s" in r]
    plain = next((r for r in ok if r["stack"].startswith("plain")), None)
    uns = [r for r in ok if r["stack"].startswith("unsloth")]
    best = max(uns, key=lambda r: r["real_tokens_per_s"], default=None)
    low = min(uns, key=lambda r: (r["peak_allocated_gib"], -r["real_tokens_per_s"]), default=None)
    for r in ok:
        for key, ref in (("plain", plain), ("unsloth_best", best), ("unsloth_lowmem", low)):
            r[f"vs_{key}"] = round(r["real_tokens_per_s"] / ref["real_tokens_per_s"], 3) if ref else None
            if key != "plain":
                r[f"mem_vs_{key}"] = round(r["peak_allocated_gib"] - ref["peak_allocated_gib"], 2) if ref else None
    ref = lambda r: {"stack": r["stack"], "real_tokens_per_s": r["real_tokens_per_s"],
                     "peak_allocated_gib": r["peak_allocated_gib"]} if r else None
    return {"plain": ref(plain), "unsloth_best": ref(best), "unsloth_lowmem": ref(low)}


def table(results: list[dict]) -> str:
    head = (f"{'stack':<26}{'quant':<6}{'pad-free':>9}{'real tok/s':>11}{'vs plain':>9}{'vs U-best':>10}"
            f"{'vs U-lowmem':>12}{'step s':>8}{'alloc GiB':>10}{'resv GiB':>9}{'fixed loss':>11}{'MFU':>6}{'epoch h':>8}")
    lines = [head]
    fmt = lambda x: f"{x:.2f}x" if x else "-"
    for r in results:
        if "real_tokens_per_s" not in r:
            why = r.get("skipped") or ((r.get("error") or "").strip().splitlines() or ["?"])[-1]
            tag = "SKIPPED" if "skipped" in r else "ERROR"
            lines.append(f"{r['stack']:<26}{r.get('quant', ''):<6}  {tag}: {why}"[:200])
            continue
        pf = r.get("padding_free")
        lines.append(
            f"{r['stack']:<26}{r['quant']:<6}{'-' if pf is None else str(pf):>9}{r['real_tokens_per_s']:>11,.0f}"
            f"{fmt(r.get('vs_plain')):>9}{fmt(r.get('vs_unsloth_best')):>10}{fmt(r.get('vs_unsloth_lowmem')):>12}"
            f"{r['step_time_median_s']:>8.3f}{r['peak_allocated_gib']:>10.2f}{r['peak_reserved_gib']:>9.2f}"
            f"{r['fixed_batch_loss']:>11.4f}{(r['mfu'] or 0):>6.2f}{r['epoch_hours']:>8.2f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# One stack, in its own process (worker mode).


def _rows(args, n_steps: int):
    """Encoded rows in step order: step s trains rows[R*s : R*s+R], the same for every stack."""
    from medcot.config import DataArgs, PromptArgs
    from medcot.data.collate import rows_for_step
    from medcot.data.prompts import PromptFormatter, encode_records
    from medcot.data.rows import load_records
    from medcot.model.load import load_tokenizer
    tok = load_tokenizer(args.model)
    data = DataArgs(source=args.data, question_column=args.question_column,
                    reasoning_column=args.reasoning_column, answer_column=args.answer_column)
    records = load_records(data).records
    encoded, lengths = encode_records(PromptFormatter(tok, PromptArgs()), records, 2048, "drop")
    per_step = args.rows_per_step
    order = [encoded[i] for s in range(n_steps) for i in rows_for_step(len(encoded), s, per_step, 3407)]
    return tok, order, lengths, statistics.fmean(len(e.input_ids) for e in encoded)


def _fixed_batch_loss(model, rows, device, dtype):
    """Loss per response token on the first step's rows (padded pairs, no grad), through each stack's
    own loss code (Unsloth and Liger never build logits in training), normalised the same way."""
    import torch

    from medcot.data.collate import count_loss_tokens, pad_collate
    n = count_loss_tokens(rows)
    total = 0.0
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
        for i in range(0, len(rows), 2):
            b = {k: v.to(device) for k, v in pad_collate(rows[i : i + 2], 0).items()}
            total += float(model(**b, num_items_in_batch=n).loss)
    return total


def _optimizer(params, args):
    import torch

    if args.optim == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=2e-4, weight_decay=0.01)
    return torch.optim.AdamW(params, lr=2e-4, weight_decay=0.01)


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _mem():
    import torch

    if not torch.cuda.is_available():
        return 0.0, 0.0
    return torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30


def _reset_mem():
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _profiler(args, model):
    """A StepProfiler writing <out stem>_<stack>_trace.json.gz when this stack is profiled, else None."""
    if args.stack not in (args.profile_stacks or "").split(","):
        return None
    from bench.profile_summary import StepProfiler

    out = Path(args.out or "train_throughput.json")
    return StepProfiler(model, out.with_name(f"{out.stem}_{args.stack}_trace.json.gz"))


def run_medcot(args, tok, rows):
    import torch

    from medcot.config import LoraArgs, ModelArgs, TrainArgs
    from medcot.model.load import attach_lora, load_base
    from medcot.train.fast import (
        apply_fused_kernels,
        limit_checkpointing,
        offload_checkpointing,
        skip_optimizer_syncs,
        use_packed_attention,
    )
    from medcot.train.lora_fused import fuse_lora
    from medcot.train.memory import GiB, MemoryBudget
    from medcot.train.trainer import train_step

    fast = "-plain" not in args.stack
    budget = float(m.group(1)) if (m := re.search(r"-budget([\d.]+)", args.stack)) else None
    offload = "-offload" in args.stack
    if m := re.search(r"-mbt(\d+)", args.stack):
        args.micro_batch_tokens = int(m.group(1))
    if m := re.search(r"-ckr([\d.]+)", args.stack):
        args.checkpoint_ratio = float(m.group(1))
    margs = ModelArgs(name_or_path=args.model, quantization=args.quant, dtype="bf16" if args.device == "cuda" else "fp32",
                      device=args.device)
    model, _, _ = load_base(margs)
    device = next(model.parameters()).device
    kernels = apply_fused_kernels(model, device) if fast else []
    ckpt = budget is not None or not ((fast and args.no_checkpointing) or "-nockpt" in args.stack)
    if fast:
        use_packed_attention(model)  # the same rule as medcot/train/trainer.py
    model = attach_lora(model, LoraArgs(r=16, alpha=16, dropout=0.0, target_modules=TARGETS), gradient_checkpointing=ckpt)
    if fast and "-nofuse" not in args.stack:
        print(f"[{args.stack}] LoRA fused into the base matmul in {fuse_lora(model)} layers", flush=True)
    # as medcot/train/trainer.py: with a budget, every layer recomputes until the first step is measured
    memory = MemoryBudget(model, budget, on_log=lambda s: print(f"[{args.stack}] {s}", flush=True)) if budget else None
    n_ckpt = limit_checkpointing(model, args.checkpoint_ratio) if ckpt and fast and not memory else (None if ckpt else 0)
    if offload:
        offload_checkpointing(model)
    per_step = args.rows_per_step
    t = TrainArgs(per_device_batch_size=args.batch_size, gradient_accumulation_steps=per_step // args.batch_size,
                  micro_batch_tokens=args.micro_batch_tokens)
    dtype = torch.bfloat16
    fixed_loss = _fixed_batch_loss(model, rows[:per_step], device, dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _optimizer(params, args)
    if fast:
        skip_optimizer_syncs(opt)  # as `medcot train` does
    autocast = torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda")
    # Training mode, as medcot's loop sets it: transformers recomputes checkpointed layers only in
    # training mode (from_pretrained returns the model in eval mode; without this no layer recomputes).
    model.train()
    _reset_mem()
    if memory:
        memory.start([rows[s * per_step : (s + 1) * per_step] for s in range(len(rows) // per_step)], t, fast)
    prof = _profiler(args, model)
    times, tokens, losses, profile = [], [], [], None
    for s in range(args.steps + (1 if prof else 0)):
        step_rows = rows[s * per_step : (s + 1) * per_step]
        profiling = prof is not None and s == args.steps
        _sync()
        if profiling:
            prof.start()
        t0 = time.perf_counter()
        loss = train_step(model, step_rows, t, tok.pad_token_id, fast, autocast)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if memory:
            memory.after_step(step_rows)
        _sync()
        dt = time.perf_counter() - t0
        if profiling:
            profile = {"step_s": round(dt, 4), **prof.stop()}
            print(f"[{args.stack}] profiled step: {dt:.3f}s", flush=True)
            continue
        times.append(dt)
        tokens.append(sum(len(r.input_ids) for r in step_rows))
        losses.append(loss)
        print(f"[{args.stack}] step {s + 1}: {times[-1]:.3f}s {tokens[-1]} tokens loss {loss:.4f}", flush=True)
    extra = {"kernels": kernels, "packing": fast, "checkpointed_layers": n_ckpt, "micro_batch_tokens": args.micro_batch_tokens,
             "offload_activations": offload, "profile": profile}
    if memory:  # it resets CUDA's peak counters every step and keeps the maxima
        extra.update(checkpointed_layers=memory.plan.recompute, offload_activations=memory.plan.offload,
                     memory_budget={**memory.summary(), "peak_reserved_gib": round(memory.memory.max_reserved / GiB, 3)})
    return times, tokens, losses, fixed_loss, sum(p.numel() for p in model.parameters()), extra


def run_sft_trainer(args, tok, rows):
    """The plain stack or Unsloth through TRL's SFTTrainer, fed the same rows in the same order."""
    unsloth = args.stack.startswith("unsloth")
    if unsloth:
        from unsloth import (
            FastLanguageModel,  # `import unsloth` already ran first thing in worker()
        )
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    batch, accum = batch_split(args.stack) or (args.batch_size, args.rows_per_step // args.batch_size)
    per_step = batch * accum
    quant = args.quant == "4bit"
    if unsloth:
        model, _ = FastLanguageModel.from_pretrained(model_name=args.model, max_seq_length=2048,
                                                     dtype=torch.bfloat16, load_in_4bit=quant)
        model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0, bias="none",
                                                 target_modules=TARGETS, use_gradient_checkpointing="unsloth",
                                                 random_state=3407, max_seq_length=2048)
        peft_config = None
    else:
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        kw = dict(dtype=torch.bfloat16 if args.device == "cuda" else torch.float32, attn_implementation="sdpa")
        if quant:
            kw.update(device_map={"": 0}, quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                bnb_4bit_use_double_quant=True))
        model = AutoModelForCausalLM.from_pretrained(args.model, **kw)
        if not quant:
            model.to(args.device)
        peft_config = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                                 target_modules=TARGETS)
    ds = Dataset.from_dict({
        "input_ids": [r.input_ids for r in rows],
        "completion_mask": [[0 if l == -100 else 1 for l in r.labels] for r in rows],
    })
    prof = _profiler(args, model)

    class _Timer(TrainerCallback):
        """Synchronises the GPU around each optimizer step so the host clock measures the step; profiles
        the step after the timed ones when this stack is profiled."""

        def __init__(self):
            self.times: list[float] = []
            self.profile = None
            self._t0 = 0.0

        def on_step_begin(self, *a, **k):
            _sync()
            if prof is not None and len(self.times) == args.steps:
                prof.start()
            self._t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            _sync()
            dt = time.perf_counter() - self._t0
            if prof is not None and len(self.times) == args.steps:
                self.profile = {"step_s": round(dt, 4), **prof.stop()}
                self.times.append(float("nan"))
                return
            self.times.append(dt)

    timer = _Timer()

    class _InOrder(SFTTrainer):
        def _get_train_sampler(self, *a, **k):  # same rows in the same order as the other stacks
            return SequentialSampler(self.train_dataset)

    out_dir = f"/tmp/bench-sft-{args.stack}-{os.getpid()}"
    config = SFTConfig(
        output_dir=out_dir, per_device_train_batch_size=batch, gradient_accumulation_steps=accum,
        max_steps=args.steps + (1 if prof else 0), learning_rate=2e-4, warmup_steps=5, lr_scheduler_type="linear",
        weight_decay=0.01, optim="adamw_8bit" if args.optim == "adamw_8bit" else "adamw_torch", seed=3407,
        bf16=args.device == "cuda", gradient_checkpointing=True, max_length=2048, logging_steps=1,
        report_to="none", save_strategy="no", dataloader_num_workers=0, use_cpu=args.device == "cpu",
        # padding_free is NOT set: plain TRL keeps its default (padded batches); Unsloth decides for itself.
    )
    trainer = _InOrder(model=model, args=config, train_dataset=ds, processing_class=tok, peft_config=peft_config,
                       callbacks=[timer])
    padding_free = getattr(trainer.args, "padding_free", None)
    device = next(trainer.model.parameters()).device
    fixed_loss = _fixed_batch_loss(trainer.model, rows[:per_step], device, torch.bfloat16)
    _reset_mem()
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h][: args.steps]
    tokens = [sum(len(r.input_ids) for r in rows[s * per_step : (s + 1) * per_step]) for s in range(args.steps)]
    extra = {"batch_size": batch, "grad_accum": accum, "padding_free": padding_free,
             "padding_free_in_collator": getattr(trainer.data_collator, "padding_free", None), "profile": timer.profile}
    return timer.times[: args.steps], tokens, losses, fixed_loss, sum(p.numel() for p in trainer.model.parameters()), extra


def worker(args) -> None:
    if args.stack.startswith("unsloth"):
        os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
        import unsloth  # noqa: F401  first, before transformers/trl/peft: it patches them on import
    n_steps = args.steps + (1 if args.stack in (args.profile_stacks or "").split(",") else 0)
    tok, rows, lengths, mean_len = _rows(args, n_steps)
    runner = run_medcot if args.stack.startswith("medcot") else run_sft_trainer
    t0 = time.time()
    times, tokens, losses, fixed_loss, n_params, extra = runner(args, tok, rows)
    measured = slice(args.warmup, None)
    tok_s = sum(tokens[measured]) / sum(times[measured])
    peak_alloc, peak_reserved = _mem()
    if "memory_budget" in extra:  # the budget reset the peak counters every step; it kept the maxima
        peak_alloc = max(peak_alloc, extra["memory_budget"]["peak_gib"])
        peak_reserved = max(peak_reserved, extra["memory_budget"]["peak_reserved_gib"])
    import torch

    n_params_full = 8.03e9 if n_params < 7e9 and args.quant == "4bit" else n_params  # 4-bit packs 2 weights/byte
    res = dict(
        stack=args.stack, quant=args.quant, rows_per_step=args.rows_per_step, steps=args.steps, warmup=args.warmup,
        real_tokens_per_s=round(tok_s, 1), step_time_median_s=round(statistics.median(times[measured]), 4),
        step_times_s=[round(x, 4) for x in times], step_tokens=tokens,
        peak_allocated_gib=round(peak_alloc, 2), peak_reserved_gib=round(peak_reserved, 2),
        fixed_batch_loss=round(fixed_loss, 5), losses=[round(x, 4) for x in losses],
        mfu=round(6 * n_params_full * tok_s / DENSE_BF16_PEAK, 3) if args.device == "cuda" else None,
        epoch_hours=round(FULL_SET_ROWS * mean_len / tok_s / 3600, 2),
        mean_row_tokens=round(mean_len, 1), token_lengths=lengths.summary(), wall_s=round(time.time() - t0, 1),
        gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", versions=versions(PACKAGES), **extra,
    )
    print("RESULT " + json.dumps(res), flush=True)


# ---------------------------------------------------------------------------------------------


def _write(path: str | None, meta: dict, results: list[dict]) -> None:
    if path:
        summary = compare(results)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({**meta, "summary": summary, "results": results}, indent=2))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.train_throughput", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model folder (bench/make_random_model.py on the GPU machine)")
    ap.add_argument("--data", required=True, help="medical CoT rows (.jsonl)")
    ap.add_argument("--question-column", default="question")
    ap.add_argument("--reasoning-column", default="reasoning")
    ap.add_argument("--answer-column", default="answer")
    ap.add_argument("--quant", choices=["4bit", "none"], default="4bit")
    ap.add_argument("--stacks", default="plain,unsloth,medcot", help="comma-separated; see the stacks above")
    ap.add_argument("--rows-per-step", type=int, default=8, help="rows per optimizer step, the same for every stack")
    ap.add_argument("--batch-size", type=int, default=2, help="the recipe's per-device batch (plain stack's split)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=5, help="steps left out of the timing (compilation, autotuning). "
                    "Unsloth 2026.10.9 still recompiled in step 3 on 2026-12-01 (2.1 s instead of 0.7): keep >= 5")
    ap.add_argument("--optim", choices=["adamw_8bit", "adamw"], default="adamw_8bit")
    ap.add_argument("--micro-batch-tokens", type=int, default=16384)
    ap.add_argument("--checkpoint-ratio", type=float, default=1.0)
    ap.add_argument("--no-checkpointing", action="store_true", help="medcot stacks: no recompute (as the -nockpt suffix)")
    ap.add_argument("--profile-stacks", default="", help="stacks to profile one extra step of (torch.profiler)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--timeout", type=int, default=400, help="seconds per stack")
    ap.add_argument("--budget", type=int, default=0, help="seconds for the whole invocation (0: none); later stacks "
                    "are skipped, and recorded as skipped, when less than --min-stack-s is left")
    ap.add_argument("--min-stack-s", type=int, default=60)
    ap.add_argument("--log-dir", help="keep each stack's full output here")
    ap.add_argument("--out", help="write all results as JSON here (after every stack)")
    ap.add_argument("--stack", help=argparse.SUPPRESS)  # worker mode: run one stack in this process
    args = ap.parse_args(argv)
    if args.rows_per_step % args.batch_size:
        ap.error("--rows-per-step must be a multiple of --batch-size")
    if args.stack:
        worker(args)
        return
    t_start = time.time()
    stacks = expand_stacks(args.stacks, args.rows_per_step, args.batch_size)
    worker_argv = [a for a in (argv if argv is not None else sys.argv[1:])]
    meta = {"bench": "train_throughput", "date": datetime.date.today().isoformat(),
            "command": "python -m bench.train_throughput " + shlex.join(worker_argv), "stacks": stacks,
            "rows_per_step": args.rows_per_step, "quant": args.quant,
            "weights": _weights_note(args.model)}
    results: list[dict] = []
    for stack in stacks:
        left = args.budget - (time.time() - t_start) if args.budget else args.timeout
        if left < args.min_stack_s:
            results.append({"stack": stack, "quant": args.quant, "skipped": f"time budget ({left:.0f}s left)"})
            print(f"=== {stack} ({args.quant}) skipped: {left:.0f}s left", flush=True)
            continue
        cmd = [sys.executable, "-m", "bench.train_throughput", *worker_argv, "--stack", stack]
        print(f"=== {stack} ({args.quant}) at {time.time() - t_start:.0f}s", flush=True)
        t0 = time.time()
        try:
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=min(args.timeout, left), cwd=REPO)
            stdout, stderr = proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as e:
            stdout = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            stderr = (e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")) + \
                f"\ntimed out after {min(args.timeout, left):.0f}s"
        if args.log_dir:
            Path(args.log_dir).mkdir(parents=True, exist_ok=True)
            (Path(args.log_dir) / f"{args.quant}_{stack}.log").write_text(stdout + "\n--- stderr\n" + stderr)
        lines = [l for l in stdout.splitlines() if l.startswith("RESULT ")]
        if lines:
            results.append(json.loads(lines[-1][7:]))
        else:
            results.append({"stack": stack, "quant": args.quant, "error": (stderr or stdout)[-1500:]})
        results[-1]["process_s"] = round(time.time() - t0, 1)
        brief = {k: v for k, v in results[-1].items() if k not in ("losses", "step_times_s", "step_tokens", "profile", "versions")}
        print(json.dumps(brief)[:1500], flush=True)
        _write(args.out, meta, results)
    summary = compare(results)
    print("\n" + table(results))
    for key, label in (("unsloth_best", "fastest Unsloth split"), ("unsloth_lowmem", "lowest-memory Unsloth split")):
        if summary[key]:
            r = summary[key]
            print(f"{label}: {r['stack']} {r['real_tokens_per_s']:,.0f} tok/s at {r['peak_allocated_gib']:.2f} GiB")
    from bench.profile_summary import format_summary

    for r in results:
        if r.get("profile") and "error" in r["profile"]:
            print(f"\n{r['stack']}: profiling failed: {r['profile']['error']}")
        elif r.get("profile"):
            print("\n" + format_summary(r["profile"], f"{r['stack']} ({r['quant']}), one profiled step: "
                                                      f"{r['profile']['step_s']:.3f} s wall"))
    _write(args.out, meta, results)


def _weights_note(model: str) -> str:
    try:
        cfg = json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError):
        return "unknown"
    return cfg.get("medcot_note", "from the model folder (not marked random)")


if __name__ == "__main__":
    main()
