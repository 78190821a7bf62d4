"""GRPO step time in one invocation: medcot's GRPO stage against TRL's GRPOTrainer, same prompts, same GPU.

Both stacks run the same optimizer steps: --prompts-per-step prompts (the first prompts-per-step x steps
items of --items, in file order, rendered with medcot's eval prompt; TRL is handed the same token ids), k
sampled completions each, LoRA r=16 alpha=16 on all 7 projections, lr 1e-5, the KL penalty on (beta 0.04,
reference = the base with the adapter disabled), one update per generation (mu=1), the 'grpo' loss
normalisation, gradient checkpointing, bf16 (NF4 4-bit with --quant 4bit), micro-batches of
--micro-batch completions, plain AdamW.

  medcot   `medcot train --stage grpo` as the CLI runs it (medcot.rl.run.train_grpo on a Config built from
           overrides): rollouts through medcot's generation engine, all k x prompts completions at once
           (generate.batch_size), then the update (on CUDA: SFT's fast path, completions packed into
           micro-batches of up to train.micro_batch_tokens tokens, 16,384 by default; padded micro-batches of
           --micro-batch completions where the fast path is off). medcot-mbtN: train.micro_batch_tokens=N
  trl      TRL's GRPOTrainer with its DEFAULT generation (transformers `generate`, no vLLM, no continuous
           batching), otherwise its defaults

Equal work, made so by the benchmark only (nothing here changes medcot or TRL code on disk):
- Random weights never write EOS on purpose nor a right answer, so every reward would be 0 and no group
  would carry a signal. Both stacks score completion j of prompt p at step s with the same pseudo-random
  reward, `bench_reward(p, j, s)`, so both take a real update with identical advantages.
- Every completion is exactly --completion-tokens long: EOS is blocked in both (medcot: the engine's
  `ignore_eos`; TRL: `min_new_tokens` in its generation_kwargs) and medcot runs one pass of
  generate.max_new_tokens (grpo.thinking_budget=null; a budget would feed the forced "</think>" and start a
  second phase, work TRL does not do).
- The 8B random model has 128,256 vocabulary rows but the SmolLM2 tokenizer only 49,152 tokens. Ids past the
  tokenizer decode to nothing, so the completions' text would be shorter than what was sampled. With
  --restrict-vocab auto (the default) a hook on the LM head of both stacks sets the logits of those ids to
  -1e4, so both sample real tokens. It costs one in-place fill of the logits' tail per LM-head call: every
  generation step of both, and medcot's update (which builds logits; TRL's fused LM head computes log-probs
  without calling the module). Both train on the ids they sampled: `trained_tokens` per step is reported beside
  `generated_tokens`.
- CPU only: TRL 1.15's fused LM head needs Triton, which CPU torch lacks; a plain-torch stand-in is installed
  there (`_TorchChunkedLogProb`). On a GPU TRL's own kernel runs.

Reported per stack (median over the steps after --warmup): step time (medcot: its metrics.jsonl step_time_s;
TRL: on_step_begin -> on_step_end of a TrainerCallback, synchronised), rollout time (medcot: rollout_s, its
sampling with decoding, re-tokenizing and scoring; TRL: its `_generate`, i.e. transformers generate plus
decoding, timed from outside) and rollout tokens/s, update time (step - rollout: reference pass, forward and
backward, optimizer), generated and trained tokens per step, peak GPU memory of the training loop
(torch.cuda.max_memory_allocated, reset when each loop starts; peak RSS on CPU), and TRL step time / stack
step time ("vs TRL", x faster). Each stack runs in its own process. --budget stops a stack cleanly (medcot: SIGTERM
after a step, its checkpoint saved; TRL: should_training_stop) when the next step would not fit, and keeps
the steps measured so far.

    python -m bench.grpo_throughput --model /tmp/r1-8b-random --items medqa_usmle_4opt_dev.jsonl --quant 4bit \\
        --stacks medcot,trl --out docs/results/DATE_h200_grpo_4bit.json
    python -m bench.make_random_model /tmp/tiny --tiny && python -m bench.grpo_throughput --model /tmp/tiny \\
        --items ../shared/data/dev_pools/normalized/medqa_usmle_4opt_dev.jsonl --quant none --device cpu \\
        --completion-tokens 16 --steps 2 --out /tmp/grpo_cpu.json                        # CPU smoke run, ~40 s
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.provenance import versions

REPO = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PACKAGES = ("torch", "transformers", "peft", "accelerate", "trl", "bitsandbytes", "datasets")  # versions recorded
LEARNING_RATE = 1e-5  # medcot's grpo.learning_rate default (TRL's is 1e-6; no effect on time)
BETA = 0.04  # medcot's grpo.beta default; TRL's default is 0.0 (no KL, no reference pass): set on for both
SEED = 3407
MASKED_LOGIT = -1e4  # finite: softmax gives exactly 0, and no inf - inf in anyone's log-softmax / entropy


# ---------------------------------------------------------------------------------------------
# Pure helpers (tested on CPU: tests/test_bench.py).


def bench_reward(prompt: int, completion: int, step: int) -> float:
    """The reward both stacks give completion `completion` of prompt `prompt` at step `step` (0-based): [0, 1)."""
    h = hashlib.sha256(f"grpo-bench:{prompt}:{completion}:{step}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def prompts_digest(prompts: list[list[int]]) -> str:
    """A digest of one step's prompts (token ids, in order): equal digests = identical prompts."""
    return hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16]


def finalize(stack: str, steps: list[dict], warmup: int) -> dict:
    """Medians over the steps after `warmup` (the step records both children print)."""
    timed = steps[warmup:]
    out: dict = {"stack": stack, "steps_done": len(steps), "timed_steps": len(timed)}
    if not timed:
        out["error"] = f"no timed steps ({len(steps)} done, --warmup {warmup})"
        return out

    def med(key: str) -> float:
        return round(statistics.median(s[key] for s in timed), 4)

    rollout_s = sum(s["rollout_s"] for s in timed)
    out.update(step_time_median_s=med("step_s"), rollout_median_s=med("rollout_s"), update_median_s=med("update_s"),
               rollout_tokens_per_s=round(sum(s["generated_tokens"] for s in timed) / rollout_s, 1) if rollout_s else None,
               generated_tokens_per_step=[s["generated_tokens"] for s in steps],
               trained_tokens_per_step=[s["trained_tokens"] for s in steps],
               peak_mem_gib=round(max(s["mem_gib"] for s in steps), 2))
    return out


def compare(results: list[dict]) -> dict:
    """Adds vs_trl (TRL median step time / this stack's: x faster) and mem_vs_trl (peak GiB ratio) to each
    measured result; returns the summary: the ratios, and whether prompts and generated tokens agree."""
    ok = [r for r in results if "step_time_median_s" in r]
    trl = next((r for r in ok if r["stack"] == "trl"), None)
    for r in ok:
        r["vs_trl"] = round(trl["step_time_median_s"] / r["step_time_median_s"], 3) if trl else None
        r["mem_vs_trl"] = round(r["peak_mem_gib"] / trl["peak_mem_gib"], 3) if trl and trl["peak_mem_gib"] else None
    common = min((len(r["generated_tokens_per_step"]) for r in ok), default=0)  # a stack stopped early: its steps
    n_dig = min((len(r.get("prompt_digests") or []) for r in ok), default=0)
    digests = {tuple(r["prompt_digests"][:n_dig]) for r in ok} if n_dig else {None}
    gen = {tuple(r["generated_tokens_per_step"][:common]) for r in ok}
    medcot = next((r for r in ok if r["stack"].startswith("medcot")), None)  # the first medcot stack
    return {
        "medcot_vs_trl_step": medcot["vs_trl"] if medcot and trl else None,
        "medcot_vs_trl_mem": medcot["mem_vs_trl"] if medcot and trl else None,
        "same_prompts": len(digests) == 1 and None not in digests if len(ok) > 1 else None,
        "same_generated_tokens": len(gen) == 1 if len(ok) > 1 else None,
    }


def table(results: list[dict]) -> str:
    head = (f"{'stack':<17}{'quant':<6}{'steps':>6}{'step s':>9}{'rollout s':>10}{'rollout tok/s':>14}{'update s':>9}"
            f"{'gen tok/step':>13}{'train tok/step':>15}{'peak GiB':>9}{'vs TRL':>8}")
    lines = [head]
    for r in results:
        if "step_time_median_s" not in r:
            why = r.get("skipped") or ((r.get("error") or "").strip().splitlines() or ["?"])[-1]
            lines.append(f"{r['stack']:<17}{r.get('quant', ''):<6}  {'SKIPPED' if 'skipped' in r else 'ERROR'}: {why}"[:200])
            continue
        timed = slice(r["steps_done"] - r["timed_steps"], None)
        gen = statistics.median(r["generated_tokens_per_step"][timed])
        trained = statistics.median(r["trained_tokens_per_step"][timed])
        vs = f"{r['vs_trl']:.2f}x" if r.get("vs_trl") else "-"
        lines.append(f"{r['stack']:<17}{r['quant']:<6}{r['timed_steps']:>6}{r['step_time_median_s']:>9.3f}"
                     f"{r['rollout_median_s']:>10.3f}{r['rollout_tokens_per_s'] or 0:>14,.1f}{r['update_median_s']:>9.3f}"
                     f"{gen:>13,.0f}{trained:>15,.0f}{r['peak_mem_gib']:>9.2f}{vs:>8}"
                     + ("  (partial: budget)" if r.get("partial") else ""))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# One stack, in its own process (--child).


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _mem_gib() -> float:
    """Peak GPU memory allocated since the last reset; on CPU the process's peak resident memory."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _emit(kind: str, payload: dict) -> None:
    print(f"{kind} {json.dumps(payload)}", flush=True)


def _plan(args):
    """The tokenizer, task and the first prompts_per_step x steps items in file order, with medcot's prompts."""
    from medcot.config import GrpoArgs, PromptArgs
    from medcot.data.prompts import PromptFormatter
    from medcot.model.load import load_tokenizer
    from medcot.rl.items import load_items
    from medcot.rl.rewards import EVAL_PROTOCOL

    tok = load_tokenizer(args.model)
    task = load_items(GrpoArgs(source=args.items, val_size=0), SEED).task  # validates the file, reads its task
    items = task.load_file(Path(args.items))
    n = args.prompts_per_step * args.steps
    if len(items) < n + args.val_size:
        raise SystemExit(f"{args.items}: {len(items)} items, need {n} + {args.val_size} held out")
    formatter = PromptFormatter(tok, PromptArgs())  # medcot's default prompt section, as the child config has
    prompts = [EVAL_PROTOCOL.prompt(tok, formatter, task, it) for it in items[:n]]
    return tok, task, items, [p[0] for p in prompts], [list(p[1]) for p in prompts]


def _restrict_vocab(model, tok, mode: str) -> int | None:
    """Block the LM head's rows past the tokenizer (see the module docstring); returns how many, or None."""
    head = model.get_output_embeddings()
    rows, n_tok = head.weight.shape[0], len(tok)
    if mode == "off" or rows <= n_tok:
        return None

    def hook(module, inputs, out):
        out[..., n_tok:] = MASKED_LOGIT  # in place: a Linear's backward does not need its output

    head.register_forward_hook(hook)
    return rows - n_tok


class _Deadline:
    """Whether one more step still fits before --deadline: estimated as the last step plus 10% (the first steps
    compile and warm up, so the last is the better guess). A stack always runs --warmup + 1 steps, so that one is
    timed; the parent's hard timeout still keeps what a stack measured if a step overruns."""

    def __init__(self, deadline: float, min_steps: int):
        self.deadline, self.min_steps, self.done = deadline, min_steps, 0

    def another_fits(self, step_s: float) -> bool:
        self.done += 1
        return self.done < self.min_steps or time.time() + 1.1 * step_s < self.deadline


def run_medcot(args) -> dict:
    """medcot's GRPO stage through its entry point; prompts, rewards and EOS made equal in-process (see above)."""
    import torch

    import medcot.rl.grpo as G
    from medcot.config import load_config
    from medcot.errors import Interrupted
    from medcot.generate import batch, budget
    from medcot.rl.items import Items
    from medcot.rl.rewards import Scored
    from medcot.rl.run import train_grpo
    from medcot.train.tracking import Tracker

    _, _, items, _, prompt_ids = _plan(args)
    n, k = len(prompt_ids), args.k
    index_of = {it.id: i for i, it in enumerate(items[:n])}
    run_root = Path(args.run_dir)
    overrides = [
        f"model.name_or_path={args.model}", f"model.quantization={args.quant}", f"model.device={args.device}",
        f"model.dtype={'bf16' if args.device == 'cuda' else 'fp32'}",
        "train.stage=grpo", f"train.output_dir={run_root}", "train.run_name=grpo-bench", "train.report_to=none",
        f"train.per_device_batch_size={args.micro_batch}", "train.gradient_checkpointing=true",  # as TRL's default
        *([f"train.micro_batch_tokens={m.group(1)}"] if (m := re.search(r"-mbt(\d+)$", args.stack)) else []),
        "train.optimizer=adamw", "train.warmup_steps=0", "train.save_steps=0", "train.sample_questions=1",
        f"train.seed={SEED}",
        f"grpo.source={args.items}", f"grpo.val_size={args.val_size}", f"grpo.max_steps={args.steps}",
        f"grpo.prompts_per_step={args.prompts_per_step}", f"grpo.num_generations={k}", "grpo.iterations=1",
        f"grpo.learning_rate={LEARNING_RATE}", f"grpo.beta={BETA}", "grpo.loss_type=grpo", "grpo.temperature=1.0",
        "grpo.thinking_budget=null", f"generate.max_new_tokens={args.completion_tokens}",
        f"generate.batch_size={args.prompts_per_step * k}",  # every completion of the step at once, as TRL
        "lora.r=16", "lora.alpha=16", "lora.dropout=0.0", f"lora.target_modules=[{','.join(TARGETS)}]",
        "eval.benchmarks=[medqa]", "eval.train_eval_limit=0",  # the contamination check: startup, not timed
    ]
    cfg = load_config(None, overrides)

    # Items: the first n of the file, in order, one step after another; the next val_size are held out.
    real_load_items = G.load_items

    def load_items(g, seed):
        loaded = real_load_items(g, seed)
        return Items(source=loaded.source, task=loaded.task, train=items[:n], val=items[n : n + args.val_size])

    G.load_items = load_items
    G.rows_for_step = lambda n_rows, step, per_step, seed: [(step * per_step + i) % n_rows for i in range(per_step)]

    real_load_base = G.load_base
    restricted: list[int | None] = []

    def load_base(margs):
        model, tokenizer, info = real_load_base(margs)
        restricted.append(_restrict_vocab(model, tokenizer, args.restrict_vocab))
        return model, tokenizer, info

    G.load_base = load_base

    # No EOS: every completion is max_new_tokens long (the engine's own ignore_eos), in both generation paths
    # (budget.generate_answers builds both the one-pass and the thinking-budget requests with sampling_params).
    real_params = batch.sampling_params

    def no_eos_params(gen, index=0, **extra):
        return real_params(gen, index, ignore_eos=True, **extra)

    batch.sampling_params = budget.sampling_params = no_eos_params

    # The benchmark's reward, and what each step generated and trained on.
    real_sample = G.sample
    per_step: list[dict] = []

    def sample(model, tokenizer, formatter, task_, its, copies, gen, g):
        out = real_sample(model, tokenizer, formatter, task_, its, copies, gen, g)
        if copies == k:  # the training rollouts (held-out answers are one per item)
            s = len(per_step)
            for i, r in enumerate(out):
                v = bench_reward(index_of[r.item.id], i % copies, s)
                r.scored = Scored(values={"correct": 0.0, "format": v}, total=v, label=None, method="bench",
                                  correct=False)
            per_step.append({"generated_tokens": sum(r.num_tokens for r in out),
                             "trained_tokens": sum(len(r.completion_ids) for r in out),
                             "prompts": [out[i].prompt_ids for i in range(0, len(out), copies)]})
        return out

    G.sample = sample

    deadline = _Deadline(args.deadline, args.warmup + 1)
    steps: list[dict] = []
    real_log = Tracker.log

    def log(self, metrics, step):
        real_log(self, metrics, step)
        if "step_time_s" not in metrics:
            return
        rec = {"step": step, "step_s": metrics["step_time_s"], "rollout_s": metrics["rollout_s"],
               "update_s": metrics["step_time_s"] - metrics["rollout_s"], "mem_gib": metrics["mem_gib"],
               "generated_tokens": per_step[-1]["generated_tokens"], "trained_tokens": per_step[-1]["trained_tokens"],
               "loss": metrics.get("loss"), "kl": metrics.get("kl"), "groups": metrics.get("groups")}
        steps.append(rec)
        _emit("STEP", rec)
        if step < args.steps and not deadline.another_fits(rec["step_s"]):
            print(f"[medcot] --budget: stopping after step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGTERM)  # medcot finishes the step, saves a checkpoint, stops

    Tracker.log = log
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    partial = False
    try:
        train_grpo(cfg, on_log=lambda m: print(f"[medcot] {m}", flush=True))
    except Interrupted:
        partial = True
    return {"steps": steps, "partial": partial, "restricted_vocab_rows": restricted[0] if restricted else None,
            "prompt_digests": [prompts_digest(p["prompts"]) for p in per_step],
            "settings": {"overrides": overrides}}


class _TorchChunkedLogProb:
    """CPU smoke runs only: TRL 1.15's fused LM head (`add_fused_lm_head`, always on in GRPOTrainer) calls a Triton
    kernel, and CPU torch has no Triton, so GRPOTrainer cannot train on a CPU at all. This stands in with the same
    outputs from materialised logits. It is installed only where TRL found no kernel on a CPU run; on a GPU TRL's
    own kernel runs (and a missing one fails loudly)."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, softcap=None, logit_scale=1.0, outputs=()):
        import torch

        z = torch.nn.functional.linear(hidden, weight, bias).float() * logit_scale
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        z = z / temperature
        log_z = torch.logsumexp(z, dim=-1)
        target = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        p = torch.softmax(z, dim=-1)
        return (target - log_z,
                log_z - (p * z).sum(-1) if "entropy" in outputs else None,
                torch.log((p * p).sum(-1)).detach() if "log_sum_sq_probs" in outputs else None,
                z.mean(-1).detach() if "mean_logits" in outputs else None,
                (target >= z.max(-1).values).detach() if "is_top1" in outputs else None)


def run_trl(args) -> dict:
    """TRL's GRPOTrainer, default generation; the same prompt ids, reward, LoRA and step shape."""
    import torch
    import trl.trainer.utils as trl_utils
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    if args.device == "cpu" and trl_utils._ChunkedLogProbFunction is None:
        trl_utils._ChunkedLogProbFunction = _TorchChunkedLogProb
    tok, _, _, texts, prompt_ids = _plan(args)
    n, k = len(texts), args.k
    if len(set(texts)) != n:
        raise SystemExit("two items render the same prompt: pick other --items")
    cuda = args.device == "cuda"
    per_step_completions = args.prompts_per_step * k
    if per_step_completions % args.micro_batch:
        raise SystemExit("--micro-batch must divide prompts-per-step x k")
    quantization_config = None
    if args.quant == "4bit":
        from transformers import BitsAndBytesConfig

        # medcot's 4-bit settings (medcot/model/load.py), the QLoRA recipe TRL's docs show
        quantization_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True)
    out_dir = tempfile.mkdtemp(prefix="grpo-bench-trl-")
    config = GRPOConfig(
        output_dir=out_dir, max_steps=args.steps, seed=SEED, report_to="none", save_strategy="no", logging_steps=1,
        disable_tqdm=True, use_cpu=not cuda, bf16=cuda,  # bf16 is TRL's default on a GPU
        # TRL loads in float32 unless told: a user of an 8B model passes bf16, as its docs do
        model_init_kwargs={"dtype": torch.bfloat16 if cuda else torch.float32, "attn_implementation": "sdpa"},
        # One optimizer step = prompts_per_step x k completions from ONE generation, as medcot's step:
        # micro-batches of --micro-batch, accumulated; steps_per_generation defaults to the accumulation steps, so
        # the generation batch is the whole step (and no extra "old log-prob" pass is needed: mu=1, aligned).
        per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=per_step_completions // args.micro_batch,
        num_generations=k, num_iterations=1, max_completion_length=args.completion_tokens,
        learning_rate=LEARNING_RATE, beta=BETA,
        loss_type="grpo",  # medcot's default normalisation (TRL's default 'dapo' costs the same)
        shuffle_dataset=False,  # the items in file order, step after step, as medcot is fed here
        # No EOS, as medcot's ignore_eos: every completion max_completion_length tokens (a logits processor)
        generation_kwargs={"min_new_tokens": args.completion_tokens},
        # Kept at TRL's defaults: gradient_checkpointing=True, temperature 1, top_p 1, scale_rewards 'group',
        # mask_truncated_completions False, use_vllm False, use_transformers_continuous_batching False, optim
        # adamw_torch(_fused), max_grad_norm 1.0, epsilon 0.2.
    )
    peft_config = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                             target_modules=TARGETS)
    ds = Dataset.from_dict({"prompt": texts, "prompt_index": list(range(n))})

    def reward(prompts, completions, completion_ids, prompt_index, trainer_state, **_):
        seen: dict[int, int] = {}
        out = []
        for p in prompt_index:  # the generation batch: each prompt k times in a row
            out.append(bench_reward(p, seen.get(p, 0), trainer_state.global_step))
            seen[p] = seen.get(p, 0) + 1
        return out

    deadline = _Deadline(args.deadline, args.warmup + 1)
    steps: list[dict] = []
    cur: dict = {}
    step_prompts: list[list[list[int]]] = []

    class Timer(TrainerCallback):
        """Synchronises around each optimizer step (generation, reference pass, micro-batches, optimizer)."""

        def on_train_begin(self, *a, **kw):
            if cuda:
                torch.cuda.reset_peak_memory_stats()

        def on_step_begin(self, *a, **kw):
            _sync()
            cur.clear()
            cur.update(t0=time.perf_counter(), rollout_s=0.0, generated_tokens=0)

        def on_step_end(self, a, state, control, **kw):
            _sync()
            dt = time.perf_counter() - cur["t0"]
            rec = {"step": state.global_step, "step_s": dt, "rollout_s": cur["rollout_s"],
                   "update_s": dt - cur["rollout_s"], "mem_gib": _mem_gib(),
                   "generated_tokens": cur["generated_tokens"], "trained_tokens": cur["generated_tokens"]}
            steps.append(rec)
            _emit("STEP", rec)
            if state.global_step < args.steps and not deadline.another_fits(dt):
                print(f"[trl] --budget: stopping after step {state.global_step}", flush=True)
                control.should_training_stop = True

    trainer = GRPOTrainer(model=args.model, reward_funcs=reward, args=config, train_dataset=ds, processing_class=tok,
                          peft_config=peft_config, quantization_config=quantization_config, callbacks=[Timer()])
    restricted = _restrict_vocab(trainer.model, tok, args.restrict_vocab)

    # The same prompt ids as medcot's (TRL would tokenize the text itself; medcot's ids are what medcot generates from).
    ids_of = dict(zip(texts, prompt_ids))
    real_tokenize = trainer._tokenize_prompts

    def tokenize(prompts):
        if not all(isinstance(p, str) and p in ids_of for p in prompts):
            return real_tokenize(prompts)
        order = list(dict.fromkeys(prompts))
        step_prompts.append([ids_of[p] for p in order])
        return [list(ids_of[p]) for p in prompts], None, {}

    trainer._tokenize_prompts = tokenize

    # Rollout time: TRL's own generation call (tokenize, transformers generate, decode), timed from outside.
    real_generate = trainer._generate

    def generate(prompts):
        _sync()
        t0 = time.perf_counter()
        out = real_generate(prompts)
        _sync()
        cur["rollout_s"] = cur.get("rollout_s", 0.0) + time.perf_counter() - t0
        cur["generated_tokens"] = cur.get("generated_tokens", 0) + sum(len(c) for c in out[1])
        return out

    trainer._generate = generate
    trainer.train()
    shutil.rmtree(out_dir, ignore_errors=True)
    partial = len(steps) < args.steps
    return {"steps": steps, "partial": partial, "restricted_vocab_rows": restricted,
            "prompt_digests": [prompts_digest(p) for p in step_prompts],
            "settings": {"gradient_checkpointing": trainer.args.gradient_checkpointing, "optim": str(trainer.args.optim),
                         "use_vllm": trainer.args.use_vllm, "loss_type": trainer.args.loss_type,
                         "steps_per_generation": trainer.args.steps_per_generation,
                         "generation_batch_size": trainer.args.generation_batch_size,
                         "per_device_train_batch_size": args.micro_batch,
                         "gradient_accumulation_steps": trainer.args.gradient_accumulation_steps}}


def child(args) -> None:
    import torch

    run = run_medcot if args.stack.startswith("medcot") else run_trl
    t0 = time.time()
    res = run(args)
    res.update(stack=args.stack, quant=args.quant, wall_s=round(time.time() - t0, 1),
               device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2) if torch.cuda.is_available() else None)
    _emit("RESULT", res)


# ---------------------------------------------------------------------------------------------


def collect(stack: str, quant: str, stdout: str, warmup: int, error: str | None) -> dict:
    """A stack's result from its output: the RESULT line, else the STEP lines printed before it stopped."""
    lines = stdout.splitlines()
    steps = [json.loads(x[5:]) for x in lines if x.startswith("STEP ")]
    found = [json.loads(x[7:]) for x in lines if x.startswith("RESULT ")]
    raw = found[-1] if found else {"steps": steps, "partial": True}
    res = {**{k: v for k, v in raw.items() if k != "steps"}, **finalize(stack, raw["steps"], warmup), "quant": quant,
           "steps": raw["steps"]}
    if not found:
        res["error"] = (error or "no RESULT line")[-1500:]
    return res


def _write(path: str | None, meta: dict, results: list[dict]) -> None:
    if path:
        summary = compare(results)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({**meta, "summary": summary, "results": results}, indent=2))


def _weights_note(model: str) -> str:
    try:
        cfg = json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError):
        return "unknown"
    return cfg.get("medcot_note", "from the model folder (not marked random)")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.grpo_throughput", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model folder (bench/make_random_model.py; --tiny on CPU)")
    ap.add_argument("--items", required=True, help="questions in medcot's eval item format (.jsonl)")
    ap.add_argument("--quant", choices=["4bit", "none"], default="4bit")
    ap.add_argument("--stacks", default="medcot,trl", help="comma-separated: medcot, trl")
    ap.add_argument("--prompts-per-step", type=int, default=4)
    ap.add_argument("--k", type=int, default=8, help="completions per prompt (the group)")
    ap.add_argument("--completion-tokens", type=int, default=512)
    ap.add_argument("--micro-batch", type=int, default=8, help="completions per forward/backward of the update (both)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1, help="first steps left out of the medians")
    ap.add_argument("--val-size", type=int, default=2, help="medcot's held-out items (greedy answers before/after)")
    ap.add_argument("--restrict-vocab", choices=["auto", "off"], default="auto",
                    help="auto: block LM-head rows past the tokenizer in both stacks (see above)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per stack")
    ap.add_argument("--budget", type=int, default=0, help="seconds for the whole invocation (0: none), shared equally "
                    "by the stacks still to run; a stack stops after the step past which the next would not fit in its "
                    "share, and one with less than --min-stack-s left is skipped")
    ap.add_argument("--min-stack-s", type=int, default=60)
    ap.add_argument("--log-dir", help="keep each stack's full output here")
    ap.add_argument("--out", help="write all results as JSON here (after every stack)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--stack", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=float("inf"), help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.warmup >= args.steps:
        ap.error("--warmup must be below --steps: nothing would be timed")
    if (args.prompts_per_step * args.k) % args.micro_batch:
        ap.error("--micro-batch must divide prompts-per-step x k")
    if args.child:
        child(args)
        return {}

    t_start = time.time()
    stacks = [s.strip() for s in args.stacks.split(",") if s.strip()]
    for s in stacks:
        if not re.fullmatch(r"medcot(-mbt\d+)?|trl", s):
            ap.error(f"unknown stack {s!r} (medcot, medcot-mbtN, trl)")
    worker_argv = list(argv if argv is not None else sys.argv[1:])
    meta = {"bench": "grpo_throughput", "date": datetime.date.today().isoformat(),
            "command": "python -m bench.grpo_throughput " + shlex.join(worker_argv), "stacks": stacks,
            "model": args.model, "weights": _weights_note(args.model), "items": Path(args.items).name,
            "quant": args.quant, "device": None, "versions": versions(PACKAGES),
            "shape": {"prompts_per_step": args.prompts_per_step, "k": args.k, "completion_tokens": args.completion_tokens,
                      "micro_batch": args.micro_batch, "steps": args.steps, "warmup": args.warmup},
            "same_settings": {"lora": "r=16 alpha=16 dropout 0, " + ",".join(TARGETS), "learning_rate": LEARNING_RATE,
                              "beta": BETA, "iterations": 1, "loss_type": "grpo", "gradient_checkpointing": True,
                              "temperature": 1.0, "eos": "blocked", "reward": "bench_reward(prompt, completion, step)"}}
    results: list[dict] = []
    for i, stack in enumerate(stacks):
        left = args.budget - (time.time() - t_start) if args.budget else float(args.timeout)
        if left < args.min_stack_s:
            results.append({"stack": stack, "quant": args.quant, "skipped": f"time budget ({left:.0f}s left)"})
            print(f"=== {stack} ({args.quant}) skipped: {left:.0f}s left", flush=True)
            continue
        # With --budget, an equal share of what is left: what a stack does not use goes to the next ones.
        limit = min(args.timeout, left / (len(stacks) - i)) if args.budget else args.timeout
        run_dir = tempfile.mkdtemp(prefix=f"grpo-bench-{stack}-")
        # The child stops itself after a step when the next would pass its deadline (with room to tear down);
        # the hard timeout is the backstop.
        cmd = [sys.executable, "-m", "bench.grpo_throughput", *worker_argv, "--child", "--stack", stack,
               "--deadline", str(time.time() + limit - min(30.0, 0.1 * limit)), "--run-dir", run_dir]
        print(f"=== {stack} ({args.quant}) at {time.time() - t_start:.0f}s, {limit:.0f}s for it", flush=True)
        t0 = time.time()
        error = None
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        try:
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=limit, cwd=REPO, env=env)
            stdout, stderr = proc.stdout, proc.stderr
            if proc.returncode:
                error = f"exit {proc.returncode}\n{stderr[-1500:]}"
        except subprocess.TimeoutExpired as e:
            stdout = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
            error = f"timed out after {limit:.0f}s\n{stderr[-1000:]}"
        if args.log_dir:
            Path(args.log_dir).mkdir(parents=True, exist_ok=True)
            (Path(args.log_dir) / f"{args.quant}_{stack}.log").write_text(stdout + "\n--- stderr\n" + stderr)
        shutil.rmtree(run_dir, ignore_errors=True)  # medcot's run folder (checkpoint, adapter, report)
        results.append(collect(stack, args.quant, stdout, args.warmup, error))
        results[-1]["process_s"] = round(time.time() - t0, 1)
        meta["device"] = meta.get("device") or results[-1].get("device")
        brief = {k: v for k, v in results[-1].items() if k not in ("steps", "settings")}
        print(json.dumps(brief)[:1500], flush=True)
        _write(args.out, meta, results)
    summary = compare(results)
    print("\n" + table(results))
    print(json.dumps(summary))
    _write(args.out, meta, results)
    return {**meta, "summary": summary, "results": results}


if __name__ == "__main__":
    main()
