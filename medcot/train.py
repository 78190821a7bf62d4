"""Train: the supervised chain-of-thought fine-tune, read top to bottom.

    medcot train --config configs/demo-cpu.yaml            # embedded model, CPU, minutes
    medcot train --config configs/r1-distill-llama-8b.yaml # the seed recipe on a CUDA GPU
    medcot train --resume runs/20261125-101500             # continue an interrupted run

resolve config → data → prompt/tokenize → model + LoRA → answers and val loss before → fit
(checkpoints, metrics) → save adapter → answers and val loss after → report.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from . import report
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, write_atomic, write_dir_atomic
from .collate import count_loss_tokens, micro_batches, pack_collate, pad_collate, rows_for_step
from .config import Config, load_config
from .data import load_records, split_records
from .eval.run import evaluate_for_train
from .fast import apply_fused_kernels, fast_path_enabled, limit_checkpointing, use_packed_attention
from .generate import generate, split_reasoning
from .model import attach_lora, load_base
from .prompts import Encoded, PromptFormatter, encode_records
from .tracking import Tracker

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss or gradient became NaN/inf; the last good checkpoint is kept."""


class TrainingInterrupted(RuntimeError):
    """Ctrl-C / SIGTERM: the run saved a checkpoint and can be resumed."""


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    val_loss_before: float | None
    val_loss_after: float | None
    answers_before: list[str] = field(default_factory=list)
    answers_after: list[str] = field(default_factory=list)
    eval_before: dict = field(default_factory=dict)  # per-benchmark scores (eval.train_eval_limit items)
    eval_after: dict = field(default_factory=dict)
    wall_s: float = 0.0
    tokens_per_s: float = 0.0
    peak_mem_gib: float = 0.0


def train(cfg: Config | None = None, resume: str | Path | None = None, on_log: Callable[[str], None] = log.info) -> TrainResult:
    """Run (or resume) a fine-tune and write the run folder.

    Raises:
        TrainingDiverged: NaN/inf loss; the last good checkpoint stays on disk.
        TrainingInterrupted: SIGINT/SIGTERM; a checkpoint was saved first.
    """
    t_start = time.time()
    # -- Run folder ---------------------------------------------------------------------------
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").is_file():
            raise FileNotFoundError(f"{run_dir} is not a medcot run folder (no config.yaml); cannot resume")
        cfg = load_config(run_dir / "config.yaml")  # the run's own config: a resumed run must not change recipe
    else:
        assert cfg is not None, "train() needs a config or a run folder to resume"
        name = cfg.train.run_name or datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path(cfg.train.output_dir) / name
        if run_dir.exists() and any(run_dir.iterdir()):
            raise FileExistsError(f"{run_dir} already exists; pick another train.run_name or resume it with --resume {run_dir}")
    t = cfg.train
    torch.manual_seed(t.seed)  # LoRA's A matrices are drawn from this: same seed, same start

    # -- Data ---------------------------------------------------------------------------------
    loaded = load_records(cfg.data)
    splits = split_records(loaded.records, cfg.data)
    on_log(f"data: {len(loaded.records)} rows from {loaded.source} ({len(loaded.skipped)} bad rows skipped); "
           f"train {len(splits.train)}, validation {len(splits.val)}")

    # -- Model and tokens ---------------------------------------------------------------------
    model, tokenizer, model_info = load_base(cfg.model)
    formatter = PromptFormatter(tokenizer, cfg.prompt)
    train_rows, lengths = encode_records(formatter, splits.train, t.max_seq_length, cfg.data.overlong)
    val_rows, _ = encode_records(formatter, splits.val, t.max_seq_length, "truncate")
    on_log(f"tokens: {lengths.summary()}")
    if not train_rows:
        raise ValueError(f"No training rows fit train.max_seq_length={t.max_seq_length}; raise it or set data.overlong=truncate")
    device = next(model.parameters()).device
    packing = fast_path_enabled(t.fast_path, device)
    kernels = apply_fused_kernels(model, device) if packing else []
    if packing and not t.gradient_checkpointing:
        # Varlen flash attention skips all cross-row work, but on the H100/H200 runs in
        # docs/benchmarks.md activation recompute did not engage around it (peak memory did not move
        # with train.checkpoint_ratio). With checkpointing on, packed rows use transformers'
        # block-diagonal SDPA mask instead, which keeps memory bounded.
        use_packed_attention(model)
    model = attach_lora(model, cfg.lora, t.gradient_checkpointing)
    n_ckpt = limit_checkpointing(model, t.checkpoint_ratio) if t.gradient_checkpointing else 0
    on_log(f"fast path: {'on' if packing else 'off'} (packing {'on' if packing else 'off'}, "
           f"kernels: {', '.join(kernels) or 'none'}); activation recompute in {n_ckpt} layers")
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    on_log(f"model: {model_info['path']} on {model_info['device']} ({model_info['dtype']}, "
           f"quantization {model_info['quantization']}); trainable {n_trainable:,} of {n_total:,} parameters")

    # -- Optimizer and schedule ---------------------------------------------------------------
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _make_optimizer(params, cfg)
    scheduler = _make_scheduler(optimizer, cfg)
    autocast = autocast_for(device, model_info["dtype"])

    if resume is None:  # only now: a setup error (bad data, model, optimizer) must not leave a half-made run folder
        write_atomic(run_dir / "config.yaml", cfg.to_yaml())

    # -- Resume or start ----------------------------------------------------------------------
    start_step = 0
    state: dict = {}
    ckpt = latest_checkpoint(run_dir) if resume is not None else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer, scheduler)
        start_step = state["step"]
        on_log(f"resumed from {ckpt} at step {start_step}/{t.max_steps}")
    elif resume is not None:
        on_log(f"no checkpoint in {run_dir}; starting it from step 0")
    sample_q = splits.val[: t.sample_questions]
    if "val_loss_before" not in state:
        # LoRA's B matrices start at zero, so the wrapped model is still exactly the base model here.
        state["val_loss_before"] = validation_loss(model, val_rows, tokenizer.pad_token_id, t.per_device_batch_size, autocast)
        state["answers_before"] = _answer(model, tokenizer, formatter, sample_q, cfg)
        state["eval_before"] = evaluate_for_train(model, tokenizer, cfg)  # {} unless eval.train_eval_limit > 0
        on_log(f"before: validation loss {state['val_loss_before']:.4f}")
    tracker = Tracker(run_dir, t.report_to, t.wandb_project, run_dir.name, cfg.to_dict(), resume_step=start_step)

    # -- Fit ----------------------------------------------------------------------------------
    stop = _StopFlag()
    rows_per_step = t.per_device_batch_size * t.gradient_accumulation_steps
    tokens_seen, fit_time = state.get("tokens_seen", 0), state.get("fit_time", 0.0)
    wall_before = state.get("wall_s", 0.0)  # time spent by earlier, interrupted attempts
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    pbar = tqdm(total=t.max_steps, initial=start_step, desc="train", unit="step", disable=None)
    with stop.installed(), pbar:
        for step in range(start_step, t.max_steps):
            t0 = time.perf_counter()
            idx = rows_for_step(len(train_rows), step, rows_per_step, t.seed)
            rows = [train_rows[i] for i in idx]
            step_loss = train_step(model, rows, t, tokenizer.pad_token_id, packing, autocast)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm if t.max_grad_norm > 0 else float("inf"))
            if not (math.isfinite(step_loss) and math.isfinite(float(grad_norm))):
                last = latest_checkpoint(run_dir)
                tracker.close()
                raise TrainingDiverged(
                    f"step {step + 1}: loss {step_loss} / grad norm {float(grad_norm)} is not finite. "
                    f"Last good checkpoint: {last or 'none'}. Lower train.learning_rate or use model.dtype=bf16/fp32."
                )
            lr = scheduler.get_last_lr()[0]  # the rate this step used, before the schedule advances
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            fit_time += dt
            pbar.update(1)
            pbar.set_postfix(loss=f"{step_loss:.3f}")
            n_tokens = sum(len(r.input_ids) for r in rows)
            tokens_seen += n_tokens
            if (step + 1) % t.logging_steps == 0 or step + 1 == t.max_steps:
                metrics = {
                    "loss": step_loss,
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                    "tokens_per_s": n_tokens / dt,
                    "step_time_s": dt,
                    "epoch": (step + 1) * rows_per_step / len(train_rows),
                    "mem_gib": _peak_mem_gib(device),
                }
                tracker.log(metrics, step=step + 1)
                on_log(f"step {step + 1}/{t.max_steps} | loss {step_loss:.4f} | lr {metrics['lr']:.2e} | "
                       f"grad {metrics['grad_norm']:.3f} | tok/s {metrics['tokens_per_s']:,.0f} | mem {metrics['mem_gib']:.2f} GiB")
            state.update(tokens_seen=tokens_seen, fit_time=fit_time, wall_s=wall_before + time.time() - t_start)
            done = step + 1 == t.max_steps
            if (t.save_steps and (step + 1) % t.save_steps == 0) or stop.requested or done:
                save_checkpoint(run_dir, step + 1, model, optimizer, scheduler, state)
            if stop.requested and not done:
                tracker.close()
                raise TrainingInterrupted(
                    f"Interrupted by {stop.requested}; checkpoint saved at step {step + 1}. "
                    f"Resume with: medcot train --resume {run_dir}"
                )

    # -- Save the adapter ---------------------------------------------------------------------
    model.eval()
    _save_adapter(model, tokenizer, run_dir)

    # -- After --------------------------------------------------------------------------------
    val_loss_after = validation_loss(model, val_rows, tokenizer.pad_token_id, t.per_device_batch_size, autocast)
    answers_after = _answer(model, tokenizer, formatter, sample_q, cfg)
    eval_after = evaluate_for_train(model, tokenizer, cfg)
    on_log(f"after: validation loss {val_loss_after:.4f} (before {state['val_loss_before']:.4f})")
    result = TrainResult(
        run_dir=run_dir,
        steps=t.max_steps,
        val_loss_before=state["val_loss_before"],
        val_loss_after=val_loss_after,
        answers_before=state["answers_before"],
        answers_after=answers_after,
        eval_before=state.get("eval_before", {}),
        eval_after=eval_after,
        wall_s=wall_before + time.time() - t_start,
        tokens_per_s=tokens_seen / fit_time if fit_time else 0.0,
        peak_mem_gib=_peak_mem_gib(device),
    )
    tracker.summary({"val_loss_before": result.val_loss_before, "val_loss_after": result.val_loss_after})
    tracker.close()

    # -- Report -------------------------------------------------------------------------------
    report.write_run_report(
        run_dir, cfg, result,
        questions=[r.question for r in sample_q],
        references=[r.answer for r in sample_q],
        lengths=lengths,
        data_source=loaded.source,
        n_skipped=len(loaded.skipped),
        model_info=model_info,
        n_trainable=n_trainable,
        tracker_backend=tracker.backend,
    )
    return result


def train_step(model, rows: list[Encoded], t, pad_id: int, packing: bool, autocast) -> float:
    """Forward and backward over one optimizer step's rows; returns the step's loss.

    The loss is normalised by the response tokens of the whole step, not per micro-batch, so every
    response token weighs the same however the rows are grouped into micro-batches (padded pairs or
    packed sequences): the fast and plain paths optimise the same objective.
    """
    device = next(model.parameters()).device
    n_loss_tokens = count_loss_tokens(rows)
    step_loss = torch.zeros((), device=device)
    for group in micro_batches(rows, t.per_device_batch_size, packing, t.micro_batch_tokens):
        batch = pack_collate(group) if packing else pad_collate(group, pad_id)
        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        with autocast:
            loss = model(**batch, num_items_in_batch=n_loss_tokens).loss
        loss.backward()
        step_loss += loss.detach()  # stays on the device: no CPU-GPU sync per micro-batch
    return float(step_loss)  # one sync per step


# ---------------------------------------------------------------------------------------------
# Helpers, in the order the loop uses them.


def _make_optimizer(params, cfg: Config) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise RuntimeError("train.optimizer=adamw_8bit needs bitsandbytes on CUDA; use train.optimizer=adamw") from e
        return bnb.optim.AdamW8bit(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)


def _make_scheduler(optimizer, cfg: Config):
    from transformers import get_scheduler

    return get_scheduler(
        cfg.train.lr_scheduler if cfg.train.lr_scheduler != "constant" else "constant_with_warmup",
        optimizer, num_warmup_steps=cfg.train.warmup_steps, num_training_steps=cfg.train.max_steps,
    )


def autocast_for(device: torch.device, dtype: str):
    # Autocast only for 16-bit compute on GPU: the frozen base is already in that dtype, the LoRA
    # weights stay fp32 (PEFT's default) as the optimizer's master copy.
    if device.type == "cuda" and dtype in ("bfloat16", "float16"):
        return torch.autocast("cuda", dtype=getattr(torch, dtype))
    return torch.autocast(device.type, enabled=False)


@torch.no_grad()
def validation_loss(model, rows: list[Encoded], pad_id: int, batch_size: int, autocast) -> float:
    """Mean loss per response token over the validation rows."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, n = 0.0, 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        k = count_loss_tokens(chunk)
        batch = {k_: v.to(device) for k_, v in pad_collate(chunk, pad_id).items()}
        with autocast:
            total += model(**batch, num_items_in_batch=k).loss.item() * k
        n += k
    model.train(was_training)
    return total / max(n, 1)


def _answer(model, tokenizer, formatter: PromptFormatter, records, cfg: Config) -> list[str]:
    was_training = model.training
    model.eval()
    model.config.use_cache = True
    prompts = [formatter.encode_prompt(r.question) for r in records]
    outs = generate(model, tokenizer, prompts, cfg.generate)
    model.config.use_cache = False
    model.train(was_training)
    return [o.text for o in outs]


def _save_adapter(model, tokenizer, run_dir: Path) -> None:
    """Adapter in PEFT format + tokenizer, written to a temporary folder and renamed."""
    with write_dir_atomic(run_dir / "adapter") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def _peak_mem_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class _StopFlag:
    """Turns the first SIGINT/SIGTERM into a request to checkpoint and stop after the current step."""

    def __init__(self):
        self.requested: str | None = None

    def _handler(self, signum, frame):
        if self.requested:  # a second Ctrl-C means "now"
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        log.warning("%s received: finishing this step, saving a checkpoint, then stopping", self.requested)

    def installed(self):
        import contextlib
        import threading

        @contextlib.contextmanager
        def _ctx():
            if threading.current_thread() is not threading.main_thread():
                yield self  # signals can only be caught in the main thread
                return
            old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
            for s in old:
                signal.signal(s, self._handler)
            try:
                yield self
            finally:
                for s, h in old.items():
                    signal.signal(s, h)

        return _ctx()
