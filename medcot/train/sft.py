"""The chain-of-thought fine-tune (SFT stage), read top to bottom.

data → prompt/tokenize → model + LoRA → answers and validation loss before → fit (checkpoints,
metrics) → save adapter → answers and validation loss after → report. Sample answers use the thinking
budget (`train.sample_thinking_budget`), as eval does, so before and after both end in a final answer.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

from medcot.config import Config
from medcot.data.prompts import PromptFormatter, encode_records
from medcot.data.rows import load_records, split_records
from medcot.errors import DataError
from medcot.generate.budget import generate_answers
from medcot.model.load import load_base, merge_adapter
from medcot.train import report
from medcot.train.checkpoint import seed_rngs
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
    seed_rngs(t.seed)  # LoRA's A matrices are drawn from this: same seed, same start

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
    # Validation rows keep the prompt whole and cut the end of an over-long response (data.overlong does not
    # apply: dropping would change which rows are held out); they are counted and reported all the same.
    val_rows, val_lengths = encode_records(formatter, splits.val, t.max_seq_length, "truncate")
    on_log(f"tokens: training {lengths.summary()}")
    on_log(f"tokens: validation {val_lengths.summary()}")
    if not train_rows:
        raise DataError(f"No training rows fit train.max_seq_length={t.max_seq_length}; raise it or set data.overlong=truncate")
    run = Trainer.build(model, cfg, world, run_root, on_log, started=t_start)
    pad_id = tokenizer.pad_token_id
    sample_q = splits.val[: t.sample_questions]

    def measure(when: str) -> dict:
        """Validation loss, sample answers and (with an evaluator) the benchmarks, with progress on screen."""
        on_log(f"{when}: validation loss on {len(val_rows)} held-out rows, then {len(sample_q)} sample answer(s) "
               f"(reasoning up to {t.sample_thinking_budget} tokens, answer up to {t.sample_answer_tokens})")
        loss = validation_loss(run.model, val_rows, pad_id, t.per_device_batch_size, run.autocast,
                               desc=f"{when}: validation loss" if world.main else None)
        on_log(f"{when}: validation loss {loss:.4f}; generating the sample answers")
        out = {f"val_loss_{when}": loss, f"answers_{when}": _answer(run.model, tokenizer, formatter, sample_q, cfg)}
        if evaluate and cfg.eval.train_eval_limit:
            on_log(f"{when}: benchmark eval (eval.train_eval_limit={cfg.eval.train_eval_limit} items each)")
            out[f"eval_{when}"] = evaluate(run.model, tokenizer, cfg)
        return out

    # LoRA's B matrices start at zero, so the wrapped model is still exactly the base model in "before".
    state = run.fit(train_rows, run_dir, t.max_steps, t.learning_rate, pad_id, lambda: measure("before"))
    run.save_adapter(tokenizer, run_dir)

    # -- After --------------------------------------------------------------------------------
    before, after = state.before, measure("after")
    on_log(f"after: validation loss {after['val_loss_after']:.4f} (before {before['val_loss_before']:.4f})")
    result = run.result(run_dir, state, after["val_loss_after"], answers_before=before["answers_before"],
                        answers_after=after["answers_after"], eval_before=before.get("eval_before", {}),
                        eval_after=after.get("eval_after", {}))
    if world.main:
        report.write_run_report(
            run_dir, cfg, result,
            questions=[r.question for r in sample_q],
            references=[r.answer for r in sample_q],
            lengths=lengths,
            val_lengths=val_lengths,
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
    """Reasoning capped at train.sample_thinking_budget tokens, then "</think>" and the answer phase."""
    was_training = model.training
    model.eval()
    model.config.use_cache = True
    prompts = [formatter.encode_prompt(r.question) for r in records]
    outs = generate_answers(model, tokenizer, prompts, cfg.generate, cfg.generate.batch_size,
                            cfg.train.sample_thinking_budget, cfg.train.sample_answer_tokens)
    model.config.use_cache = False
    model.train(was_training)
    return [o.text for o in outs]
