"""Report: the files that make a run folder explain itself.

`manifest.json` (versions, data hash, git commit, device, wall time, tokens/s, peak memory),
`loss.png` (the loss curve) and `report.md` (before/after answers side by side, validation loss).
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from medcot.generate.reasoning import split_reasoning
from medcot.io import write_atomic, write_file_atomic
from medcot.train.tracking import read_metrics

DISCLAIMER = "medcot is a research tool. Its answers are not medical advice."

_PACKAGES = ["medcot", "torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes", "trl", "liger-kernel"]


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def file_sha256(path: str) -> str | None:
    p = Path(path)
    if not p.is_file():
        return None  # a hub dataset: its id and revision identify it
    h = hashlib.sha256()
    with p.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def plot_loss(run_dir: Path) -> Path | None:
    metrics = read_metrics(run_dir)
    if not metrics:
        return None
    try:
        import matplotlib
    except ImportError:  # a minimal install (e.g. a GPU box with only the training deps): no plot, say so
        import logging

        logging.getLogger(__name__).warning("matplotlib is not installed: no loss.png (pip install matplotlib)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot([m["step"] for m in metrics], [m["loss"] for m in metrics], marker="o", ms=3, label="train loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per response token")
    ax.set_title(f"{run_dir.name}: training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, run_dir / "loss.png")


def save_figure(fig, path: Path) -> Path:
    """Write a matplotlib figure atomically and free it (a plot is never seen half-written)."""
    import matplotlib.pyplot as plt

    with write_file_atomic(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return path


def _rows_per_step(cfg, world_size: int) -> int:
    from medcot.train.distributed import World, rows_per_step
    return rows_per_step(cfg.train, World(size=world_size))


def _quote(text: str) -> str:
    return "\n".join("> " + line if line else ">" for line in text.strip().splitlines()) or "> (empty)"


def _answer_block(title: str, text: str) -> list[str]:
    s = split_reasoning(text)
    answer = _quote(s.answer) if s.closed else "(no final answer: the model stopped inside its reasoning)"
    return [f"**{title}**", "", "Reasoning:", "", _quote(s.reasoning), "", "Final answer:", "", answer, ""]


# What each entry of a run folder is, for the report's file list.
_FILES = {
    "adapter": "LoRA adapter (PEFT format) + tokenizer: what ask, eval, serve and export load",
    "checkpoints": "resumable checkpoints (trainable weights, optimizer, scheduler, RNG, state.json): "
                   "medcot train --resume continues from the newest",
    "config.yaml": "the resolved config; --resume trains with it",
    "manifest.json": "versions, data hash, device, timings",
    "metrics.jsonl": "one line per logged step",
    "loss.png": "the training loss curve",
    "report.md": "this report",
    "result.json": "the summary; marks the run finished (--resume then skips it)",
    "wandb": "W&B run files and logs (offline runs upload with `wandb sync`)",
    "tensorboard": "TensorBoard event files",
    "pretrain": "the continued pre-training stage, with its own report.md",
    "without-pretrain": "the same SFT stage from the base model, for the comparison above",
}
FILES_HEADING = "## Files"


def files_section(run_dir: Path) -> list[str]:
    """Every entry of the run folder, each explained (report.md and result.json, written last, included);
    the adapter's and the checkpoints' contents are named one level down."""
    names = sorted({p.name for p in run_dir.iterdir()} | {"report.md", "result.json"})
    lines = [FILES_HEADING, ""]
    for name in names:
        path = run_dir / name
        what = _FILES.get(name, "not written by medcot")
        lines.append(f"- `{name}{'/' if path.is_dir() else ''}`: {what}")
        if name in ("adapter", "checkpoints") and path.is_dir():
            lines.append("  - " + ", ".join(f"`{p.name}{'/' if p.is_dir() else ''}`" for p in sorted(path.iterdir())))
    return lines + [""]


def provenance(model_info: dict) -> dict:
    """What every stage's manifest.json starts with: library versions, code commit, device and model."""
    return {"versions": package_versions(), "git_commit": git_commit(), "device": device_name(model_info["device"]),
            "model": model_info}


def write_run_report(run_dir: Path, cfg, result, *, questions, references, lengths, val_lengths, data_source,
                     n_skipped, model_info, n_trainable, tracker_backend, world_size: int = 1) -> None:
    manifest = {
        "run": run_dir.name,
        **provenance(model_info),
        "data": {"source": data_source, "sha256": file_sha256(data_source), "bad_rows_skipped": n_skipped,
                 "token_lengths": lengths.__dict__, "validation_token_lengths": val_lengths.__dict__},
        "trainable_parameters": n_trainable,
        "steps": result.steps,
        "wall_time_s": round(result.wall_s, 1),
        "tokens_per_s": round(result.tokens_per_s, 1),
        "peak_memory_gib": round(result.peak_mem_gib, 3),
        "activation_recompute": result.recompute,
        "val_loss_before": result.val_loss_before,
        "val_loss_after": result.val_loss_after,
        "eval_before": result.eval_before,
        "eval_after": result.eval_after,
        "tracking": tracker_backend,
        "processes": world_size,
    }
    write_atomic(run_dir / "manifest.json", json.dumps(manifest, indent=2))
    loss_png = plot_loss(run_dir)
    lines = [
        f"# medcot run `{run_dir.name}`",
        "",
        f"*{DISCLAIMER}*",
        "",
        f"- Base model: `{cfg.model.name_or_path}` ({model_info['dtype']}, quantization {model_info['quantization']}) "
        f"on {manifest['device']}",
        f"- LoRA r={cfg.lora.r}, alpha={cfg.lora.alpha} on {', '.join(cfg.lora.target_modules)}: "
        f"{n_trainable:,} trainable parameters",
        f"- Data: `{data_source}`; training {lengths.summary()}; validation {val_lengths.summary()}",
        f"- {result.steps} steps × {_rows_per_step(cfg, world_size)} rows, "
        f"lr {cfg.train.learning_rate:g}, wall time {result.wall_s:.0f} s, {result.tokens_per_s:,.0f} tokens/s, "
        f"peak memory {result.peak_mem_gib:.2f} GiB" + (f" per process, {world_size} processes" if world_size > 1 else ""),
        "",
        "## Validation loss (per response token, held-out rows)",
        "",
        "| | before | after |",
        "|---|---|---|",
        f"| loss | {result.val_loss_before:.4f} | {result.val_loss_after:.4f} |",
        "",
    ]
    if result.eval_before:
        lines += ["## Benchmarks before and after (eval.train_eval_limit items each)", "",
                  train_eval_table(result.eval_before, result.eval_after), ""]
    if loss_png:
        lines += ["## Training loss", "", f"![loss curve]({loss_png.name})", ""]
    t = cfg.train
    lines += ["## Answers before and after (held-out questions)", "",
              f"Reasoning is capped at {t.sample_thinking_budget} tokens (train.sample_thinking_budget); where the "
              f"model had not closed it by then, `</think>` was appended and the final answer generated (up to "
              f"{t.sample_answer_tokens} tokens, train.sample_answer_tokens), as eval does.", ""]
    for i, (q, ref, before, after) in enumerate(zip(questions, references, result.answers_before, result.answers_after), 1):
        lines += [f"### Question {i}", "", _quote(q), "",
                  *_answer_block("Before (base model)", before),
                  *_answer_block("After (base + adapter)", after),
                  "**Reference answer (from the data)**", "", _quote(ref), ""]
    write_atomic(run_dir / "report.md", "\n".join(lines + files_section(run_dir)))


def write_pretrain_report(stage_dir: Path, cfg, result, *, source, stats, n_blocks, n_val_docs, n_val_blocks,
                          model_info, n_trainable, world_size: int = 1) -> None:
    """`report.md` + `manifest.json` of the continued pre-training stage: held-out perplexity before/after."""
    import math

    p = cfg.pretrain
    manifest = {
        "stage": "pretrain",
        **provenance(model_info),
        "corpus": {"source": source, "sha256": file_sha256(source), "documents": stats.documents,
                   "tokens": stats.tokens, "blocks": n_blocks, "block_size": p.block_size,
                   "dropped_tail_tokens": stats.dropped_tokens, "held_out_documents": n_val_docs,
                   "held_out_blocks": n_val_blocks},
        "trainable_parameters": n_trainable,
        "steps": result.steps,
        "processes": world_size,
        "wall_time_s": round(result.wall_s, 1),
        "tokens_per_s": round(result.tokens_per_s, 1),
        "peak_memory_gib": round(result.peak_mem_gib, 3),
        "activation_recompute": result.recompute,
        "held_out_loss_before": result.val_loss_before,
        "held_out_loss_after": result.val_loss_after,
        "perplexity_before": math.exp(result.val_loss_before),
        "perplexity_after": math.exp(result.val_loss_after),
    }
    write_atomic(stage_dir / "manifest.json", json.dumps(manifest, indent=2))
    loss_png = plot_loss(stage_dir)
    lines = [
        "# medcot continued pre-training",
        "",
        f"*{DISCLAIMER}*",
        "",
        f"- Base model: `{cfg.model.name_or_path}` ({model_info['dtype']}, quantization {model_info['quantization']}) "
        f"on {manifest['device']}",
        f"- Corpus: `{source}`: {stats.documents} documents, {stats.tokens:,} tokens in {n_blocks} blocks of "
        f"{p.block_size} (documents never attend to each other); {n_val_docs} documents held out",
        f"- LoRA r={cfg.lora.r} on {', '.join(cfg.lora.target_modules)}"
        + (" + full embed_tokens and lm_head" if p.train_embeddings else "") + f": {n_trainable:,} trainable parameters",
        f"- {result.steps} steps × {_rows_per_step(cfg, world_size)} blocks, "
        f"lr {p.learning_rate:g}, wall time {result.wall_s:.0f} s, {result.tokens_per_s:,.0f} tokens/s, "
        f"peak memory {result.peak_mem_gib:.2f} GiB",
        "",
        "## Held-out perplexity",
        "",
        "| | before | after |",
        "|---|---|---|",
        f"| loss per token | {result.val_loss_before:.4f} | {result.val_loss_after:.4f} |",
        f"| perplexity | {math.exp(result.val_loss_before):.2f} | {math.exp(result.val_loss_after):.2f} |",
        "",
    ]
    if loss_png:
        lines += ["## Training loss", "", f"![loss curve]({loss_png.name})", ""]
    write_atomic(stage_dir / "report.md", "\n".join(lines))


COMPARISON_HEADING = "## Did continued pre-training help?"


def append_pretrain_comparison(run_dir: Path, pre, with_pre, without_pre) -> None:
    """Add to the run's report what pre-training changed: the SFT stage with and without it."""
    import math

    lines = [
        COMPARISON_HEADING,
        "",
        f"Continued pre-training ({pre.steps} steps, `pretrain/report.md`): held-out text perplexity "
        f"{math.exp(pre.val_loss_before):.2f} → {math.exp(pre.val_loss_after):.2f}.",
        "The same SFT stage (same data, steps and seed) from the base model with and without it "
        "(`without-pretrain/report.md`):",
        "",
        "| SFT stage | CoT validation loss before SFT | after SFT |",
        "|---|---|---|",
        f"| after pre-training | {with_pre.val_loss_before:.4f} | {with_pre.val_loss_after:.4f} |",
        f"| from the base model | {without_pre.val_loss_before:.4f} | {without_pre.val_loss_after:.4f} |",
        "",
    ]
    if with_pre.eval_after and without_pre.eval_after:
        lines += ["| benchmark | with pre-training | without |", "|---|---|---|"]
        for name in with_pre.eval_after:
            a, b = with_pre.eval_after[name], without_pre.eval_after.get(name, {})
            lines.append(f"| {name} | {_score(a)} | {_score(b)} |")
        lines.append("")
    lines += ["Small runs move these numbers by noise as much as by effect; read them with the step counts above.", ""]
    path = run_dir / "report.md"
    # A resumed run replaces the comparison, never repeats it; the file list moves below it, now naming
    # without-pretrain/ too.
    text = path.read_text().split(COMPARISON_HEADING)[0].split(f"\n{FILES_HEADING}\n")[0].rstrip("\n")
    write_atomic(path, text + "\n\n" + "\n".join(lines + files_section(run_dir)))


def _score(entry: dict) -> str:
    return f"{entry['accuracy']:.1%} (n={entry['n']})" if entry else "–"


def train_eval_table(before: dict, after: dict | None = None) -> str:
    """Markdown table of `evaluate_for_train` results, before (and after) training."""
    if not before:
        return ""
    head = "| benchmark | n | chance | before | after | Δ |\n|---|---|---|---|---|---|" if after else \
        "| benchmark | n | chance | accuracy |\n|---|---|---|---|"
    lines = [head]
    for name, b in before.items():
        cell = _acc_cell(b)
        if after:
            a = after.get(name)
            delta = f"{100 * (a['accuracy'] - b['accuracy']):+.1f} pts" if a else ""
            lines.append(f"| {name} | {b['n']} | {100 * b['chance']:.0f}% | {cell} | {_acc_cell(a) if a else ''} | {delta} |")
        else:
            lines.append(f"| {name} | {b['n']} | {100 * b['chance']:.0f}% | {cell} |")
    return "\n".join(lines)


def _acc_cell(s: dict) -> str:
    return f"{100 * s['accuracy']:.1f}% [{100 * s['ci_low']:.0f}–{100 * s['ci_high']:.0f}]"
