"""BENCHMARKING AID — builds a model with RANDOM weights. Never train or evaluate it for quality.

Writes a DeepSeek-R1-Distill-Llama-8B-shaped (Llama-3.1-8B architecture) LlamaForCausalLM with
random bf16 weights, plus a tokenizer copied from TOKENIZER_DIR, to OUT_DIR. The GPU machine has no
network, so the real weights cannot be downloaded there; throughput and memory do not depend on
weight values, so this stands in for them in benchmarks. Every number measured on it says so.

    python -m bench.make_random_model OUT_DIR --tokenizer TOKENIZER_DIR [--layers 32]
    python -m bench.make_random_model OUT_DIR --tiny      # 2 layers, hidden 64, the embedded tokenizer: CPU smoke runs
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

# DeepSeek-R1-Distill-Llama-8B's config.json (the Llama-3.1-8B architecture).
R1_DISTILL_LLAMA_8B = {
    "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "tie_word_embeddings": False, "hidden_act": "silu",
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--tokenizer", help="folder with tokenizer files to copy (default with --tiny: the embedded model's)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: 32; --tiny: 2)")
    ap.add_argument("--tiny", action="store_true",
                    help="hidden 64 instead of the 8B shapes, for CPU smoke runs of the benchmarks. Its vocabulary is the "
                         "tokenizer's plus 64 ids no token decodes to, as the 8B's 128,256 rows outnumber the 49,152 "
                         "tokens of the SmolLM2 tokenizer it is given")
    args = ap.parse_args(argv)
    if args.tokenizer is None:
        if not args.tiny:
            ap.error("--tokenizer is required (except with --tiny)")
        from medcot.embedded import embedded_model_dir

        args.tokenizer = str(embedded_model_dir())
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    for f in Path(args.tokenizer).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out / f.name)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    shape = {**R1_DISTILL_LLAMA_8B, "num_hidden_layers": args.layers or (2 if args.tiny else 32)}
    if args.tiny:
        shape.update(vocab_size=len(tok) + 64, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=4096, rope_scaling=None)
    cfg = LlamaConfig(**shape, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.config.medcot_note = "RANDOM WEIGHTS: benchmarking aid, see bench/make_random_model.py"
    model.save_pretrained(out, max_shard_size="5GB")
    n = sum(p.numel() for p in model.parameters())
    print(json.dumps({"dir": str(out), "params_b": round(n / 1e9, 3), "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    main()
