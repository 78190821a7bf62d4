"""Probe 2: the exact model setup of bench.train_throughput (load_base from disk, 4-bit, Liger,
packed attention, LoRA, limit_checkpointing) on a small random Llama: attention forward calls and
activation memory for one packed step, with and without varlen attention. RANDOM weights.

    python -m bench.checkpoint_probe_loaded
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def main() -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.models.llama import modeling_llama

    from medcot.config import LoraArgs, ModelArgs
    from medcot.data.collate import pack_collate
    from medcot.data.prompts import Encoded
    from medcot.model.load import attach_lora, load_base
    from medcot.train.fast import (
        apply_fused_kernels,
        limit_checkpointing,
        use_packed_attention,
    )
    path = Path("/tmp/probe-llama")
    if not (path / "config.json").exists():
        cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                          num_attention_heads=16, num_key_value_heads=4)
        LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
        AutoTokenizer.from_pretrained(".bench/tokenizer").save_pretrained(path)
    calls = {"n": 0}
    plain = modeling_llama.LlamaAttention.forward

    def counted(self, *a, **k):
        calls["n"] += 1
        return plain(self, *a, **k)

    modeling_llama.LlamaAttention.forward = counted
    g = torch.Generator().manual_seed(0)
    rows = [Encoded(ids, ids, 0) for ids in
            (torch.randint(5, 32000, (800,), generator=g).tolist() for _ in range(8))]
    for quant in ("4bit", "none"):
        for varlen in (False, True):
            model, _, _ = load_base(ModelArgs(name_or_path=str(path), quantization=quant, dtype="bf16"))
            apply_fused_kernels(model, torch.device("cuda"))
            if varlen:
                use_packed_attention(model)
            model = attach_lora(model, LoraArgs(r=16, alpha=16), gradient_checkpointing=True)
            n = limit_checkpointing(model, 1.0)
            model.train()
            batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in pack_collate(rows).items()}
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            calls["n"] = 0
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(**batch).loss
            loss.backward()
            torch.cuda.synchronize()
            print(json.dumps(dict(quant=quant, varlen=varlen, checkpointed_layers=n, attention_calls=calls["n"],
                                  attn_impl=model.config._attn_implementation,
                                  gc_flags=sorted({l.gradient_checkpointing for l in model.get_decoder().layers}),
                                  activation_peak_gib=round((torch.cuda.max_memory_allocated() - base) / 2**30, 2))),
                  flush=True)
            del model
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
