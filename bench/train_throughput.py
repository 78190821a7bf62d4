"""Training throughput, side by side in one invocation: plain stack vs medcot fast path vs Unsloth.

Every stack trains the same optimizer steps on the same rows, in the same order: rows of real
medical chain-of-thought data (tokenized with the seed template), 2 rows x 4 accumulation = 8 rows
per step, LoRA r=16 alpha=16 on all 7 projections, 8-bit AdamW, lr 2e-4, max_seq_length 2048.

  plain    transformers + PEFT + TRL SFTTrainer defaults (batches padded to the longest row,
           HF gradient checkpointing, SDPA, bitsandbytes 4-bit where --quant 4bit)
  medcot   medcot's training step with its fast path (padding-free packing, Liger kernels,
           train.checkpoint_ratio) on the same model loading code as `medcot train`;
           variants medcot-offload (train.offload_activations) and medcot[-offload]-mbt<N>
           (train.micro_batch_tokens=N)
  unsloth  Unsloth FastLanguageModel + TRL SFTTrainer, as its notebooks do (when importable)

Each stack runs in its own process (clean GPU memory). Reported per stack: real (non-padding)
tokens/s over the measured steps, median optimizer-step time, peak allocated / reserved GPU memory,
the loss on one fixed batch before training, MFU, and the time one epoch of the full English
medical-o1-reasoning-SFT set (19,704 rows) would take at that rate.

    python bench/train_throughput.py --model /tmp/r1-8b-random --data DATA.jsonl --quant 4bit --out r.json
    (GPU numbers in docs/benchmarks.md use the 8B architecture with RANDOM weights: bench/make_random_model.py)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

FULL_SET_ROWS = 19_704  # FreedomIntelligence/medical-o1-reasoning-SFT, config "en"
H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H100 SXM, the usual MFU denominator
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _rows(args):
    """Encoded rows in step order: step s trains rows[8s : 8s+8], the same for every stack."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
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
    per_step = args.batch_size * args.grad_accum
    order = [encoded[i] for s in range(args.steps) for i in rows_for_step(len(encoded), s, per_step, 3407)]
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


def run_medcot(args, tok, rows):
    import torch

    from medcot.config import LoraArgs, ModelArgs, TrainArgs
    from medcot.model.load import attach_lora, load_base
    from medcot.train.fast import (
        apply_fused_kernels,
        limit_checkpointing,
        offload_checkpointing,
        use_packed_attention,
    )
    from medcot.train.trainer import train_step

    # Variants: medcot[-offload][-mbt<N>] (host-offloaded checkpointing, micro-batch token budget N).
    fast = args.stack != "medcot-plain"
    offload = "-offload" in args.stack
    if m := re.search(r"-mbt(\d+)", args.stack):
        args.micro_batch_tokens = int(m.group(1))
    margs = ModelArgs(name_or_path=args.model, quantization=args.quant, dtype="bf16" if args.device == "cuda" else "fp32",
                      device=args.device)
    model, _, _ = load_base(margs)
    device = next(model.parameters()).device
    kernels = apply_fused_kernels(model, device) if fast else []
    ckpt = not (fast and args.no_checkpointing)
    if fast:
        use_packed_attention(model)  # the same rule as medcot/train.py
    model = attach_lora(model, LoraArgs(r=16, alpha=16, dropout=0.0, target_modules=TARGETS), gradient_checkpointing=ckpt)
    n_ckpt = limit_checkpointing(model, args.checkpoint_ratio) if ckpt and fast else None
    if offload:
        offload_checkpointing(model)
    t = TrainArgs(per_device_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
                  micro_batch_tokens=args.micro_batch_tokens)
    dtype = torch.bfloat16
    per_step = args.batch_size * args.grad_accum
    fixed_loss = _fixed_batch_loss(model, rows[:per_step], device, dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _optimizer(params, args)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda")
    # Training mode, as medcot.train's loop sets it: transformers recomputes checkpointed layers only in
    # training mode (from_pretrained returns the model in eval mode; without this no layer recomputes).
    model.train()
    _reset_mem()
    times, tokens, losses = [], [], []
    for s in range(args.steps):
        step_rows = rows[s * per_step : (s + 1) * per_step]
        _sync()
        t0 = time.perf_counter()
        loss = train_step(model, step_rows, t, tok.pad_token_id, fast, autocast)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync()
        times.append(time.perf_counter() - t0)
        tokens.append(sum(len(r.input_ids) for r in step_rows))
        losses.append(loss)
        print(f"[{args.stack}] step {s + 1}: {times[-1]:.3f}s {tokens[-1]} tokens loss {loss:.4f}", flush=True)
    extra = {"kernels": kernels, "packing": fast, "checkpointed_layers": n_ckpt, "micro_batch_tokens": args.micro_batch_tokens,
             "offload_activations": offload}
    return times, tokens, losses, fixed_loss, sum(p.numel() for p in model.parameters()), extra


def run_sft_trainer(args, tok, rows):
    """The plain stack (or Unsloth) through TRL's SFTTrainer, fed the same rows in the same order."""
    if args.stack == "unsloth":
        os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
        import unsloth  # noqa: F401  (must be imported before transformers/trl to patch them)
        from unsloth import FastLanguageModel
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    per_step = args.batch_size * args.grad_accum
    quant = args.quant == "4bit"
    if args.stack == "unsloth":
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
    class _Timer(TrainerCallback):
        """Synchronises the GPU around each optimizer step so the host clock measures the step."""

        def __init__(self):
            self.times: list[float] = []
            self._t0 = 0.0

        def on_step_begin(self, *a, **k):
            _sync()
            self._t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            _sync()
            self.times.append(time.perf_counter() - self._t0)

    timer = _Timer()

    class _InOrder(SFTTrainer):
        def _get_train_sampler(self, *a, **k):  # same rows in the same order as the other stacks
            return SequentialSampler(self.train_dataset)

    out_dir = f"/tmp/bench-sft-{args.stack}-{os.getpid()}"
    config = SFTConfig(
        output_dir=out_dir, per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        max_steps=args.steps, learning_rate=2e-4, warmup_steps=5, lr_scheduler_type="linear", weight_decay=0.01,
        optim="adamw_8bit" if args.optim == "adamw_8bit" else "adamw_torch", seed=3407,
        bf16=args.device == "cuda", gradient_checkpointing=True, max_length=2048, logging_steps=1,
        report_to="none", save_strategy="no", dataloader_num_workers=0, use_cpu=args.device == "cpu",
    )
    trainer = _InOrder(model=model, args=config, train_dataset=ds, processing_class=tok, peft_config=peft_config,
                       callbacks=[timer])
    device = next(trainer.model.parameters()).device
    fixed_loss = _fixed_batch_loss(trainer.model, rows[:per_step], device, torch.bfloat16)
    _reset_mem()
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    tokens = [sum(len(r.input_ids) for r in rows[s * per_step : (s + 1) * per_step]) for s in range(args.steps)]
    return timer.times, tokens, losses, fixed_loss, sum(p.numel() for p in trainer.model.parameters()), {}


def worker(args) -> None:
    tok, rows, lengths, mean_len = _rows(args)
    runner = run_medcot if args.stack.startswith("medcot") else run_sft_trainer
    t0 = time.time()
    times, tokens, losses, fixed_loss, n_params, extra = runner(args, tok, rows)
    measured = slice(args.warmup, None)
    tok_s = sum(tokens[measured]) / sum(times[measured])
    peak_alloc, peak_reserved = _mem()
    import torch

    n_params_full = 8.03e9 if n_params < 7e9 and args.quant == "4bit" else n_params  # 4-bit packs 2 weights/byte
    res = dict(
        stack=args.stack, quant=args.quant, steps=args.steps, warmup=args.warmup,
        real_tokens_per_s=round(tok_s, 1), step_time_median_s=round(statistics.median(times[measured]), 4),
        peak_allocated_gib=round(peak_alloc, 2), peak_reserved_gib=round(peak_reserved, 2),
        fixed_batch_loss=round(fixed_loss, 5), losses=[round(x, 4) for x in losses],
        mfu=round(6 * n_params_full * tok_s / H100_BF16_PEAK, 3) if args.device == "cuda" else None,
        epoch_hours=round(FULL_SET_ROWS * mean_len / tok_s / 3600, 2),
        mean_row_tokens=round(mean_len, 1), token_lengths=lengths.summary(), wall_s=round(time.time() - t0, 1),
        gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", **extra,
    )
    print("RESULT " + json.dumps(res), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model folder (bench/make_random_model.py on the GPU machine)")
    ap.add_argument("--data", required=True, help="medical CoT rows (.jsonl)")
    ap.add_argument("--question-column", default="question")
    ap.add_argument("--reasoning-column", default="reasoning")
    ap.add_argument("--answer-column", default="answer")
    ap.add_argument("--quant", choices=["4bit", "none"], default="4bit")
    ap.add_argument("--stacks", default="plain,medcot,unsloth")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of the timing (compilation, autotuning)")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--grad-accum", type=int, default=4)
    ap.add_argument("--optim", choices=["adamw_8bit", "adamw"], default="adamw_8bit")
    ap.add_argument("--micro-batch-tokens", type=int, default=16384)
    ap.add_argument("--checkpoint-ratio", type=float, default=1.0)
    ap.add_argument("--no-checkpointing", action="store_true",
                    help="medcot stack: no activation checkpointing, varlen flash attention (fastest, most memory)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--timeout", type=int, default=400, help="seconds per stack")
    ap.add_argument("--out", help="write all results as JSON here")
    ap.add_argument("--stack", help=argparse.SUPPRESS)  # worker mode: run one stack in this process
    args = ap.parse_args()
    if args.stack:
        worker(args)
        return
    results = []
    for stack in args.stacks.split(","):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--stack", stack]
        print(f"=== {stack} ({args.quant})", flush=True)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if lines:
                results.append(json.loads(lines[-1][7:]))
            else:
                results.append({"stack": stack, "quant": args.quant, "error": (proc.stderr or proc.stdout)[-1500:]})
        except subprocess.TimeoutExpired:
            results.append({"stack": stack, "quant": args.quant, "error": f"timed out after {args.timeout}s"})
        print(json.dumps(results[-1])[:3000], flush=True)
    base = next((r for r in results if r["stack"] == "plain" and "error" not in r), None)
    print(f"\n{'stack':<24}{'quant':<7}{'real tok/s':>12}{'vs plain':>10}{'step s':>9}{'alloc GiB':>11}"
          f"{'resv GiB':>10}{'fixed loss':>12}{'MFU':>7}{'epoch h':>9}")
    for r in results:
        if "error" in r:
            print(f"{r['stack']:<24}{r['quant']:<7}  ERROR: {r['error'].splitlines()[-1] if r['error'] else '?'}")
            continue
        ratio = f"{r['real_tokens_per_s'] / base['real_tokens_per_s']:.2f}x" if base else "-"
        print(f"{r['stack']:<24}{r['quant']:<7}{r['real_tokens_per_s']:>12,.0f}{ratio:>10}{r['step_time_median_s']:>9.3f}"
              f"{r['peak_allocated_gib']:>11.2f}{r['peak_reserved_gib']:>10.2f}{r['fixed_batch_loss']:>12.4f}"
              f"{(r['mfu'] or 0):>7.2f}{r['epoch_hours']:>9.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
