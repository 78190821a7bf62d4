"""The chain-of-thought fine-tune (SFT stage), read top to bottom.

data → prompt/tokenize → model + LoRA → answers and validation loss before → fit (checkpoints,
metrics) → save adapter → answers and validation loss after → report.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import torch

from medcot.config import Config
from medcot.data.prompts import PromptFormatter, encode_records
from medcot.data.rows import load_records, split_records
from medcot.errors import DataError
from medcot.generate.batch import generate
from medcot.model.load import load_base, merge_adapter
from medcot.train import report
from medcot.train.distributed import World
from medcot.train.trainer import (
    Evaluator,
    Trainer,
    TrainResult,
    finished,
    mark_finished,
    validation_loss,
)

log = logging.getLogger(__name__)


def sft(cfg: Config, run_dir: Path, world: World, on_log: Callable[[str], None] = log.info,
        start_from: Path | None = None, run_root: Path | None = None, evaluate: Evaluator | None = None) -> TrainResult:
    """The chain-of-thought fine-tune, into `run_dir`; resumes from its checkpoints, skips if done.

    `start_from`: an adapter merged into the base first (the pre-training stage's).
    `run_root`: the run folder `run_dir` is a stage of (default: `run_dir` itself).
    `evaluate`: the benchmark eval before and after (`eval.train_eval_limit`); none without it.
    """
    run_root = run_root or run_dir
    if (done := finished(run_dir)) is not None:
        on_log(f"{run_dir}: already finished; skipping")
        return done
    t_start = time.time()
    t = cfg.train
    torch.manual_seed(t.seed)  # LoRA's A matrices are drawn from this: same seed, same start

    # -- Data ---------------------------------------------------------------------------------
    loaded = load_records(cfg.data)
    splits = split_records(loaded.records, cfg.data)
    on_log(f"data: {len(loaded.records)} rows from {loaded.source} ({len(loaded.skipped)} bad rows skipped); "
           f"train {len(splits.train)}, validation {len(splits.val)}")

    # -- Model and tokens ---------------------------------------------------------------------
    model, tokenizer, model_info = load_base(cfg.model)
    on_log(f"model: {model_info['path']} on {model_info['device']} ({model_info['dtype']}, "
           f"quantization {model_info['quantization']})")
    if start_from is not None:
        model = merge_adapter(model, start_from)
        on_log(f"model: merged the pre-training adapter {start_from} into the base")
    formatter = PromptFormatter(tokenizer, cfg.prompt)
    train_rows, lengths = encode_records(formatter, splits.train, t.max_seq_length, cfg.data.overlong)
    val_rows, _ = encode_records(formatter, splits.val, t.max_seq_length, "truncate")
    on_log(f"tokens: {lengths.summary()}")
    if not train_rows:
        raise DataError(f"No training rows fit train.max_seq_length={t.max_seq_length}; raise it or set data.overlong=truncate")
    run = Trainer.build(model, cfg, world, run_root, on_log)
    pad_id = tokenizer.pad_token_id
    sample_q = splits.val[: t.sample_questions]

    def before() -> dict:
        # LoRA's B matrices start at zero, so the wrapped model is still exactly the base model here.
        out = {"val_loss_before": validation_loss(run.model, val_rows, pad_id, t.per_device_batch_size, run.autocast),
               "answers_before": _answer(run.model, tokenizer, formatter, sample_q, cfg),
               "eval_before": evaluate(run.model, tokenizer, cfg) if evaluate else {}}
        on_log(f"before: validation loss {out['val_loss_before']:.4f}")
        return out

    state = run.fit(train_rows, run_dir, t.max_steps, t.learning_rate, pad_id, before)
    run.save_adapter(tokenizer, run_dir)

    # -- After --------------------------------------------------------------------------------
    val_loss_after = validation_loss(run.model, val_rows, pad_id, t.per_device_batch_size, run.autocast)
    answers_after = _answer(run.model, tokenizer, formatter, sample_q, cfg)
    eval_after = evaluate(run.model, tokenizer, cfg) if evaluate else {}
    on_log(f"after: validation loss {val_loss_after:.4f} (before {state['val_loss_before']:.4f})")
    result = run.result(run_dir, t.max_steps, state, t_start, val_loss_after, answers_before=state["answers_before"],
                        answers_after=answers_after, eval_before=state.get("eval_before", {}), eval_after=eval_after)
    if world.main:
        report.write_run_report(
            run_dir, cfg, result,
            questions=[r.question for r in sample_q],
            references=[r.answer for r in sample_q],
            lengths=lengths,
            data_source=loaded.source,
            n_skipped=len(loaded.skipped),
            model_info=model_info,
            n_trainable=run.n_trainable,
            tracker_backend=run.tracker_backend,
            world_size=world.size,
        )
        mark_finished(run_dir, result)
    return result


def _answer(model, tokenizer, formatter: PromptFormatter, records, cfg: Config) -> list[str]:
    was_training = model.training
    model.eval()
    model.config.use_cache = True
    prompts = [formatter.encode_prompt(r.question) for r in records]
    outs = generate(model, tokenizer, prompts, cfg.generate)
    model.config.use_cache = False
    model.train(was_training)
    return [o.text for o in outs]
