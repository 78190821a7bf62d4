"""Quantized GGUF: the types `medcot export --to gguf --dtype ...` offers, who makes each, and the
check that a quantized file still answers like the fp16 one.

| type     | bits/weight | made by |
|----------|-------------|---------|
| `q8_0`   | 8.5         | the `gguf` package (`gguf.quants`, bit-identical to ggml's reference quantizer) |
| `q4_0`   | 4.5 (+ Q8_0 embedding) | the `gguf` package |
| `q4_k_m` | ~4.9        | llama.cpp: `llama-quantize` on PATH, else llama-cpp-python's `llama_model_quantize` |

The gguf package implements quantizers for Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1 only; the K-quants
(Q4_K_M and friends) exist only in llama.cpp's C code, so `q4_k_m` needs llama.cpp installed.

Every quantized export is measured against the fp16 GGUF of the same merged weights: greedy
decoding on a few fixed medical prompts, reported as the fraction of greedy tokens that agree
(see `greedy_agreement`).
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from medcot.errors import SetupError

log = logging.getLogger(__name__)

QUANT_TYPES = ("q8_0", "q4_0", "q4_k_m")
GGUF_PY_TYPES = ("q8_0", "q4_0")  # written directly by medcot/export/gguf_writer.py
LLAMA_CPP_TYPES = {"q4_k_m": "Q4_K_M"}  # llama-quantize's type name; llama.h's LLAMA_FTYPE_MOSTLY_<name>

# Questions the agreement check prompts with (through the export's chat template). Short, varied
# clinical questions: the check needs ordinary text, not a benchmark.
CHECK_QUESTIONS = (
    "A 45-year-old man has crushing chest pain radiating to the left arm. What is the next step?",
    "A 6-year-old has a barking cough and inspiratory stridor at night. What is the most likely diagnosis?",
    "Which electrolyte disturbance causes peaked T waves on the ECG?",
    "A 30-year-old woman has heat intolerance, weight loss and a diffuse goitre. What is the likely cause?",
)
CHECK_NEW_TOKENS = 32
# Below this, the summary warns. Q8_0 of the embedded 135M model agrees on 96% of greedy tokens,
# its Q4_K_M on 87%: a much lower figure means the quantized file answers differently.
AGREEMENT_WARN_BELOW = 0.8


@dataclass
class Agreement:
    """Greedy decoding of the quantized file vs the fp16 file on the same prompts.

    `token_agreement`: over every position of the fp16 file's greedy continuations, the fraction
    where the quantized model (fed the same prefix) picks the same next token (teacher-forced
    top-1 agreement; a single early divergence does not count the rest of the answer as wrong).
    `identical`: prompts whose free-running greedy continuation is identical, token for token.
    """

    backend: str
    prompts: int
    tokens: int
    token_agreement: float
    identical: int

    def summary(self) -> str:
        return (f"{100 * self.token_agreement:.1f}% of {self.tokens} greedy tokens agree with fp16; "
                f"{self.identical}/{self.prompts} continuations identical ({self.backend})")

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# llama.cpp's quantizer


def llama_cpp_quantizer() -> str | None:
    """Which llama.cpp quantizer is installed: the `llama-quantize` executable on PATH (preferred:
    it is the one the llama.cpp docs name and the user chose to install), else llama-cpp-python's
    binding of the same C function; None when neither is."""
    if exe := shutil.which("llama-quantize"):
        return exe
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return None
    return "llama-cpp-python"


def require_llama_cpp_quantizer(dtype: str) -> str:
    """`llama_cpp_quantizer()`, or a SetupError that says what to install."""
    which = llama_cpp_quantizer()
    if which is None:
        raise SetupError(
            f"--dtype {dtype} is quantized by llama.cpp, which is not installed: pip install llama-cpp-python "
            "(or put llama.cpp's llama-quantize on PATH); q8_0 and q4_0 need neither"
        )
    return which


def quantize_with_llama_cpp(src: Path, dst: Path, dtype: str, threads: int | None = None) -> str:
    """Quantize the F16 GGUF `src` to `dst` with llama.cpp; returns a description of the quantizer.

    llama.cpp picks the type of each tensor itself (Q4_K_M: Q6_K for the output/embedding and half
    of the attention V and FFN down matrices, Q4_K elsewhere; rows that are not whole 256-value
    super-blocks fall back to Q5_0/Q8_0).

    Raises:
        SetupError: no llama.cpp quantizer is installed, or it failed.
    """
    name = LLAMA_CPP_TYPES[dtype]
    which = require_llama_cpp_quantizer(dtype)
    threads = threads or max(1, int(os.environ.get("OMP_NUM_THREADS", 0) or os.cpu_count() or 1))
    if which != "llama-cpp-python":
        proc = subprocess.run([which, str(src), str(dst), name, str(threads)], capture_output=True, text=True)
        if proc.returncode != 0 or not dst.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise SetupError(f"{which} failed (exit {proc.returncode}): {' | '.join(tail)}")
        return f"llama.cpp {Path(which).name}"

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}")
    params.nthread = threads
    # llama.cpp reports every tensor (through llama-cpp-python's logger, and to stderr directly):
    # hundreds of lines. Keep them out of the terminal; show the tail only if quantization fails.
    llama_log = logging.getLogger("llama-cpp-python")
    level = llama_log.level
    llama_log.setLevel(logging.ERROR)
    with tempfile.TemporaryFile() as captured:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            llama_log.setLevel(level)
        captured.seek(0)
        lines = captured.read().decode(errors="replace").splitlines()
    fallbacks = sum("falling back" in line for line in lines)
    if fallbacks:
        log.info("llama.cpp: %d tensors are not whole %s super-blocks and use a fallback type", fallbacks, name)
    if rc != 0 or not dst.is_file():
        raise SetupError(f"llama.cpp could not quantize {src.name} to {name} (llama_model_quantize returned {rc}): "
                         + " | ".join(lines[-3:]))
    return f"llama.cpp (llama-cpp-python {llama_cpp.__version__})"


# ---------------------------------------------------------------------------------------------
# The agreement check


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def greedy_agreement(reference: Path, candidate: Path, prompts: list[list[int]], eos_id: int | None,
                     new_tokens: int = CHECK_NEW_TOKENS, backend: str = "auto", config=None) -> Agreement:
    """Compare the greedy decoding of the GGUF `candidate` with that of `reference` on `prompts`.

    `prompts` are token ids (from the export's tokenizer, which writes the GGUF's vocabulary), so
    both files see identical input and only their weights differ.

    Backends: "llama.cpp" runs both files in real llama.cpp (llama-cpp-python), which is what users
    run, quantized matmul kernels included. "transformers" is the fallback when llama-cpp-python is
    not installed: transformers' GGUF loader dequantizes the file (gguf's reader) into fp32 weights.
    It measures the same thing, the rounding of the weights, but not llama.cpp's kernels (which also
    round activations to 8 bits for Q8_0/Q4_0 dot products), and it holds a full fp32 copy of the
    model in memory. "auto" takes llama.cpp when it is installed. `config` (the merged model's
    transformers config) spares the transformers backend reading it back from each file.
    """
    if backend == "auto":
        backend = "llama.cpp" if llama_cpp_available() else "transformers"
    run = {"llama.cpp": _LlamaCppRunner, "transformers": _TransformersRunner}[backend]

    ref = run(reference, prompts, new_tokens, config)
    ref_out = [ref.greedy(p, new_tokens, eos_id) for p in prompts]
    ref.close()
    cand = run(candidate, prompts, new_tokens, config)
    agree = total = identical = 0
    for p, cont in zip(prompts, ref_out):
        picks = cand.next_tokens(p, cont)  # teacher-forced along the reference continuation
        agree += sum(a == b for a, b in zip(picks, cont))
        total += len(cont)
        identical += cand.greedy(p, new_tokens, eos_id) == cont
    cand.close()
    if backend == "llama.cpp":
        import llama_cpp
        label = f"llama.cpp via llama-cpp-python {llama_cpp.__version__}"
    else:
        label = "transformers on the dequantized weights"
    return Agreement(backend=label, prompts=len(prompts), tokens=total,
                     token_agreement=agree / max(total, 1), identical=identical)


class _LlamaCppRunner:
    """A GGUF file in llama.cpp: greedy = argmax of the logits, which is what temperature 0 does."""

    def __init__(self, path: Path, prompts: list[list[int]], new_tokens: int, config=None):
        import torch
        from llama_cpp import Llama

        n_ctx = max(len(p) for p in prompts) + new_tokens + 8
        self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                         n_threads=torch.get_num_threads(), n_threads_batch=torch.get_num_threads(), verbose=False)

    def _run(self, tokens: list[int]):
        self.llm.reset()
        self.llm.eval(tokens)
        return self.llm.scores[: self.llm.n_tokens]

    def greedy(self, prompt: list[int], new_tokens: int, eos_id: int | None) -> list[int]:
        self.llm.reset()
        self.llm.eval(prompt)
        out: list[int] = []
        while len(out) < new_tokens:
            tok = int(self.llm.scores[self.llm.n_tokens - 1].argmax())
            out.append(tok)
            if tok == eos_id:
                break
            self.llm.eval([tok])
        return out

    def next_tokens(self, prompt: list[int], continuation: list[int]) -> list[int]:
        scores = self._run(prompt + continuation[:-1])
        return [int(t) for t in scores[len(prompt) - 1:].argmax(-1)]

    def close(self) -> None:
        self.llm.close()


class _TransformersRunner:
    """A GGUF file loaded by transformers (weights dequantized to fp32 by gguf's reader)."""

    def __init__(self, path: Path, prompts: list[list[int]], new_tokens: int, config=None):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        # (Reading a GGUF's metadata with gguf's reader takes seconds for a 50k-token vocabulary: a
        # given config saves the second read.)
        kwargs = {"config": config} if config is not None else {}
        self.model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                          **kwargs)
        self.model.eval()

    def greedy(self, prompt: list[int], new_tokens: int, eos_id: int | None) -> list[int]:
        torch = self.torch
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                      do_sample=False, eos_token_id=eos_id, pad_token_id=eos_id)
        return out[0, len(prompt):].tolist()

    def next_tokens(self, prompt: list[int], continuation: list[int]) -> list[int]:
        torch = self.torch
        with torch.no_grad():
            logits = self.model(torch.tensor([prompt + continuation[:-1]])).logits[0]
        return logits[len(prompt) - 1:].argmax(-1).tolist()

    def close(self) -> None:
        del self.model
