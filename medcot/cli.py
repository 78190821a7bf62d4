"""medcot command line: one entry point, one sub-command per job.

    medcot train --config configs/demo-cpu.yaml train.max_steps=20
    medcot ask "A 60-year-old smoker has haemoptysis..." --adapter runs/demo
    medcot serve --adapter runs/demo              # OpenAI-compatible API + chat page on 127.0.0.1:8000
    medcot config show configs/r1-distill-llama-8b.yaml
    medcot data check my_rows.jsonl

Any config key can be overridden after the command as `section.key=value`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path

from medcot.config import config_help, load_config, option_help, summary
from medcot.errors import ConfigError, Interrupted, MedcotError

log = logging.getLogger("medcot")

EPILOG = "Override any config key with section.key=value, e.g. train.max_steps=20 model.name_or_path=./my-model"


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config file (default: built-in defaults = embedded demo model)")
    p.add_argument("--verbose", "-v", action="store_true", help="print the whole resolved config first")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medcot",
        description="Teach a reasoning LLM clinical chain-of-thought. A research tool: not medical advice.",
        epilog=EPILOG,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="fine-tune with LoRA/QLoRA and write a run folder", epilog=EPILOG)
    _add_config_args(p)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--stage", **option_help("train.stage"))
    p.add_argument("--report-to", **option_help("train.report_to"))
    p.add_argument("--skip-bad-rows", action="store_true", help=option_help("data.skip_bad_rows")["help"])

    p = sub.add_parser("ask", help="stream one answer, reasoning shown apart", epilog=EPILOG)
    p.add_argument("question")
    p.add_argument("--adapter", metavar="RUN_DIR", help="a run folder (or adapter folder) from medcot train")
    _add_config_args(p)

    p = sub.add_parser("serve", help="OpenAI-compatible API + chat page, reasoning apart (docs/serve.md)",
                       epilog=EPILOG + ". Non-loopback hosts need MEDCOT_API_KEY.")
    p.add_argument("--adapter", metavar="RUN_DIR", help="a run folder (or adapter folder) from medcot train")
    p.add_argument("--host", help=option_help("serve.host")["help"])
    p.add_argument("--port", type=int, help=option_help("serve.port")["help"])
    _add_config_args(p)

    p = sub.add_parser("doctor", help="check this machine against a config: GPU, bf16, bitsandbytes, versions, disk",
                       epilog=EPILOG)
    _add_config_args(p)

    p = sub.add_parser("config", help="show the resolved config or every key")
    csub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    s = csub.add_parser("show", help="print the resolved config (defaults < file < overrides)")
    s.add_argument("config", nargs="?", help="YAML config file")
    s.add_argument("overrides", nargs="*", metavar="section.key=value")
    csub.add_parser("keys", help="list every key with its type, default and meaning")

    p = sub.add_parser("data", help="inspect training data")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    s = dsub.add_parser("check", help="validate a data file (and report token lengths) without training")
    s.add_argument("file")
    s.add_argument("--skip-bad-rows", action="store_true", help="count bad rows instead of stopping at the first")
    s.add_argument("--no-tokens", action="store_true", help="skip the token-length report (no tokenizer load)")
    _add_config_args(s)
    s = dsub.add_parser("overlap", help="n-gram overlap between the training data (data.*) and the eval benchmarks (eval.*)")
    s.add_argument("--adapter", metavar="RUN_DIR", help="check the training data of this run instead of data.*")
    _add_config_args(s)

    p = sub.add_parser("eval", help="score base and/or adapter on medical benchmarks; report with chart", epilog=EPILOG)
    p.add_argument("--adapter", metavar="RUN_DIR", help="a run folder (or adapter folder) from medcot train")
    p.add_argument("--compare", action="store_true", help="also run the base model on the same items (needs --adapter)")
    p.add_argument("--limit", type=int, metavar="N", help=option_help("eval.limit")["help"])
    p.add_argument("--overlap-only", action="store_true", help="only the contamination check; no model is loaded")
    p.add_argument("--fresh", action="store_true", help="discard earlier results in eval.output_dir instead of resuming")
    _add_config_args(p)

    p = sub.add_parser("export", help="merge the adapter into the base: safetensors or GGUF; push to the hub")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder from medcot train")
    p.add_argument("--to", required=True, choices=["merged", "gguf"],
                   help="merged: 16-bit safetensors for transformers/vLLM; gguf: one file for llama.cpp/Ollama")
    p.add_argument("--out", metavar="DIR", help="export folder (default: RUN_DIR/export/<to>-<dtype>)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32", "q8_0", "q4_0", "q4_k_m"],
                   help="weight dtype (default: bf16 merged, fp16 gguf); gguf also takes the quantized q8_0, q4_0, "
                        "q4_k_m (q4_k_m needs llama.cpp: pip install llama-cpp-python)")
    p.add_argument("--no-check", action="store_true",
                   help="quantized gguf: skip the greedy-agreement check against the fp16 file")
    p.add_argument("--force", action="store_true", help="replace an existing export folder")
    p.add_argument("--push", metavar="REPO_ID", help="upload the export to this hub model repo (token: HF_TOKEN)")
    p.add_argument("--dry-run", action="store_true", help="with --push: list the files and sizes, upload nothing")
    return parser


def _config(args) -> "Config":  # noqa: F821
    overrides = list(getattr(args, "overrides", []) or [])
    if getattr(args, "report_to", None):
        overrides.append(f"train.report_to={args.report_to}")
    if getattr(args, "stage", None):
        overrides.append(f"train.stage={args.stage}")
    if getattr(args, "skip_bad_rows", False):
        overrides.append("data.skip_bad_rows=true")
    return load_config(getattr(args, "config", None), overrides)


def _show_config(cfg, verbose: bool) -> None:
    """The whole resolved config with --verbose; else a short summary (the run folder keeps config.yaml)."""
    if verbose:
        log.info("resolved config:\n%s", cfg.to_yaml())
    else:
        log.info("%s", summary(cfg))


def cmd_train(args) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from medcot.eval.run import evaluate_for_train
    from medcot.rl.run import STAGES as GRPO_STAGES
    from medcot.rl.run import summary_lines, train_grpo
    from medcot.train.run import train

    if args.resume and (args.config or args.overrides or args.stage):
        raise ConfigError("--resume continues a run with its own saved config; drop --config and overrides")
    cfg = None if args.resume else _config(args)
    if cfg is None:  # resuming: the run's own config says which stages (train() reports a folder without one)
        saved = Path(args.resume) / "config.yaml"
        run_cfg = load_config(saved) if saved.is_file() else None
    else:
        run_cfg = cfg
    grpo = run_cfg is not None and run_cfg.train.stage in GRPO_STAGES
    rank = int(os.environ.get("RANK", "0"))  # under torchrun / accelerate launch: rank 0 speaks for the run
    if rank != 0:
        log.setLevel(logging.WARNING)
    from medcot.doctor import check_ready

    check_ready(cfg, resume=args.resume, config_name=args.config)  # fail fast, before data and model load
    if cfg is not None:
        _show_config(cfg, args.verbose)
    with logging_redirect_tqdm():
        if grpo:
            result = train_grpo(cfg, resume=args.resume)
        else:
            result = train(cfg, resume=args.resume, evaluate=evaluate_for_train)
    if rank != 0:
        return 0
    if grpo:
        print("\n" + "=" * 72 + "\n" + "\n".join(summary_lines(result)) + "\n" + "=" * 72)
        return 0
    cfg = cfg or load_config(Path(args.resume) / "config.yaml")
    print()
    print("=" * 72)
    print(f"Run folder        {result.run_dir}")
    print(f"Steps             {result.steps}")
    if cfg.train.stage == "pretrain":
        print(f"Held-out text     perplexity {math.exp(result.val_loss_before):.2f} -> {math.exp(result.val_loss_after):.2f}")
    else:
        print(f"Validation loss   {result.val_loss_before:.4f} -> {result.val_loss_after:.4f}")
    print(f"Wall time         {result.wall_s:.0f} s   ({result.tokens_per_s:,.0f} tokens/s training)")
    print(f"Peak memory       {result.peak_mem_gib:.2f} GiB")
    print(f"Report            {result.run_dir / 'report.md'}")
    if (result.run_dir / "without-pretrain").is_dir():
        print(f"With vs without   pre-training compared in {result.run_dir / 'report.md'}")
    print(f"Try it            medcot ask \"<question>\" --adapter {result.run_dir}")
    print("=" * 72)
    return 0


def cmd_ask(args) -> int:
    from medcot.data.prompts import PromptFormatter
    from medcot.disclaimer import DISCLAIMER
    from medcot.generate import batch
    from medcot.generate.reasoning import ReasoningSplitter
    from medcot.model.load import load_for_inference

    cfg = _config(args)
    model, tokenizer, cfg = load_for_inference(cfg, args.adapter)
    formatter = PromptFormatter(tokenizer, cfg.prompt)
    print(f"[{DISCLAIMER}]\n", file=sys.stderr)
    print("--- reasoning ---")
    splitter = ReasoningSplitter(starts_in_reasoning=True)  # our prompts open <think>
    section = "reasoning"

    def show(pieces: list[tuple[str, str]]) -> None:
        nonlocal section
        for kind, text in pieces:
            if kind == "content" and section == "reasoning":
                print("\n--- answer ---")
                section = "content"
            print(text, end="", flush=True)

    pieces = batch.stream(model, tokenizer, formatter.encode_prompt(args.question), cfg.generate)
    while True:
        try:
            show(splitter.feed(next(pieces)))
        except StopIteration as end:  # the stream returns the whole Generation: it says why it stopped
            generation = end.value
            break
    show(splitter.flush())
    limit = f"generate.max_new_tokens={cfg.generate.max_new_tokens}"
    if splitter.closed and section == "reasoning":  # closed, then nothing after the tag
        print("\n--- answer ---", end="")
    elif not splitter.closed:
        why = "the model ended its output inside its reasoning" if generation.finished else \
            f"the reasoning did not finish within {limit}"
        print(f"\n--- answer ---\n(none: {why})", end="")
    print()
    print(f"[ended on the model's end token after {generation.num_tokens} tokens]" if generation.finished else
          f"[stopped at {limit}: the output may be cut short]", file=sys.stderr)
    return 0


def cmd_serve(args) -> int:
    try:
        from medcot.serve import serve
    except ImportError as e:
        print(f"medcot serve: error: {e.name} is not installed: pip install 'medcot[serve]'", file=sys.stderr)
        return 2

    overrides = list(args.overrides or [])
    if args.host:
        overrides.append(f"serve.host={json.dumps(args.host)}")  # quoted: YAML would read "::" as a mapping
    if args.port:
        overrides.append(f"serve.port={args.port}")
    cfg = load_config(args.config, overrides)
    if args.verbose:
        log.info("resolved config:\n%s", cfg.to_yaml())
    return serve(cfg, adapter=args.adapter)


def cmd_doctor(args) -> int:
    from medcot import doctor
    return doctor.main(_config(args), args.config)


def cmd_config(args) -> int:
    if args.config_command == "keys":
        print(config_help())
        return 0
    if args.config and "=" in args.config and not Path(args.config).is_file():  # `config show key=value`
        args.config, args.overrides = None, [args.config, *args.overrides]
    print(load_config(args.config, args.overrides).to_yaml(), end="")
    return 0


def cmd_data(args) -> int:
    from medcot.data.rows import load_records
    if args.data_command == "overlap":
        return cmd_eval(args, overlap_only=True)

    cfg = _config(args)
    cfg.data.source = args.file
    loaded = load_records(cfg.data)
    print(f"{args.file}: {len(loaded.records)} valid rows, {len(loaded.skipped)} bad rows")
    print(f"columns: {', '.join(loaded.columns)}")
    for msg in loaded.skipped[:20]:
        print(f"  bad: {msg}")
    if len(loaded.skipped) > 20:
        print(f"  ... and {len(loaded.skipped) - 20} more")
    if not args.no_tokens:
        from medcot.data.prompts import PromptFormatter, encode_records
        from medcot.model.load import load_tokenizer, model_path
        tokenizer = load_tokenizer(model_path(cfg.model), cfg.model.revision)
        formatter = PromptFormatter(tokenizer, cfg.prompt)
        _, lengths = encode_records(formatter, loaded.records, cfg.train.max_seq_length, cfg.data.overlong)
        print(f"tokens ({cfg.model.name_or_path} tokenizer, {cfg.prompt.template} template): {lengths.summary()}")
        # The limit that matters is the one training will use: say where it came from.
        print(f"train.max_seq_length={cfg.train.max_seq_length} and data.overlong={cfg.data.overlong} from "
              + (args.config or "the defaults (pass the training config with --config)")
              + (" + overrides" if args.overrides else ""))
    return 1 if loaded.skipped else 0


def cmd_eval(args, overlap_only: bool = False) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from medcot.eval.report import summary_lines
    from medcot.eval.run import run_eval
    overrides = list(args.overrides or []) + ([f"eval.limit={args.limit}"] if getattr(args, "limit", None) else [])
    cfg = load_config(args.config, overrides)
    overlap_only = overlap_only or getattr(args, "overlap_only", False)
    if getattr(args, "verbose", False):
        log.info("resolved config:\n%s", cfg.to_yaml())
    try:
        with logging_redirect_tqdm():
            result = run_eval(cfg, adapter=args.adapter, compare=getattr(args, "compare", False),
                              overlap_only=overlap_only, fresh=getattr(args, "fresh", False))
    except KeyboardInterrupt:
        items = Path(cfg.eval.output_dir) / "items.jsonl"
        n = sum(1 for _ in items.open()) if items.is_file() else 0
        raise Interrupted(f"interrupted; {n} answered items are kept in {items}: run the same command again to "
                          "resume where it stopped") from None
    print()
    print("=" * 72)
    for line in summary_lines(result.summary):
        print(line)
    if overlap_only:
        print(f"Overlap report    {result.out_dir / 'overlap.md'}")
    else:
        print(f"Wall time         {result.wall_s:.0f} s")
        print(f"Report            {result.out_dir / 'report.md'}  ({result.out_dir / 'report.html'})")
        print(f"Items             {result.out_dir / 'items.jsonl'}")
    print("=" * 72)
    return 0


def cmd_export(args) -> int:
    from medcot.export.export import export, format_plan, quantization_lines
    result = export(args.run_dir, args.to, out=args.out, dtype=args.dtype, force=args.force,
                    push=args.push, dry_run=args.dry_run, check=not args.no_check)
    print()
    print("=" * 72)
    print(f"Export            {result.out_dir}  ({result.to}, {result.dtype}"
          + (", existing export reused)" if result.reused else ")"))
    if q := result.quantization:
        for label, text in quantization_lines(result.dtype, q):
            print(f"{label:<18}{text}")
    print(f"Model card        {result.out_dir / 'README.md'}")
    if result.to == "merged":
        template = "" if result.prompt_template == "seed" else f" prompt.template={result.prompt_template}"
        print(f"Try it            medcot ask \"<question>\" model.name_or_path={result.out_dir}{template}")
    else:
        gguf_file = next(name for name, _ in result.files if name.endswith(".gguf"))
        print(f"Try it            llama-cli -m {result.out_dir / gguf_file} --jinja")
        print(f"                  cd {result.out_dir} && ollama create {Path(args.run_dir).name.lower()} -f Modelfile")
    if args.push:
        print(f"{'Would upload' if args.dry_run else 'Uploaded':<18}to {args.push} (hub model repo)")
        print("\n".join(format_plan(result.files)))
    print("=" * 72)
    return 0


COMMANDS = {"train": cmd_train, "ask": cmd_ask, "doctor": cmd_doctor, "config": cmd_config, "data": cmd_data,
            "eval": cmd_eval, "export": cmd_export, "serve": cmd_serve}


# What Ctrl-C leaves behind when it stops a command outside the places that say more themselves
# (training saves a checkpoint, eval keeps its answered items: both raise Interrupted with the details).
_KEPT_ON_CTRL_C = {
    "export": "nothing was written (an export is assembled in a temporary folder and renamed when complete)",
    "train": "checkpoints already saved stay in the run folder; resume with: medcot train --resume RUN_DIR",
}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("transformers", "httpx", "urllib3", "datasets", "peft"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops filling the nargs="*" overrides after a positional and an option
    # (`ask Q --adapter RUN key=value`): such leftovers are overrides all the same.
    if extra and hasattr(args, "overrides") and not any(e.startswith("-") or "=" not in e for e in extra):
        args.overrides = list(args.overrides or []) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return COMMANDS[args.command](args)
    except Interrupted as e:
        print(f"medcot {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"medcot {args.command}: interrupted; {_KEPT_ON_CTRL_C.get(args.command, 'nothing to keep')}",
              file=sys.stderr)
        return 130
    except (MedcotError, FileNotFoundError) as e:  # FileNotFoundError: a path given on the command line
        print(f"medcot {args.command}: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)


if __name__ == "__main__":
    sys.exit(main())
