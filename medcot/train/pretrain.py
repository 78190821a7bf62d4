"""Pre-train: domain-adaptive continued pre-training on raw medical text, before the CoT fine-tune.

    medcot train --config configs/demo-cpu.yaml --stage pretrain+sft   # PubMed sample, then SFT

corpus → held-out documents + training blocks (packed, document boundaries kept) → model + LoRA
(optionally full embed_tokens/lm_head) → held-out perplexity before → fit (the same loop as SFT,
loss on every token) → adapter → perplexity after → report. The SFT stage then starts from the
base with this adapter merged in (train.sft(start_from=...)).
"""

from __future__ import annotations

import logging
import math
import time
from itertools import islice
from pathlib import Path
from typing import Callable

from medcot.config import Config
from medcot.data.corpus import PackStats, iter_documents, pack_blocks, split_documents
from medcot.errors import ConfigError
from medcot.model.load import load_base
from medcot.train import distributed, report
from medcot.train.checkpoint import seed_rngs
from medcot.train.distributed import World
from medcot.train.trainer import (
    Trainer,
    TrainResult,
    finished,
    mark_finished,
    validation_loss,
)

log = logging.getLogger(__name__)


def pretrain(cfg: Config, stage_dir: Path, world: World, on_log: Callable[[str], None] = log.info) -> TrainResult:
    """Continued pre-training into `stage_dir`; resumes from its checkpoints, skips if done.

    Validation loss in the result is the mean loss per token on the held-out documents;
    perplexity is its exponential.
    """
    if (done := finished(stage_dir)) is not None:
        on_log(f"{stage_dir}: already finished; skipping")
        return done
    t_start = time.time()
    p, t = cfg.pretrain, cfg.train
    seed_rngs(t.seed)

    # -- Corpus -------------------------------------------------------------------------------
    model, tokenizer, model_info = load_base(cfg.model)
    on_log(f"model: {model_info['path']} on {model_info['device']} ({model_info['dtype']}, "
           f"quantization {model_info['quantization']})")
    docs = iter_documents(p)
    val_docs, train_docs = split_documents(docs, p.val_docs)
    val_blocks = list(pack_blocks(val_docs, tokenizer, p.block_size, desc="held-out"))
    if not val_blocks:
        raise ConfigError(f"pretrain.val_docs={p.val_docs} documents hold less than one block of "
                         f"pretrain.block_size={p.block_size} tokens; raise val_docs or lower block_size")
    stats = PackStats()
    rows_per_step = distributed.rows_per_step(t, world)
    # A stream is read only as far as the steps will train on; a file corpus is packed whole and
    # shuffled epoch by epoch like SFT rows.
    limit = p.max_steps * rows_per_step if p.streaming else None
    total = docs.total - len(val_docs) if docs.total is not None else None
    blocks = list(islice(pack_blocks(train_docs, tokenizer, p.block_size, stats, total=total), limit))
    if not blocks:
        raise ConfigError(f"{docs.source}: the training documents fill no block of {p.block_size} tokens; "
                         "lower pretrain.block_size or add text")
    on_log(f"corpus: {docs.source}: {stats.documents} documents, {stats.tokens:,} tokens -> {len(blocks)} blocks of "
           f"{p.block_size}; {len(val_blocks)} held-out blocks from {len(val_docs)} documents")

    # -- Model, perplexity before, fit --------------------------------------------------------
    extra = {"modules_to_save": ["embed_tokens", "lm_head"]} if p.train_embeddings else {}
    run = Trainer.build(model, cfg, world, stage_dir.parent, on_log, started=t_start, lora_extra=extra)
    pad_id = tokenizer.pad_token_id

    def before() -> dict:
        on_log(f"before: held-out loss on {len(val_blocks)} blocks")
        loss = validation_loss(run.model, val_blocks, pad_id, t.per_device_batch_size, run.autocast,
                               desc="before: held-out loss" if world.main else None)
        on_log(f"before: held-out loss {loss:.4f} (perplexity {math.exp(loss):.2f})")
        return {"val_loss_before": loss}

    state = run.fit(blocks, stage_dir, p.max_steps, p.learning_rate, pad_id, before)
    run.save_adapter(tokenizer, stage_dir)
    loss_after = validation_loss(run.model, val_blocks, pad_id, t.per_device_batch_size, run.autocast)
    on_log(f"after: held-out loss {loss_after:.4f} (perplexity {math.exp(loss_after):.2f}; "
           f"before {math.exp(state.before['val_loss_before']):.2f})")
    result = run.result(stage_dir, state, loss_after)
    if world.main:
        report.write_pretrain_report(stage_dir, cfg, result, source=docs.source, stats=stats,
                                     n_blocks=len(blocks), n_val_docs=len(val_docs), n_val_blocks=len(val_blocks),
                                     model_info=model_info, n_trainable=run.n_trainable, world_size=world.size)
        mark_finished(stage_dir, result)
    return result
