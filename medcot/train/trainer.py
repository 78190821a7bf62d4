"""The trainer: one optimizer loop shared by every stage (SFT, continued pre-training), read top to bottom.

A stage builds a `Trainer` (LoRA attached, fast path chosen, wrapped for DDP/FSDP), calls `fit` with its
encoded rows, then `save_adapter` and `result`. `fit` resumes from the stage folder's newest checkpoint,
runs `train_step` per optimizer step (loss normalised over the whole step's response tokens), logs,
checkpoints atomically, and stops cleanly on Ctrl-C / SIGTERM after saving. Outside the loop (setup, the
before and after phases) `interrupt_on_signal` stops a command at once: nothing there is worth finishing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from medcot.config import Config
from medcot.data.collate import (
    count_loss_tokens,
    micro_batches,
    pack_collate,
    pad_collate,
    rows_for_step,
)
from medcot.data.prompts import Encoded
from medcot.errors import Interrupted, SetupError, TrainingDiverged
from medcot.io import write_atomic, write_dir_atomic
from medcot.model.load import attach_lora
from medcot.train import distributed
from medcot.train.checkpoint import (
    FitState,
    discard_unfinished,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from medcot.train.distributed import World
from medcot.train.fast import (
    apply_fused_kernels,
    fast_path_enabled,
    limit_checkpointing,
    offload_checkpointing,
    skip_optimizer_syncs,
    use_packed_attention,
)
from medcot.train.lora_fused import fuse_lora
from medcot.train.memory import GiB, MemoryBudget
from medcot.train.tracking import Tracker

log = logging.getLogger(__name__)


# A benchmark eval run before and after training (`eval.train_eval_limit`): (model, tokenizer, cfg) ->
# {benchmark: scores}. The eval stage sits above training, so `medcot train` is handed it by the CLI
# (`medcot.eval.run.evaluate_for_train`) instead of importing it.
Evaluator = Callable[[torch.nn.Module, object, Config], dict]


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
    recompute: dict = field(default_factory=dict)  # layers that recomputed / offloaded; the memory budget, if any


@dataclass
class Trainer:
    """A model ready to train on this process: LoRA attached, fast path chosen, wrapped for DDP/FSDP."""

    model: torch.nn.Module  # the PeftModel (sharded in place under FSDP): generate and evaluate with it
    engine: torch.nn.Module  # what forward/backward run through (DDP wrapper, or the model itself)
    cfg: Config
    world: World
    run_root: Path  # the run folder (config.yaml); a stage may train in a subfolder of it
    device: torch.device
    packing: bool
    autocast: object
    on_log: Callable[[str], None]
    started: float  # time.time() when this session began the stage (data and model loading included)
    n_trainable: int = 0
    tracker_backend: str = "none"
    memory: MemoryBudget | None = None  # train.memory_budget_gib on CUDA: it sets the recompute each step
    recompute: dict = field(default_factory=dict)
    _tracker: Tracker | None = None
    _clock: float = 0.0  # `started`, moved back by the time earlier sessions spent up to the checkpoint resumed

    @classmethod
    def build(cls, model, cfg: Config, world: World, run_root: Path, on_log, started: float,
              lora_extra: dict | None = None) -> "Trainer":
        t = cfg.train
        device = next(model.parameters()).device
        packing = fast_path_enabled(t.fast_path, device)
        kernels = apply_fused_kernels(model, device) if packing else []
        if packing:
            use_packed_attention(model)  # attention row by row (varlen): no work across packed rows
        budget = t.memory_budget_gib if device.type == "cuda" else None
        if t.memory_budget_gib is not None and budget is None:
            on_log(f"train.memory_budget_gib is a budget of CUDA memory: ignored on {device.type}")
        model = attach_lora(model, cfg.lora, t.gradient_checkpointing or budget is not None, **(lora_extra or {}))
        if packing:  # x Wᵀ + s·(x Aᵀ)Bᵀ as one autograd function per projection, without PEFT's casts and clone
            on_log(f"fast path: LoRA fused into the base matmul in {fuse_lora(model)} linear layers")
        memory = None
        if budget is not None:  # every layer recomputes until the fit's first step is measured (train/memory.py)
            memory = MemoryBudget(model, budget, world, on_log)
            n_ckpt, n_off = memory.plan.recompute, 0
        else:
            n_ckpt = limit_checkpointing(model, t.checkpoint_ratio) if t.gradient_checkpointing else 0
            n_off = offload_checkpointing(model) if n_ckpt and t.offload_activations else 0
        on_log(f"fast path: {'on' if packing else 'off'} (packing {'on' if packing else 'off'}, "
               f"kernels: {', '.join(kernels) or 'none'}); activation recompute in {n_ckpt} layers"
               + (f", their inputs kept in host memory in {n_off}" if n_off else "")
               + (" until train.memory_budget_gib chooses" if memory else ""))
        n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_total = sum(p.numel() for p in model.parameters())
        on_log(f"model: {device}, trainable {n_trainable:,} of {n_total:,} parameters")
        engine = distributed.wrap(model, world)
        dtype = str(next(p for p in model.parameters() if not p.requires_grad).dtype).removeprefix("torch.")
        return cls(model=model, engine=engine, cfg=cfg, world=world, run_root=run_root, device=device, packing=packing,
                   autocast=autocast_for(device, dtype), on_log=on_log, started=started, n_trainable=n_trainable,
                   memory=memory, recompute={"layers": len(model.get_decoder().layers), "recompute_layers": n_ckpt,
                                             "offload_layers": n_off})

    def fit(self, rows: list[Encoded], stage_dir: Path, max_steps: int, lr: float, pad_id: int,
            before: Callable[[], dict]) -> FitState:
        """The optimizer loop, resuming from `stage_dir`'s newest checkpoint; returns the stage's state.

        `before` runs once per stage (its results are checkpointed): the measurements on the untrained model.
        """
        t, world, on_log = self.cfg.train, self.world, self.on_log
        params = [p for p in self.engine.parameters() if p.requires_grad]
        optimizer = make_optimizer(params, t.optimizer, lr, t.weight_decay)
        skip_optimizer_syncs(optimizer)  # 8-bit AdamW's per-tensor device syncs: same update, no host stalls
        scheduler = make_scheduler(optimizer, t.lr_scheduler, t.warmup_steps, max_steps)
        if world.main:
            discard_unfinished(stage_dir)
            # The run folder got its config.yaml at the start (train.run); a stage subfolder gets its own copy,
            # so ask/eval/export accept it as a run folder too.
            if not (stage_dir / "config.yaml").is_file():
                write_atomic(stage_dir / "config.yaml", self.cfg.to_yaml())
        state = FitState()
        if (ckpt := latest_checkpoint(stage_dir)) is not None:
            state = load_checkpoint(ckpt, self.engine, optimizer, scheduler)
            on_log(f"resumed from {ckpt} at step {state.step}/{max_steps}")
        self._clock = self.started - state.wall_s
        if not state.before:
            state.before = before()
        if world.main:
            root = self.run_root
            name = root.name if root == stage_dir else f"{root.name}-{stage_dir.name}"
            self._tracker = Tracker(stage_dir, t.report_to, t.wandb_project, name, self.cfg.to_dict(),
                                    resume_step=state.step)
            self.tracker_backend = self._tracker.backend

        stop = StopFlag()
        rows_per_step = distributed.rows_per_step(t, world)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.memory is not None:  # the rows of every step to come: the largest micro-batch must fit too
            self.memory.start(([rows[i] for i in rows_for_step(len(rows), s, rows_per_step, t.seed)]
                               for s in range(state.step, max_steps)), t, self.packing)
        self.engine.train()
        pbar = tqdm(total=max_steps, initial=state.step, desc=stage_dir.name, unit="step", disable=None if world.main else True)
        with stop.installed(), pbar:
            for step in range(state.step, max_steps):  # `step` counts from 0; state.step is updates done
                t0 = time.perf_counter()
                idx = rows_for_step(len(rows), step, rows_per_step, t.seed)
                step_rows = [rows[i] for i in idx]
                step_loss = train_step(self.engine, step_rows, t, pad_id, self.packing, self.autocast, world)
                grad_norm = float(distributed.full_tensor(
                    torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm if t.max_grad_norm > 0 else float("inf"))))
                if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
                    self._close()
                    raise TrainingDiverged(
                        f"step {step + 1}: loss {step_loss} / grad norm {grad_norm} is not finite. "
                        f"Last good checkpoint: {latest_checkpoint(stage_dir) or 'none'}. "
                        "Lower train.learning_rate or use model.dtype=bf16/fp32."
                    )
                lr_now = scheduler.get_last_lr()[0]  # the rate this step used, before the schedule advances
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                # This step's peak sets the recompute of the next ones (train.memory_budget_gib).
                recompute = self.memory.after_step(step_rows) if self.memory is not None else {}
                state.step = step + 1
                dt = time.perf_counter() - t0
                state.fit_time += dt
                pbar.update(1)
                pbar.set_postfix(loss=f"{step_loss:.3f}")
                n_tokens = sum(len(r.input_ids) for r in step_rows)  # the whole step, all processes
                state.tokens_seen += n_tokens
                if state.step % t.logging_steps == 0 or state.step == max_steps:
                    metrics = {"loss": step_loss, "lr": lr_now, "grad_norm": grad_norm, "tokens_per_s": n_tokens / dt,
                               "step_time_s": dt, "epoch": state.step * rows_per_step / len(rows),
                               "mem_gib": self.peak_gib(), **recompute}
                    if self._tracker is not None:
                        self._tracker.log(metrics, step=state.step)
                    on_log(f"step {state.step}/{max_steps} | loss {step_loss:.4f} | lr {lr_now:.2e} | "
                           f"grad {grad_norm:.3f} | tok/s {metrics['tokens_per_s']:,.0f} | mem {metrics['mem_gib']:.2f} GiB")
                done = state.step == max_steps
                stop_now = distributed.broadcast(stop.requested, world)  # every rank stops at the same step
                if (t.save_steps and state.step % t.save_steps == 0) or stop_now or done:
                    state.wall_s = self.elapsed()
                    save_checkpoint(stage_dir, self.engine, optimizer, scheduler, state, world)
                if stop_now:  # at the last step too: the after phase can take long, and resumes from here
                    self._close()
                    raise Interrupted(
                        f"Interrupted by {stop_now}; checkpoint saved at step {state.step}. "
                        f"Resume with: medcot train --resume {self.run_root}"
                    )
        self.engine.eval()
        return state

    def elapsed(self) -> float:
        """The stage's wall time: this session's so far, plus what earlier sessions spent up to the
        checkpoint it resumed from (work they did after it was redone here, so it is not counted twice)."""
        return time.time() - self._clock

    def peak_gib(self) -> float:
        """Peak memory since the loop began (the memory budget resets CUDA's counter every step; it keeps the
        maximum)."""
        return max(peak_mem_gib(self.device), self.memory.peak / GiB if self.memory is not None else 0.0)

    def save_adapter(self, tokenizer, run_dir: Path) -> None:
        """Adapter in PEFT format + tokenizer, written to a temporary folder and renamed (rank 0)."""
        weights = distributed.trainable_state(self.engine)  # collective: every rank takes part
        if self.world.main:
            with write_dir_atomic(run_dir / "adapter") as tmp:
                self.model.save_pretrained(tmp, state_dict=weights)
                tokenizer.save_pretrained(tmp)
        distributed.barrier(self.world)  # the next stage reads it

    def result(self, run_dir: Path, state: FitState, val_loss_after: float, **extra) -> TrainResult:
        """The stage's result from the fit state; closes the tracker with the before/after summary."""
        result = TrainResult(
            run_dir=run_dir,
            steps=state.step,
            val_loss_before=state.before["val_loss_before"],
            val_loss_after=val_loss_after,
            wall_s=self.elapsed(),
            tokens_per_s=state.tokens_seen / state.fit_time if state.fit_time else 0.0,
            peak_mem_gib=self.peak_gib(),
            recompute=self.memory.summary() if self.memory is not None else self.recompute,
            **extra,
        )
        if self._tracker is not None:
            self._tracker.summary({"val_loss_before": result.val_loss_before, "val_loss_after": result.val_loss_after})
        self._close()
        return result

    def _close(self) -> None:
        if self._tracker is not None:
            self._tracker.close()
            self._tracker = None


def train_step(model, rows: list[Encoded], t, pad_id: int, packing: bool, autocast, world: World = World()) -> float:
    """Forward and backward over one optimizer step's rows; returns the step's loss.

    The loss is normalised by the response tokens of the whole step, not per micro-batch or per
    process, so every response token weighs the same however the rows are grouped into micro-batches
    (padded pairs or packed sequences) and shared among processes: the fast and plain paths, on one
    GPU or several, optimise the same objective.
    """
    device = next(model.parameters()).device
    n_loss_tokens = count_loss_tokens(rows)  # of the whole step: every rank knows all of its rows
    per_rank = [micro_batches(hand, t.per_device_batch_size, packing, t.micro_batch_tokens)
                for hand in distributed.deal_rows(rows, world.size)]
    # Every rank must run as many forward/backward passes (FSDP gathers weights in each).
    groups = distributed.equal_groups(per_rank[world.rank], [len(g) for g in per_rank])
    step_loss = torch.zeros((), device=device)
    for i, group in enumerate(groups):
        batch = pack_collate(group) if packing else pad_collate(group, pad_id)
        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        with distributed.accumulating(model, world, sync=i == len(groups) - 1), autocast:
            loss = model(**batch, num_items_in_batch=n_loss_tokens).loss
            # DDP and FSDP average gradients over processes; each process holds only its share of the sum.
            (loss * world.size).backward()
        step_loss += loss.detach()  # stays on the device: no CPU-GPU sync per micro-batch
    return float(distributed.sum_across(step_loss, world))  # one sync per step


# ---------------------------------------------------------------------------------------------
# Helpers, in the order the loop uses them.


def make_optimizer(params, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise SetupError("train.optimizer=adamw_8bit needs bitsandbytes on CUDA; use train.optimizer=adamw") from e
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def make_scheduler(optimizer, kind: str, warmup_steps: int, max_steps: int):
    from transformers import get_scheduler

    return get_scheduler(kind if kind != "constant" else "constant_with_warmup", optimizer,
                         num_warmup_steps=warmup_steps, num_training_steps=max_steps)


def autocast_for(device: torch.device, dtype: str):
    # Autocast only for 16-bit compute on GPU: the frozen base is already in that dtype, the LoRA
    # weights stay fp32 (PEFT's default) as the optimizer's master copy.
    if device.type == "cuda" and dtype in ("bfloat16", "float16"):
        return torch.autocast("cuda", dtype=getattr(torch, dtype))
    return torch.autocast(device.type, enabled=False)


@torch.no_grad()
def validation_loss(model, rows: list[Encoded], pad_id: int, batch_size: int, autocast,
                    desc: str | None = None) -> float:
    """Mean loss per response token over the validation rows (per token, for pre-training blocks).

    `desc`: label of a progress bar over the batches (none without it).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, n = 0.0, 0
    for i in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch", disable=None if desc else True):
        chunk = rows[i : i + batch_size]
        k = count_loss_tokens(chunk)
        # Pre-training blocks are full (no padding) and hold several documents: pack them so that
        # positions restart and attention stops at each document's end, as in training.
        collated = pack_collate(chunk) if chunk[0].doc_lens else pad_collate(chunk, pad_id)
        batch = {k_: v.to(device) if torch.is_tensor(v) else v for k_, v in collated.items()}
        with autocast:
            total += model(**batch, num_items_in_batch=k).loss.item() * k
        n += k
    model.train(was_training)
    return total / max(n, 1)


def finished(run_dir: Path) -> TrainResult | None:
    """The result of a stage that already completed in `run_dir` (resuming a multi-stage run)."""
    path = run_dir / "result.json"
    if not path.is_file():
        return None
    return TrainResult(**{**json.loads(path.read_text()), "run_dir": run_dir})  # the folder may have moved


def mark_finished(run_dir: Path, result: TrainResult) -> None:
    write_atomic(run_dir / "result.json", json.dumps({**asdict(result), "run_dir": run_dir.name}, indent=2))


def peak_mem_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class StopFlag:
    """In the optimizer loop: the first SIGINT/SIGTERM asks to finish the current step, save a checkpoint and stop.

    Ctrl-C pressed again (a SIGINT over a second later) means "now". A repeated SIGTERM, or a SIGINT right
    behind the first, does not: launchers such as torchrun pass on the signal their workers already got.
    """

    def __init__(self):
        self.requested: str | None = None
        self._at = 0.0

    def _handler(self, signum, frame):
        if self.requested:
            if signum == signal.SIGINT and time.monotonic() - self._at > 1.0:
                raise KeyboardInterrupt
            return
        self.requested, self._at = signal.Signals(signum).name, time.monotonic()
        log.warning("%s received: finishing this step, saving a checkpoint, then stopping", self.requested)

    def installed(self):
        return _handling(self._handler)


class _Signalled(KeyboardInterrupt):
    """What `interrupt_on_signal`'s handler raises. A KeyboardInterrupt, as Python's own for SIGINT, because
    code it passes through lets only that (and SystemExit) by: a failed generation step ends its requests
    (`except Exception`), tqdm's logging handler swallows everything else."""


@contextlib.contextmanager
def interrupt_on_signal(message: Callable[[str], str]):
    """Outside the optimizer loop (setup, the before and after phases), SIGINT/SIGTERM stop the block at once
    with `Interrupted(message(signal name))`. Inside `fit`, `StopFlag` takes over."""

    def handler(signum, frame):
        raise _Signalled(signal.Signals(signum).name)

    try:
        with _handling(handler):
            yield
    except _Signalled as e:
        raise Interrupted(message(e.args[0])) from None


@contextlib.contextmanager
def _handling(handler):
    """`handler` for SIGINT and SIGTERM during the block; the previous handlers after it."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals can only be caught in the main thread
        return
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in old:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
