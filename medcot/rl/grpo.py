"""The GRPO stage, read top to bottom.

items → contamination check → model (+ the SFT adapter merged) + LoRA → held-out answers before → per step:
sample k completions for each of the step's prompts (medcot's generation functions), score them (rl/rewards.py),
group-normalised advantages, the clipped loss with a KL penalty to the model with the adapter disabled
(rl/algorithm.py), optimizer update(s) on SFT's micro-batches (packed on the fast path, rl/rollout.py) →
checkpoints, metrics → adapter → held-out answers after → report.

Resume is exact: a step's prompts come from (train.seed, step) like SFT's rows, its completions are sampled
with a seed made of (train.seed, step), and the checkpoint holds weights, optimizer, schedule and RNG, so a
resumed run samples the same completions and takes the same updates as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from medcot.config import Config
from medcot.data.collate import micro_batches, rows_for_step
from medcot.data.prompts import PromptFormatter
from medcot.errors import Interrupted, TrainingDiverged
from medcot.eval.run import evaluate_for_train
from medcot.io import write_atomic
from medcot.model.load import load_base, merge_adapter
from medcot.rl import report
from medcot.rl.algorithm import group_advantages, step_normaliser, token_loss
from medcot.rl.items import check_contamination, load_items
from medcot.rl.rollout import (
    Rollout,
    collate,
    completion_limit,
    completion_logprobs,
    pack_rollouts,
    packable,
    rollout_args,
    sample,
)
from medcot.train.checkpoint import (
    FitState,
    discard_unfinished,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from medcot.train.distributed import World
from medcot.train.fast import skip_optimizer_syncs
from medcot.train.tracking import Tracker
from medcot.train.trainer import (
    StopFlag,
    Trainer,
    make_optimizer,
    make_scheduler,
    peak_mem_gib,
)

log = logging.getLogger(__name__)


@dataclass
class GrpoResult:
    run_dir: Path
    steps: int
    heldout_before: dict  # greedy answers to the held-out items: n, accuracy, format, answered
    heldout_after: dict
    reward_start: dict = field(default_factory=dict)  # training rewards, mean of the first quarter of the steps
    reward_end: dict = field(default_factory=dict)  # ... and of the last quarter
    answers_before: list[str] = field(default_factory=list)
    answers_after: list[str] = field(default_factory=list)
    eval_before: dict = field(default_factory=dict)  # benchmark scores (eval.train_eval_limit items each)
    eval_after: dict = field(default_factory=dict)
    wall_s: float = 0.0
    tokens_per_s: float = 0.0  # completion tokens sampled per second of training (rollouts and updates)
    peak_mem_gib: float = 0.0


def grpo(cfg: Config, run_dir: Path, on_log: Callable[[str], None] = log.info,
         start_from: Path | None = None) -> GrpoResult:
    """GRPO into `run_dir`; resumes from its checkpoints, skips if done.

    `start_from`: an adapter merged into the base first (the SFT stage's); the reference of the KL penalty is
    then the base with it merged, i.e. the SFT model.

    Raises:
        ContaminationError: training items overlap the eval benchmarks (and grpo.exclude_overlap is false).
        TrainingDiverged: a non-finite loss or gradient; the last good checkpoint stays on disk.
        Interrupted: SIGINT/SIGTERM; a checkpoint was saved first.
    """
    if (done := finished(run_dir)) is not None:
        on_log(f"{run_dir}: GRPO already finished; skipping")
        return done
    t_start = time.time()
    g, t = cfg.grpo, cfg.train
    torch.manual_seed(t.seed)  # LoRA's A matrices

    # -- Items and the contamination check ----------------------------------------------------
    items = load_items(g, t.seed)
    checked = check_contamination(items.train, cfg)
    train_items, task = checked.kept, items.task
    on_log(f"items: {items.source} ({task.name} format): {len(train_items)} to train on, {len(items.val)} held out; "
           f"contamination check against {', '.join(checked.summary)} ({cfg.eval.source}): "
           + (f"{len(checked.dropped)} overlapping items dropped (grpo.exclude_overlap)" if checked.dropped else "clean"))

    # -- Model ----------------------------------------------------------------------------------
    model, tokenizer, model_info = load_base(cfg.model)
    on_log(f"model: {model_info['path']} on {model_info['device']} ({model_info['dtype']}, "
           f"quantization {model_info['quantization']})")
    if start_from is not None:
        model = merge_adapter(model, start_from)
        on_log(f"model: merged the SFT adapter {start_from} into the base (the KL reference is this model)")
    run = Trainer.build(model, cfg, World(), run_dir, on_log, started=t_start)  # one process (rl/run.py)
    formatter = PromptFormatter(tokenizer, cfg.prompt)
    limit = completion_limit(g, cfg.generate)
    greedy = dataclasses.replace(cfg.generate, temperature=0.0)
    n_show = min(t.sample_questions, len(items.val))

    def measure(when: str) -> dict:
        on_log(f"{when}: greedy answers to {len(items.val)} held-out items")
        held = sample(run.model, tokenizer, formatter, task, items.val, 1, greedy, g)
        out = {f"heldout_{when}": heldout_scores(held), f"answers_{when}": [r.text for r in held[:n_show]]}
        on_log(f"{when}: held-out {_fmt_heldout(out[f'heldout_{when}'])}")
        if cfg.eval.train_eval_limit > 0:
            on_log(f"{when}: benchmark eval (eval.train_eval_limit={cfg.eval.train_eval_limit} items each)")
            out[f"eval_{when}"] = evaluate_for_train(run.model, tokenizer, cfg)
        return out

    # -- Optimizer, resume, before --------------------------------------------------------------
    params = [p for p in run.engine.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, t.optimizer, g.learning_rate, t.weight_decay)
    skip_optimizer_syncs(optimizer)  # as SFT: 8-bit AdamW's per-tensor device syncs, same update
    # One schedule step per GRPO step (its grpo.iterations updates share a learning rate), so the checkpoint's
    # step and the schedule's agree.
    scheduler = make_scheduler(optimizer, t.lr_scheduler, t.warmup_steps, g.max_steps)
    discard_unfinished(run_dir)
    if not (run_dir / "config.yaml").is_file():
        write_atomic(run_dir / "config.yaml", cfg.to_yaml())
    state = FitState()
    if (ckpt := latest_checkpoint(run_dir)) is not None:
        state = load_checkpoint(ckpt, run.engine, optimizer, scheduler)
        on_log(f"resumed from {ckpt} at step {state.step}/{g.max_steps}")
    clock = t_start - state.wall_s  # wall time counts earlier sessions up to the checkpoint
    if not state.before:
        state.before = measure("before")  # LoRA's B starts at zero: this is the model GRPO starts from
    tracker = Tracker(run_dir, t.report_to, t.wandb_project, run_dir.name, cfg.to_dict(), resume_step=state.step)

    # -- The loop ---------------------------------------------------------------------------------
    k, pad_id = g.num_generations, tokenizer.pad_token_id
    eps_high = g.epsilon_high if g.epsilon_high is not None else g.epsilon
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    run.engine.train()
    stop = StopFlag()
    with stop.installed():
        for step in range(state.step, g.max_steps):  # `step` counts from 0; state.step is steps done
            t0 = time.perf_counter()

            # Rollouts: k completions per prompt, scored, advantages within each group.
            first, kept, n_generated = [], [], 0
            rounds = 1 + (g.max_resample if g.dynamic_sampling else 0)
            for rnd in range(rounds):
                # Round 0 walks the items epoch by epoch like SFT's rows; extra rounds draw from other orders.
                idx = rows_for_step(len(train_items), step, g.prompts_per_step, t.seed + 7919 * rnd)
                seed = t.seed * 1_000_003 + step * rounds + rnd
                rolled = sample(run.model, tokenizer, formatter, task, [train_items[i] for i in idx], k,
                                rollout_args(cfg.generate, g, seed), g)
                n_generated += sum(r.num_tokens for r in rolled)
                totals = torch.tensor([r.scored.total for r in rolled])
                for r, a in zip(rolled, group_advantages(totals, k, g.scale_rewards).tolist()):
                    r.advantage = a
                groups = [rolled[i : i + k] for i in range(0, len(rolled), k)]
                first = first or rolled
                # Dynamic sampling (DAPO): a group whose completions all scored the same teaches nothing.
                kept += [r for grp in groups if not g.dynamic_sampling or _has_signal(grp) for r in grp]
                if len(kept) >= g.prompts_per_step * k:
                    break
            kept = kept[: g.prompts_per_step * k]
            t_rollout = time.perf_counter() - t0

            # The update.
            lr_now = scheduler.get_last_lr()[0]  # the rate this step uses, before the schedule advances
            stats = _update(run, params, optimizer, kept, g, t, pad_id, limit, eps_high) if kept else {}
            if stats and not (math.isfinite(stats["loss"]) and math.isfinite(stats["grad_norm"])):
                tracker.close()
                raise TrainingDiverged(
                    f"step {step + 1}: loss {stats['loss']} / grad norm {stats['grad_norm']} is not finite. "
                    f"Last good checkpoint: {latest_checkpoint(run_dir) or 'none'}. "
                    "Lower grpo.learning_rate or use model.dtype=bf16/fp32."
                )
            scheduler.step()
            state.step = step + 1
            dt = time.perf_counter() - t0
            state.fit_time += dt
            state.tokens_seen += n_generated

            if state.step % t.logging_steps == 0 or state.step == g.max_steps:
                metrics = {**step_metrics(first, k), **stats, "groups": len(kept) // k, "lr": lr_now,
                           "rollout_s": t_rollout, "rollout_tokens_per_s": n_generated / t_rollout,
                           "step_time_s": dt, "mem_gib": peak_mem_gib(run.device)}
                tracker.log(metrics, step=state.step)
                on_log(_step_line(state.step, g.max_steps, metrics))
            done = state.step == g.max_steps
            if (t.save_steps and state.step % t.save_steps == 0) or stop.requested or done:
                state.wall_s = time.time() - clock
                save_checkpoint(run_dir, run.engine, optimizer, scheduler, state)
            if stop.requested and not done:
                tracker.close()
                raise Interrupted(f"Interrupted by {stop.requested}; checkpoint saved at step {state.step}. "
                                  f"Resume with: medcot train --resume {run_dir}")
    run.engine.eval()
    run.save_adapter(tokenizer, run_dir)

    # -- After --------------------------------------------------------------------------------
    before, after = state.before, measure("after")
    start, end = report.reward_trend(run_dir)
    result = GrpoResult(
        run_dir=run_dir, steps=state.step,
        heldout_before=before["heldout_before"], heldout_after=after["heldout_after"],
        reward_start=start, reward_end=end,
        answers_before=before["answers_before"], answers_after=after["answers_after"],
        eval_before=before.get("eval_before", {}), eval_after=after.get("eval_after", {}),
        wall_s=time.time() - clock, tokens_per_s=state.tokens_seen / state.fit_time if state.fit_time else 0.0,
        peak_mem_gib=peak_mem_gib(run.device),
    )
    tracker.summary({f"heldout_{k_}_{w}": v for w, d in (("before", result.heldout_before),
                                                         ("after", result.heldout_after)) for k_, v in d.items()})
    tracker.close()
    report.write_grpo_report(run_dir, cfg, result, items=items, checked=checked, questions=items.val[:n_show],
                             model_info=model_info, n_trainable=run.n_trainable, tracker_backend=tracker.backend,
                             sft_stage=start_from.parent if start_from is not None else None)
    write_atomic(run_dir / "result.json", json.dumps({**asdict(result), "run_dir": run_dir.name}, indent=2))
    return result


def _update(run: Trainer, params, optimizer, kept: list[Rollout], g, t, pad_id: int, limit: int,
            eps_high: float) -> dict:
    """grpo.iterations optimizer updates on the step's completions; the step's loss, KL, clip fraction, grad norm.

    The micro-batches are SFT's: packed where the trainer packs (and the model's logits are its lm_head's, which
    the packed log-probabilities need), else padded; the reference and every policy pass run the same ones. The
    reference log-probabilities come from the same model with the adapter disabled (no second model). The
    sampling-time log-probabilities are those of the first pass: no update has happened between sampling and it.
    """
    packing = run.packing and packable(run.model)
    groups = micro_batches(kept, t.per_device_batch_size, packing, t.micro_batch_tokens)
    batches = [pack_rollouts(grp, run.device) if packing else collate(grp, pad_id, run.device) for grp in groups]
    n_tokens = sum(sum(r.policy_mask) for r in kept)
    refs: list[torch.Tensor | None] = [None] * len(batches)
    if g.beta > 0:
        with torch.no_grad(), run.model.disable_adapter():
            refs = [completion_logprobs(run.model, b, g.temperature, run.autocast) for b in batches]
    olds: list[torch.Tensor | None] = [None] * len(batches)
    # Sums stay on the device until the end of the step: no host sync per micro-batch.
    loss_sum, kl_sum, clipped = (torch.zeros((), device=run.device) for _ in range(3))
    grad_norm = 0.0
    for it in range(g.iterations):
        for j, b in enumerate(batches):
            logp = completion_logprobs(run.engine, b, g.temperature, run.autocast)
            if olds[j] is None:
                olds[j] = logp.detach()
            tl = token_loss(logp, olds[j], refs[j], b["advantages"], b["mask"], g.epsilon, eps_high, g.beta)
            weights = step_normaliser(g.loss_type, b["mask"], len(kept), n_tokens, limit)
            loss = (tl.loss.sum(dim=1) * weights).sum()
            loss.backward()
            loss_sum += loss.detach()
            clipped += tl.clipped.sum()
            if it == 0 and tl.kl is not None:
                kl_sum += tl.kl.detach().sum()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm if t.max_grad_norm > 0 else float("inf")))
        if not math.isfinite(grad_norm):
            break  # the caller stops the run; no update from a broken gradient
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    stats = {"loss": loss_sum.item() / g.iterations, "grad_norm": grad_norm,
             "clip_fraction": clipped.item() / max(n_tokens * g.iterations, 1)}
    if g.beta > 0:
        stats["kl"] = kl_sum.item() / max(n_tokens, 1)
    return stats


def _has_signal(group: list[Rollout]) -> bool:
    return len({r.scored.total for r in group}) > 1


def step_metrics(rollouts: list[Rollout], k: int) -> dict:
    """Rewards and answers of the step's first round of completions (the prompts as drawn, before dynamic
    sampling picks groups): each reward function's mean, the weighted total, accuracy, response length."""
    n = len(rollouts)
    names = rollouts[0].scored.values
    groups = [rollouts[i : i + k] for i in range(0, n, k)]
    return {
        "reward": sum(r.scored.total for r in rollouts) / n,
        **{f"reward/{name}": sum(r.scored.values[name] for r in rollouts) / n for name in names},
        "accuracy": sum(r.scored.correct for r in rollouts) / n,
        "answered": sum(r.scored.label is not None for r in rollouts) / n,
        "response_length": sum(r.num_tokens for r in rollouts) / n,
        "signal_groups": sum(_has_signal(grp) for grp in groups) / len(groups),
    }


def heldout_scores(rollouts: list[Rollout]) -> dict:
    n = len(rollouts)
    if not n:
        return {"n": 0}
    return {"n": n, "accuracy": sum(r.scored.correct for r in rollouts) / n,
            "format": sum(r.scored.values["format"] for r in rollouts) / n,
            "answered": sum(r.scored.label is not None for r in rollouts) / n}


def _fmt_heldout(h: dict) -> str:
    if not h.get("n"):
        return "none (grpo.val_size=0)"
    return f"accuracy {h['accuracy']:.0%}, format {h['format']:.2f}, answered {h['answered']:.0%} of {h['n']}"


def _step_line(step: int, max_steps: int, m: dict) -> str:
    each = ", ".join(f"{k.removeprefix('reward/')} {v:.2f}" for k, v in m.items() if k.startswith("reward/"))
    parts = [f"step {step}/{max_steps}", f"reward {m['reward']:.3f} ({each})", f"acc {m['accuracy']:.0%}",
             f"len {m['response_length']:.0f}", f"groups {m['groups']}"]
    if "kl" in m:
        parts.append(f"kl {m['kl']:.4f}")
    if "clip_fraction" in m:
        parts.append(f"clip {m['clip_fraction']:.3f}")
    parts.append(f"{m['step_time_s']:.0f} s")
    return " | ".join(parts)


def finished(run_dir: Path) -> GrpoResult | None:
    """The result of a GRPO stage that already completed in `run_dir` (resuming a chained run)."""
    path = run_dir / "result.json"
    if not path.is_file():
        return None
    return GrpoResult(**{**json.loads(path.read_text()), "run_dir": run_dir})  # the folder may have moved
