"""GGUF writer: a merged Llama model and its tokenizer as one file for llama.cpp and Ollama.

Written with the `gguf` package directly (no llama.cpp checkout needed), following what llama.cpp's
`convert_hf_to_gguf.py` writes for `LlamaForCausalLM`: tensor names, Q/K row order, metadata keys,
the byte-level BPE vocabulary and the pre-tokenizer name. Matrices go in F16, BF16 or F32, or are
quantized to Q8_0 / Q4_0 with `gguf.quants` (medcot/export/quantize.py adds llama.cpp's types).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from medcot.config import Config
from medcot.disclaimer import DISCLAIMER
from medcot.errors import SetupError

log = logging.getLogger(__name__)

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


def check_gguf_supported(cfg: Config, adapter_dir: Path) -> None:
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

    Matrices are stored in `dtype`: F16, BF16, F32, or quantized by `gguf.quants` (Q8_0, Q4_0;
    bit-identical to ggml's reference quantizers, which llama.cpp's own converter also uses).
    Norms and other 1-D tensors stay F32, as llama.cpp expects. Tensors are converted and written
    one at a time, so memory stays at the model plus one tensor.

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
    Q = gguf.GGMLQuantizationType
    file_type, qtype = {
        "fp32": (gguf.LlamaFileType.ALL_F32, Q.F32),
        "fp16": (gguf.LlamaFileType.MOSTLY_F16, Q.F16),
        "bf16": (gguf.LlamaFileType.MOSTLY_BF16, Q.BF16),
        "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, Q.Q8_0),
        "q4_0": (gguf.LlamaFileType.MOSTLY_Q4_0, Q.Q4_0),
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
    tensors = {**state, **extra}
    plan = []
    for hf_name, tensor in state.items():
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise SetupError(f"--to gguf: no GGUF name for tensor {hf_name!r} of a Llama model")
        plan.append((gguf_name, hf_name, _tensor_type(gguf_name, tensor, qtype)))
    plan += [(n, n, Q.F32) for n in extra]
    for gguf_name, hf_name, t in plan:
        shape = tuple(tensors[hf_name].shape)
        block, block_bytes = gguf.GGML_QUANT_SIZES[t]
        nbytes = tensors[hf_name].numel() // block * block_bytes
        # Element shape (not byte shape) with a non-uint8 dtype: the writer takes it as it is.
        w.add_tensor_info(gguf_name, shape, np.float32, nbytes, raw_dtype=t)

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


def _tensor_type(gguf_name: str, tensor: torch.Tensor, qtype):
    """The GGML type one tensor is stored in when the file's matrices are `qtype`.

    - 1-D tensors and norms: F32 (llama.cpp expects them so; they are a tiny part of the file).
    - Q4_0 files keep the token embedding and the output matrix in Q8_0: llama.cpp's own Q4_0 gives
      them Q6_K (the output layer is the most sensitive to rounding, and with tied embeddings
      `token_embd` is the output layer); the gguf package cannot write Q6_K, Q8_0 is the nearest.
    - A matrix whose rows are not a whole number of quantization blocks (32 values) falls back to
      F16, as llama.cpp's converter does.
    """
    import gguf

    Q = gguf.GGMLQuantizationType
    if tensor.ndim <= 1 or gguf_name.endswith("_norm.weight"):
        return Q.F32
    if qtype == Q.Q4_0 and gguf_name.split(".")[0] in ("token_embd", "output"):
        qtype = Q.Q8_0
    if qtype in (Q.Q8_0, Q.Q4_0) and tensor.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        log.warning("%s: rows of %d values are not whole %s blocks; stored as F16", gguf_name, tensor.shape[-1],
                    qtype.name)
        return Q.F16
    return qtype


def _to_numpy(t: torch.Tensor, qtype):
    """A float32 tensor as the bytes of GGML type `qtype` (numpy; quantized types as uint8 blocks)."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        return t.numpy()
    if qtype == Q.F16:
        return t.to(torch.float16).numpy()
    if qtype == Q.BF16:
        return t.to(torch.bfloat16).view(torch.int16).numpy()  # numpy has no bfloat16: raw 16 bits
    return gguf.quants.quantize(t.numpy(), qtype)


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


