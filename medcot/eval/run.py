"""Run an eval: items → contamination check → model → answer by the protocol → score → report.

    medcot eval                                              # embedded model, 25-item samples
    medcot eval --adapter runs/demo --compare                # base vs base + adapter, same items
    medcot eval eval.source=../shared/data/eval/normalized eval.limit=100
    medcot eval eval.protocol=huatuo eval.samples=5          # HuatuoGPT-o1's evaluation, 5 samples per item
    medcot eval --overlap-only                               # the contamination report alone

How an item is asked and scored is the protocol's (`eval.protocol`, medcot/eval/protocols/).

Every answered item is appended to `<output_dir>/items.jsonl` as soon as its batch is done, so an
interrupted eval, rerun with the same command, skips the items it already has (and re-reads their
stored outputs with the current answer extractor). `settings.json` records what produced them; a
rerun with different generation settings is refused rather than silently mixing results.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from medcot.config import Config, load_config
from medcot.errors import ConfigError, DataError
from medcot.eval import consistency, metrics, overlap
from medcot.eval.protocols import PROTOCOLS
from medcot.eval.tasks import TASKS, Item, Task
from medcot.io import write_atomic

log = logging.getLogger(__name__)


def answer_items(model, tokenizer, formatter, task: Task, items: list[Item], cfg: Config, tag: str,
                 on_record: Callable[[dict], None] | None = None) -> list[dict]:
    """Ask, answer and judge items by `eval.protocol`; one record per item, and `on_record(record)` as each is final."""
    return PROTOCOLS[cfg.eval.protocol].answer(model, tokenizer, formatter, task, items, cfg, tag, on_record)


# ---------------------------------------------------------------------------------------------
# Resumable results


class ItemStore:
    """`items.jsonl`: one line per answered item, appended and flushed as each item is judged.

    A line cut short by a crash mid-write is dropped when the file is read back (and the file is
    truncated to the last whole line), so the item is simply answered again.
    """

    def __init__(self, path: Path):
        self.path = path
        self.done: dict[tuple[str, str, str], dict] = {}  # insertion order = file order
        self.rescored = 0  # stored records whose extraction changed under the current extractor
        if not path.is_file():
            return
        raw = path.read_bytes()
        good = raw[: raw.rfind(b"\n") + 1]
        if len(good) != len(raw):
            log.warning("%s: dropping a half-written last line (an interrupted write); that item is redone", path)
            with path.open("r+b") as f:
                f.truncate(len(good))
        for lineno, line in enumerate(good.decode("utf-8").splitlines(), 1):
            try:
                r = json.loads(line)
                self.done[(r["model"], r["benchmark"], r["id"])] = r
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConfigError(f"{path}: row {lineno} is not an eval item record ({e}); "
                                  f"delete the file or use another eval.output_dir") from None

    def append(self, records: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            f.flush()
            os.fsync(f.fileno())
        for r in records:
            self.done[(r["model"], r["benchmark"], r["id"])] = r

    def rewrite(self) -> None:
        """Rewrite the whole file (atomically) after stored records were re-scored."""
        write_atomic(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.done.values()))


def _settings(cfg: Config, adapter: str | None, tag: str) -> dict:
    """What determines an item's output: a resumed eval must match these exactly."""
    e = cfg.eval
    s = {
        "model": cfg.model.name_or_path, "revision": cfg.model.revision, "dtype": cfg.model.dtype,
        "quantization": cfg.model.quantization, "source": e.source, "protocol": e.protocol, "samples": e.samples,
        **PROTOCOLS[e.protocol].settings(cfg),
    }
    if tag == "adapter":
        s["adapter"] = str(Path(adapter).resolve())
    return s


def _check_settings(out: Path, wanted: dict[str, dict], store: ItemStore) -> None:
    path = out / "settings.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    for tag, s in wanted.items():
        old = saved.get(tag)
        has_items = any(k[0] == tag for k in store.done)
        if old is not None and old != s and has_items:
            diff = ", ".join(f"{k}: {old.get(k)!r} -> {s.get(k)!r}" for k in sorted(s.keys() | old.keys())
                             if old.get(k) != s.get(k))
            raise ConfigError(
                f"{out} holds {tag} results made with other settings ({diff}). Resume with the same settings, "
                f"pick another eval.output_dir, or pass --fresh to discard them."
            )
        saved[tag] = s
    write_atomic(path, json.dumps(saved, indent=2))


# ---------------------------------------------------------------------------------------------
# The eval


@dataclass
class EvalResult:
    out_dir: Path
    summary: dict
    wall_s: float


def run_eval(cfg: Config, adapter: str | None = None, compare: bool = False, overlap_only: bool = False,
             fresh: bool = False, on_log: Callable[[str], None] = log.info) -> EvalResult:
    """Evaluate the base model, an adapter, or both (`compare`) and write the report folder.

    Raises:
        ConfigError: --compare without an adapter, or an output folder made with other settings.
        FileNotFoundError / DataError: a missing or malformed benchmark file (file, row and field named).
    """
    from tqdm.auto import tqdm

    t0 = time.time()
    e = cfg.eval
    if compare and adapter is None:
        raise ConfigError("--compare runs the base model and an adapter on the same items; add --adapter RUN_DIR")
    protocol = PROTOCOLS[e.protocol]
    protocol.check(cfg)
    out = Path(e.output_dir)

    # -- Items -----------------------------------------------------------------------------------
    tasks = [TASKS[name] for name in e.benchmarks]
    items = {t.name: t.load(e.source, e.limit) for t in tasks}
    on_log("items: " + ", ".join(f"{t.name} {len(items[t.name])}" for t in tasks) + f" (source {e.source})")

    # -- Contamination check against the training data in use ------------------------------------
    train_cfg = _training_config(cfg, adapter)
    train_data, train_error = _load_training_data(train_cfg)
    if train_data is None and overlap_only:
        raise DataError(f"the contamination check needs the training questions, and data.source="
                        f"{train_cfg.data.source!r} could not be loaded: {train_error}")
    overlap_summary = _overlap(tasks, items, train_data, e, on_log)
    excluded = {}
    if e.exclude_overlap:
        items, excluded = exclude_overlapping(items, overlap_summary)
        on_log("excluded as overlapping: " + ", ".join(f"{n} {k}" for n, k in excluded.items()))
    if overlap_only:
        summary = {"overlap": overlap_summary, "wall_s": time.time() - t0}
        from medcot.eval.report import write_overlap_report
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "overlap.json", json.dumps(overlap_summary, indent=2))
        write_overlap_report(out / "overlap.md", overlap_summary)
        return EvalResult(out, summary, time.time() - t0)

    # -- Model -----------------------------------------------------------------------------------
    from medcot.data.prompts import PromptFormatter
    from medcot.model.load import load_for_inference
    model, tokenizer, run_cfg = load_for_inference(cfg, adapter)
    run_cfg.eval = e  # the adapter's saved config brings its own eval section; the user's wins here
    formatter = PromptFormatter(tokenizer, run_cfg.prompt)
    tags = (["base", "adapter"] if compare else ["adapter"]) if adapter else ["base"]
    if fresh:
        for name in ("items.jsonl", "settings.json", "cot_loss.json"):
            (out / name).unlink(missing_ok=True)
    store = ItemStore(out / "items.jsonl")
    _check_settings(out, {tag: _settings(run_cfg, adapter, tag) for tag in tags}, store)
    on_log(f"model: {run_cfg.model.name_or_path}" + (f" + adapter {adapter}" if adapter else "")
           + f"; protocol {protocol.title}" + (f"; {e.samples} samples per item" if e.samples > 1 else "")
           + f"; results in {out}")

    # -- Answer, judge, score, item by item --------------------------------------------------------
    records: dict[str, dict[str, list[dict]]] = {}
    extras: dict[str, dict[str, dict]] = {}
    cot_loss: dict[str, dict] = {}
    finalized = False
    for tag in tags:
        # Base and adapter share one loaded model: PEFT switches the adapter off for the base pass.
        ctx = model.disable_adapter() if (tag == "base" and adapter) else contextlib.nullcontext()
        with ctx:
            records[tag], extras[tag] = {}, {}
            for task in tasks:
                records[tag][task.name], extras[tag][task.name], changed = _run_task(
                    model, tokenizer, formatter, task, items[task.name], run_cfg, tag, store, tqdm, on_log)
                finalized |= changed
            cot_loss[tag] = _cot_loss_cached(out, tag, model, tokenizer, formatter, train_cfg, train_data, on_log)

    if store.rescored:
        on_log(f"{store.rescored} stored answers were re-scored with the current extractor (items.jsonl updated)")
    if store.rescored or finalized:
        store.rewrite()

    # -- Scores and report -----------------------------------------------------------------------
    summary = _summarize(run_cfg, adapter, tags, tasks, items, records, cot_loss, overlap_summary, excluded, extras)
    if overlap_summary is None:
        summary["overlap_skipped"] = train_error
    summary["wall_s"] = round(time.time() - t0, 1)
    write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    from medcot.eval.report import write_report
    write_report(out, summary, records)
    return EvalResult(out, summary, time.time() - t0)


def _run_task(model, tokenizer, formatter, task: Task, items: list[Item], cfg: Config, tag: str,
              store: ItemStore, tqdm, on_log) -> tuple[list[dict], dict, bool]:
    """(records in item order, the protocol's benchmark-level numbers, whether `finalize` changed a verdict)."""
    protocol = PROTOCOLS[cfg.eval.protocol]
    done, todo = [], []
    for it in items:
        r = store.done.get((tag, task.name, it.id))
        if r is None:
            todo.append(it)
            continue
        # Stored outputs are re-read with the current rules: improving the extraction re-scores an eval
        # without generating anything again.
        store.rescored += protocol.rescore(task, it, r)
        done.append(r)
    if done:
        on_log(f"{tag} {task.name}: resumed {len(done)} of {len(items)} items from {store.path}; "
               f"{len(todo)} to answer")
    # Longest prompts first: similar lengths share a batch (less padding), and a prompt too long for
    # memory fails in the first batch rather than at the end.
    todo.sort(key=lambda it: -len(formatter.prompt(task.render(it))))
    # A generative protocol gets every item at once: the engine keeps eval.batch_size of them running and starts
    # the next as soon as one ends, where chunks of batch_size would leave slots idle behind each chunk's longest
    # answer. Each record is stored as its item is judged, so an interrupted eval keeps all finished items.
    chunk = max(len(todo), 1) if protocol.generative else cfg.eval.batch_size
    correct = sum(r["correct"] for r in done)
    with tqdm(total=len(items), initial=len(done), desc=f"{tag} {task.name}", unit="item", disable=None) as pbar:
        def keep(record: dict) -> None:
            nonlocal correct
            store.append([record])
            done.append(record)
            correct += record["correct"]
            pbar.update(1)
            pbar.set_postfix_str(_running(correct, len(done)), refresh=False)

        pbar.set_postfix_str(_running(correct, len(done)))
        for i in range(0, len(todo), chunk):
            answer_items(model, tokenizer, formatter, task, todo[i : i + chunk], cfg, tag, on_record=keep)
    verdicts = [(r["extracted"], r["method"], r["correct"]) for r in done]
    extra = protocol.finalize(task, done)  # e.g. huatuo: first- or last-match, whichever scores better
    changed = verdicts != [(r["extracted"], r["method"], r["correct"]) for r in done]
    on_log(f"{tag} {task.name}: Final: {_running(sum(r['correct'] for r in done), len(done))}")
    order = {it.id: i for i, it in enumerate(items)}
    return sorted(done, key=lambda r: order[r["id"]]), extra, changed


def _running(correct: int, n: int) -> str:
    return f"{correct}/{n} ({100 * correct / n:.1f}%)" if n else "0/0"


# ---------------------------------------------------------------------------------------------
# Training data: the contamination check and the held-out chain-of-thought loss


def _training_config(cfg: Config, adapter: str | None) -> Config:
    """The config whose data section is 'the training data in use': the adapter's run, else ours."""
    if adapter is not None and (Path(adapter) / "config.yaml").is_file():
        return load_config(Path(adapter) / "config.yaml")
    return cfg


def _load_training_data(train_cfg: Config):
    """(the training data, None) or (None, why it could not be loaded)."""
    from medcot.data.rows import load_records
    try:
        return load_records(train_cfg.data), None
    except Exception as err:  # bad file, hub offline, missing token: the benchmarks don't need it
        log.warning("training data %r could not be loaded (%s: %s): no contamination check or held-out CoT loss",
                    train_cfg.data.source, type(err).__name__, err)
        return None, f"{type(err).__name__}: {err}"


def _overlap(tasks, items, train_data, e, on_log) -> dict | None:
    """n-gram overlap of each benchmark's items with the training questions (see overlap.py)."""
    if train_data is None:
        return None
    index = overlap.build_index([r.question for r in train_data.records], e.overlap_ngram,
                                [r.row for r in train_data.records])
    reports = {t.name: overlap.check(t.name, items[t.name], index, e.overlap_threshold) for t in tasks}
    for r in reports.values():
        on_log(f"overlap {r.benchmark}: {r.n_overlapping}/{r.n_items} items at >= {e.overlap_threshold:.0%} of their "
               f"{e.overlap_ngram}-grams in the training questions ({r.n_any} share any; max {r.max_score:.0%})")
    return {
        "training_source": train_data.source, "training_questions": index.num_questions,
        "ngram": e.overlap_ngram, "threshold": e.overlap_threshold,
        "benchmarks": {name: r.to_dict() for name, r in reports.items()},
    }


def exclude_overlapping(items: dict[str, list[Item]], overlap_summary: dict | None) -> tuple[dict, dict]:
    """Drop the items the contamination check flagged; returns (items, {benchmark: number dropped}).

    Raises:
        ConfigError: there was no check (training data not loadable), or nothing is left to score.
    """
    if overlap_summary is None:
        raise ConfigError("eval.exclude_overlap=true needs the contamination check, but the training data "
                          "(data.source) could not be loaded; fix data.* or set eval.exclude_overlap=false")
    kept, excluded = {}, {}
    for name, its in items.items():
        flagged = {f["id"] for f in overlap_summary["benchmarks"][name]["flagged"]}
        kept[name] = [it for it in its if it.id not in flagged]
        excluded[name] = len(its) - len(kept[name])
        if not kept[name]:
            raise ConfigError(f"eval.exclude_overlap=true left no {name} items to score")
    return kept, excluded


def _cot_loss_cached(out: Path, tag: str, model, tokenizer, formatter, train_cfg: Config, train_data, on_log) -> dict | None:
    if train_data is None:
        return None
    path = out / "cot_loss.json"
    cached = json.loads(path.read_text()) if path.is_file() else {}
    d = train_cfg.data
    key = {"source": train_data.source, "val_size": d.val_size, "seed": d.seed,
           "max_seq_length": train_cfg.train.max_seq_length, "prompt_template": train_cfg.prompt.template}
    if cached.get(tag, {}).get("key") != key:
        try:
            cached[tag] = {**heldout_cot_loss(model, tokenizer, formatter, train_cfg, train_data), "key": key}
        except DataError as err:  # e.g. fewer rows than data.val_size
            log.warning("no held-out CoT loss for %s: %s", tag, err)
            return None
        write_atomic(path, json.dumps(cached, indent=2))
    c = cached[tag]
    on_log(f"{tag}: held-out CoT loss {c['loss']:.4f} (perplexity {c['perplexity']:.2f}) on {c['rows']} rows")
    return c


def heldout_cot_loss(model, tokenizer, formatter, train_cfg: Config, train_data) -> dict:
    """Mean loss per response token (and its perplexity) on the training run's validation rows.

    The same rows, prompt and loss as `medcot train`'s validation loss, so the number is comparable
    with the run report's before/after values.
    """
    from medcot.data.prompts import encode_records
    from medcot.data.rows import split_records
    from medcot.train.trainer import (  # shared with train's before/after validation loss
        autocast_for,
        validation_loss,
    )

    splits = split_records(train_data.records, train_cfg.data)
    rows, _ = encode_records(formatter, splits.val, train_cfg.train.max_seq_length, "truncate")
    device = next(model.parameters()).device
    autocast = autocast_for(device, str(model.dtype).removeprefix("torch."))
    loss = validation_loss(model, rows, tokenizer.pad_token_id, train_cfg.train.per_device_batch_size, autocast)
    return {"loss": loss, "perplexity": math.exp(loss), "rows": len(rows), "source": train_data.source}


# ---------------------------------------------------------------------------------------------
# Summary


def _summarize(cfg, adapter, tags, tasks, items, records, cot_loss, overlap_summary, excluded, extras) -> dict:
    models = {}
    for tag in tags:
        benchmarks = {}
        for t in tasks:
            recs = records[tag][t.name]
            benchmarks[t.name] = {**metrics.score(recs, t.chance(items[t.name])).to_dict(), **extras[tag][t.name]}
            samples = consistency.sample_metrics(recs)
            if samples:
                benchmarks[t.name]["samples"] = samples
        models[tag] = {"label": cfg.model.name_or_path + (f" + {adapter}" if tag == "adapter" else ""),
                       "benchmarks": benchmarks}
    protocol = PROTOCOLS[cfg.eval.protocol]
    comparison = {}
    if "base" in tags and "adapter" in tags:
        comparison = {t.name: metrics.compare(records["base"][t.name], records["adapter"][t.name]) for t in tasks}
    return {
        "settings": {**_settings(cfg, adapter, tags[-1]), "benchmarks": [t.name for t in tasks],
                     "limit": cfg.eval.limit, "batch_size": cfg.eval.batch_size,
                     "protocol_title": protocol.title, "protocol_source": protocol.source},
        "titles": {t.name: t.title for t in tasks},
        "models": models,
        "comparison": comparison,
        "cot_loss": cot_loss,
        "overlap": overlap_summary,
        "excluded_overlapping": excluded,
    }


# ---------------------------------------------------------------------------------------------
# A small eval for `medcot train` (before and after)


def evaluate_for_train(model, tokenizer, cfg: Config) -> dict:
    """Score `cfg.eval.train_eval_limit` items of each benchmark with the model as it is now.

    For `medcot train`'s before/after eval: nothing is written; returns
    `{benchmark: {n, correct, accuracy, ci_low, ci_high, unparseable_rate, chance, ...}}` (empty when
    `train_eval_limit` is 0). The model's train/eval mode and `use_cache` are restored.
    """
    from medcot.data.prompts import PromptFormatter
    if cfg.eval.train_eval_limit <= 0:
        return {}
    PROTOCOLS[cfg.eval.protocol].check(cfg)
    formatter = PromptFormatter(tokenizer, cfg.prompt)
    was_training, use_cache = model.training, model.config.use_cache
    model.eval()
    model.config.use_cache = True  # training turns the KV cache off; generation needs it
    try:
        out = {}
        for name in cfg.eval.benchmarks:
            task = TASKS[name]
            items = task.load(cfg.eval.source, cfg.eval.train_eval_limit)
            recs = []
            for i in range(0, len(items), cfg.eval.batch_size):
                recs += answer_items(model, tokenizer, formatter, task, items[i : i + cfg.eval.batch_size], cfg, "train")
            extra = PROTOCOLS[cfg.eval.protocol].finalize(task, recs)
            out[name] = {**metrics.score(recs, task.chance(items)).to_dict(), **extra}
        return out
    finally:
        model.config.use_cache = use_cache
        model.train(was_training)
