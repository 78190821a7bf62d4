"""Does activation recompute engage around packed attention? A probe, on CUDA.

A small random Llama (RANDOM weights; memory and call counts only) trains one packed step of 8 rows
of ~800 tokens with LoRA, under three settings: gradient checkpointing with transformers' block-
diagonal SDPA mask, gradient checkpointing with medcot's varlen flash attention, and varlen without
checkpointing. For each it prints peak allocated memory, step time and how many times the decoder
layers ran forward (32 layers: 32 without recompute, 64 with).

    python -m bench.checkpoint_probe [--out probe.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def run(setting: str, device: str = "cuda", size: dict | None = None) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from medcot.config import LoraArgs
    from medcot.data.collate import pack_collate
    from medcot.data.prompts import Encoded
    from medcot.model.load import attach_lora
    from medcot.train.fast import use_packed_attention
    torch.manual_seed(0)
    cfg = LlamaConfig(**(size or dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=32,
                                      num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=8192)))
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.config._attn_implementation = "sdpa"
    if "liger" in setting:
        from medcot.train.fast import apply_fused_kernels
        assert apply_fused_kernels(model, torch.device(device))
    if "varlen" in setting:
        use_packed_attention(model)
    model = attach_lora(model, LoraArgs(r=16, alpha=16), gradient_checkpointing=not setting.startswith("nockpt"))
    # Count MLP forwards by wrapping the class method: module hooks do not fire during recompute.
    from transformers.models.llama import modeling_llama

    calls = {"n": 0}
    plain_forward = modeling_llama.LlamaMLP.forward

    def counted(self, x):
        calls["n"] += 1
        return plain_forward(self, x)

    modeling_llama.LlamaMLP.forward = counted
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(8):
        ids = torch.randint(5, cfg.vocab_size, (int(torch.randint(600, 1000, (1,), generator=g)),), generator=g).tolist()
        rows.append(Encoded(ids, ids, 0))
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in pack_collate(rows).items()}
    model.train()
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    t0 = time.perf_counter()
    with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
        loss = model(**batch).loss
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
    modeling_llama.LlamaMLP.forward = plain_forward
    return dict(setting=setting, tokens=batch["input_ids"].shape[1], layer_forward_calls=calls["n"],
                activation_peak_gib=round((torch.cuda.max_memory_allocated() - base) / 2**30, 2) if cuda else None,
                step_s=round(time.perf_counter() - t0, 3))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out")
    args = ap.parse_args()
    run("ckpt+mask")  # warm-up: CUDA context, kernel selection
    torch.cuda.empty_cache()
    results = []
    for setting in ("ckpt+mask", "ckpt+varlen", "nockpt+varlen", "ckpt+mask+liger", "ckpt+varlen+liger"):
        results.append(run(setting))
        torch.cuda.empty_cache()
        print(json.dumps(results[-1]), flush=True)
    print(f"\n{'setting':<16}{'tokens':>8}{'layer fwd calls':>17}{'activation GiB':>16}{'step s':>8}")
    for r in results:
        print(f"{r['setting']:<16}{r['tokens']:>8}{r['layer_forward_calls']:>17}{r['activation_peak_gib'] or 0:>16.2f}{r['step_s']:>8.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
