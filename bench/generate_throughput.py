"""Generation throughput: HF `generate` (dynamic KV cache), transformers `generate_batch` and medcot's engine on
the same prompts; a table on stdout and JSON.

Every prompt is `--prompt-len` random token ids; EOS is off (HF: min_new_tokens; engine: ignore_eos), so
every path generates exactly prompts x new tokens (generate_batch: counted from its outputs). Tokens/s =
generated tokens / wall time of the whole run, prefill included; the engine rows also give the decode-only
rate (after every request's first token) and time to first token. Warm-up (compile, CUDA-graph capture) is
timed apart, cold in this process and, with --second-start, in a fresh process with the compile cache warm.

    # the GPU machine: the 8B architecture with RANDOM bf16 weights, built in memory (throughput only)
    python -m bench.generate_throughput --model random:llama-3.1-8b --tokenizer .bench/tokenizer \\
        --out $OUT/generate_throughput.json --profile --second-start
    # the same engine on a QLoRA model (4-bit NF4 base + an unmerged LoRA r16) and on that LoRA merged into bf16
    # (a saved model folder: bitsandbytes quantizes while loading; random LoRA weights, B non-zero)
    python -m bench.generate_throughput --model /tmp/r1-8b-random --quant 4bit --lora 16 --numerics ...
    python -m bench.generate_throughput --model /tmp/r1-8b-random --lora 16 --merge --numerics ...
    # a CPU smoke test of the script
    python -m bench.generate_throughput --model random:tiny --single-new 16 --concurrency 4 --new-tokens 16 \\
        --hf-single-new 8 --hf-batch 4 --hf-batch-new 8 --gb-concurrency 0 --sweep ""
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

TINY = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True)


def build_model(name: str, tokenizer_dir: str | None, dtype: torch.dtype, device: torch.device, quant: str = "none"):
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
    )

    if tokenizer_dir is None and not name.startswith("random:"):
        tokenizer_dir = name  # a model folder or hub id brings its tokenizer
    if tokenizer_dir is None:
        from medcot.embedded import embedded_model_dir
        tokenizer_dir = str(embedded_model_dir())
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)  # (medcot.model needs packages the GPU machine lacks)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if name.startswith("random:"):
        from bench.make_random_model import R1_DISTILL_LLAMA_8B
        preset = {"llama-3.1-8b": R1_DISTILL_LLAMA_8B, "tiny": TINY}[name.split(":", 1)[1]]
        cfg = LlamaConfig(**preset, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # build in the target dtype: 8B in fp32 would need 32 GB first
        try:
            torch.manual_seed(0)
            with device:
                model = LlamaForCausalLM(cfg)
        finally:
            torch.set_default_dtype(default)
        return model.eval(), tok
    if quant == "4bit":  # as medcot loads model.quantization=4bit: NF4, double quantization, bf16 compute
        from transformers import BitsAndBytesConfig
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
        return AutoModelForCausalLM.from_pretrained(name, dtype=dtype, quantization_config=q,
                                                    device_map={"": device.index or 0}).eval(), tok
    return AutoModelForCausalLM.from_pretrained(name, dtype=dtype).to(device).eval(), tok


def add_lora(model, rank: int, merge: bool):
    """A LoRA of rank `rank` on all 7 projections with random A and B (PEFT's init_lora_weights=False), so the
    adapter changes every output; unmerged (the engine runs base + LoRA per layer) or merged into the weights."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    cfg = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, init_lora_weights=False,
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(model, cfg)
    for m in peft_model.modules():  # PEFT keeps adapters in fp32; medcot's inference loads them in the model dtype
        if hasattr(m, "lora_A"):
            m.to(model.dtype if not hasattr(model, "hf_quantizer") else torch.bfloat16)
    return (peft_model.merge_and_unload() if merge else peft_model).eval()


def make_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab, (n, length), generator=g).tolist()


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- the paths -----------------------------------------------------------------------------------------


def hf_generate(model, prompts, new: int, device) -> dict:
    ids = torch.tensor(prompts, device=device)
    mask = torch.ones_like(ids)
    kw = dict(do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=0)
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, **kw)
    sync(device)
    wall = time.perf_counter() - t0
    tokens = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return {"path": "HF generate, dynamic cache", "concurrent": len(prompts), "new_tokens": new,
            "generated_tokens": tokens, "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 1)}


def hf_generate_batch(model, prompts, new: int, device) -> dict:
    from transformers import GenerationConfig

    row = {"path": "transformers generate_batch", "concurrent": len(prompts), "new_tokens": new}
    try:
        gc = GenerationConfig(max_new_tokens=new, do_sample=False, pad_token_id=0,
                              eos_token_id=model.config.eos_token_id)
        model.generate_batch(inputs=prompts[: min(8, len(prompts))], generation_config=gc, max_new_tokens=4)
        sync(device)
        t0 = time.perf_counter()
        out = model.generate_batch(inputs=prompts, generation_config=gc)
        sync(device)
        wall = time.perf_counter() - t0
        tokens = sum(len(o.generated_tokens) for o in out.values())
        row.update(generated_tokens=tokens, wall_s=round(wall, 3), tokens_per_s=round(tokens / wall, 1))
    except Exception as e:  # the API moves between transformers versions
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return row


def make_engine(model, tok, concurrency: int, max_len: int):
    from medcot.generate.engine import Engine
    return Engine(model, tok, max_batch_size=concurrency, max_queue=0, request_timeout_s=math.inf, max_len=max_len)


def warm_up(engine, prompts, concurrency: int, device) -> dict:
    """Compile and capture every graph the timed run needs, then a short run at its concurrency."""
    from medcot.generate.engine import Request, SamplingParams

    t0 = time.perf_counter()
    runner = engine._ensure_runner(engine._max_len_hint)
    capture_s = runner.capture([1, concurrency], list(range(256, runner.max_len + 1, 256)))
    reqs = [Request(p, SamplingParams(max_tokens=4, ignore_eos=True)) for p in prompts[:concurrency]]
    engine.run(reqs, close=False)
    sync(device)
    return {"warmup_s": round(time.perf_counter() - t0, 1), "capture_s": round(capture_s, 1),
            "graphs": len(runner._graphs), "cuda_graphs": runner.use_graphs, "compiled": runner.use_compile}


def engine_run(engine, prompts, new: int, device, label: str = "medcot engine") -> dict:
    from medcot.generate.engine import Request, SamplingParams

    reqs = [Request(p, SamplingParams(max_tokens=new, ignore_eos=True)) for p in prompts]
    sync(device)
    t0 = time.perf_counter()
    engine.run(reqs, close=False)
    sync(device)
    wall = time.perf_counter() - t0
    errors = [r.result.error for r in reqs if r.result.kind != "done"]
    if errors:
        raise errors[0]
    tokens = sum(r.result.completion_tokens for r in reqs)
    ttft = sorted(r.first_token_at - r.submitted for r in reqs)
    t_all_started = max(r.first_token_at for r in reqs) - reqs[0].submitted
    decode_tokens = tokens - len(reqs)
    decode_s = max(wall - t_all_started, 1e-9)
    return {"path": label, "concurrent": len(prompts), "new_tokens": new, "generated_tokens": tokens,
            "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 1),
            "decode_tokens_per_s": round(decode_tokens / decode_s, 1),
            "ttft_p50_s": round(statistics.median(ttft), 3), "ttft_max_s": round(ttft[-1], 3),
            "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 1) if device.type == "cuda" else None}


def profile_decode(engine, prompts, device, steps: int = 8) -> dict:
    """torch.profiler over `steps` decode steps (after the prefill): per-step wall and GPU time, top kernels."""
    from torch.profiler import ProfilerActivity, profile

    from medcot.generate.engine import Request, SamplingParams

    reqs = [Request(p, SamplingParams(max_tokens=steps + 2, ignore_eos=True)) for p in prompts]
    it = engine.steps(reqs, close=False)
    next(it)  # admission + prefill + first decode step
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            next(it)
        sync(device)
        wall = time.perf_counter() - t0
    for _ in it:
        pass
    events = prof.key_averages()
    attr = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    kernels = sorted(((e.key, getattr(e, attr), e.count) for e in events if getattr(e, attr, 0) > 0),
                     key=lambda x: -x[1])
    gpu_us = sum(k[1] for k in kernels)
    return {"concurrent": len(prompts), "steps": steps, "step_wall_ms": round(wall / steps * 1e3, 2),
            "step_gpu_ms": round(gpu_us / steps / 1e3, 2),
            "top_kernels": [{"name": k[:90], "ms_per_step": round(t / steps / 1e3, 3), "calls_per_step": c // steps}
                            for k, t, c in kernels[:14]]}


VARIANTS = {  # name -> (label, environment, ...): the engine with one lever changed
    "nocompile": ("medcot engine, no torch.compile", {"MEDCOT_COMPILE": "0"}, 0, 0),
    "fuse": ("medcot engine, fused qkv/gate-up", {"MEDCOT_FUSE_PROJ": "1"}, 0, 0),
    "sdpa": ("medcot engine, SDPA decode attention", {"MEDCOT_DECODE_ATTN": "sdpa"}, 0, 0),
    "fusesdpa": ("medcot engine, fused + SDPA", {"MEDCOT_FUSE_PROJ": "1", "MEDCOT_DECODE_ATTN": "sdpa"}, 0, 0),
}


def variant(model, tok, prompts, device, max_len, label, env, c, new) -> dict:
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        e = make_engine(model, tok, c, max_len)
        w = warm_up(e, prompts, c, device)
        r = engine_run(e, prompts[:c], new, device, label=label)
        e.close()
        return {**r, "warmup_s": w["warmup_s"]}
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def numerics(model, tok, prompts, device, n: int = 16) -> dict:
    """The engine against HF on this model: logits along HF's greedy continuation (teacher forcing, the engine's
    prefill + CUDA-graph decode), and the engine's own greedy tokens against HF generate's."""
    from medcot.generate.engine import Request, SamplingParams
    from medcot.generate.runner import ModelRunner

    ps = [prompts[0][:100], prompts[1][:256]]
    ids = [torch.tensor([p], device=device) for p in ps]
    kw = dict(do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=0)
    with torch.inference_mode():
        hf = [model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                             **kw)[0, x.shape[1]:].tolist() for x in ids]
        runner = ModelRunner(model, slots=2, max_len=512)
        outs = [runner.prefill(ps, [0, 1]).clone()]
        for k in range(n - 1):
            outs.append(runner.decode([h[k] for h in hf], [len(p) + k for p in ps]).clone())
        rel, agree, total = 0.0, 0, 0
        for i, (p, h) in enumerate(zip(ps, hf)):
            ref = model(torch.tensor([p + h], device=device)).logits[0, len(p) - 1:-1].float()
            mine = torch.stack([o[i] for o in outs])
            rel = max(rel, ((mine - ref).abs().max() / ref.abs().max()).item())
            agree += (mine.argmax(-1) == ref.argmax(-1)).sum().item()
            total += n
        del runner
    engine = make_engine(model, tok, 2, 512)
    reqs = [Request(p, SamplingParams(max_tokens=n, ignore_eos=True)) for p in ps]
    engine.run(reqs)
    prefix = [next((j for j, (x, y) in enumerate(zip(r.token_ids, h)) if x != y), n) for r, h in zip(reqs, hf)]
    return {"teacher_forced_max_rel_logit_err": round(rel, 5), "teacher_forced_argmax_agreement": agree / total,
            "greedy_tokens_equal_to_hf_before_first_difference": prefix, "tokens": n}


# -- the run ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="random:llama-3.1-8b")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the embedded model's)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--quant", default="none", choices=["none", "4bit"], help="4bit: NF4 base (a model folder)")
    p.add_argument("--lora", type=int, default=0, help="add a random LoRA of this rank on all 7 projections")
    p.add_argument("--merge", action="store_true", help="merge the --lora adapter into the base weights")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--single-new", type=int, default=1024, help="engine, one stream")
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=1024, help="engine at --concurrency")
    p.add_argument("--sweep", default="16,64", help="more engine concurrency points (at --sweep-new)")
    p.add_argument("--sweep-new", type=int, default=256)
    p.add_argument("--hf-single-new", type=int, default=64)
    p.add_argument("--hf-batch", type=int, default=64)
    p.add_argument("--hf-batch-new", type=int, default=128)
    p.add_argument("--gb-concurrency", type=int, default=64, help="generate_batch requests (0: skip)")
    p.add_argument("--gb-new", type=int, default=128)
    p.add_argument("--no-compile-check", action="store_true", help="engine without torch.compile too (short runs)")
    p.add_argument("--variants", default="", help="engine variants, NAME1 (1 stream) or NAMEN (--concurrency): "
                                                  "nocompile, fuse, sdpa, fusesdpa")
    p.add_argument("--numerics", action="store_true", help="engine logits and greedy tokens against HF's")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--second-start", action="store_true", help="warm-up time in a fresh process (warm compile cache)")
    p.add_argument("--warmup-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--budget-s", type=float, default=1e9, help="skip the remaining sections past this many seconds")
    p.add_argument("--out")
    a = p.parse_args(argv)

    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    if device.type == "cpu" and a.dtype != "fp32":
        dtype = torch.float32
    t0 = time.perf_counter()
    model, tok = build_model(a.model, a.tokenizer, dtype, device, a.quant)
    if a.lora:
        model = add_lora(model, a.lora, a.merge)
    build_s = time.perf_counter() - t0
    vocab = min(model.config.vocab_size, len(tok))
    n = max([a.concurrency, a.hf_batch, a.gb_concurrency] + [int(x) for x in a.sweep.split(",") if x])
    prompts = make_prompts(n, a.prompt_len, vocab)
    max_new = max(a.single_new, a.new_tokens, a.sweep_new)
    max_len = a.prompt_len + max_new + 16

    if a.warmup_only:  # the second start: a fresh process, compile cache on disk
        engine = make_engine(model, tok, a.concurrency, max_len)
        w = warm_up(engine, prompts, a.concurrency, device)
        print("WARMUP " + json.dumps(w))
        return w

    params = sum(x.numel() for x in model.parameters())
    weight_bytes = sum(x.numel() * x.element_size() for x in model.parameters())
    report: dict = {
        "date": time.strftime("%Y-%m-%d"), "model": a.model, "random_weights": a.model.startswith("random:")
        or "RANDOM" in str(getattr(model.config, "medcot_note", "")),
        "parameters": params, "dtype": str(dtype).removeprefix("torch."), "quant": a.quant,
        "lora": {"rank": a.lora, "merged": a.merge} if a.lora else None,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})",
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "prompt_len": a.prompt_len, "build_s": round(build_s, 1), "rows": [], "warmup": {}, "profile": [],
        "notes": [],
    }
    out = Path(a.out) if a.out else None

    def save():
        if out:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=2))

    def section(name, fn):
        if time.perf_counter() - start > a.budget_s:
            report["notes"].append(f"skipped {name}: past --budget-s")
            print(f"--- skipped {name} (time budget)", flush=True)
            return None
        print(f"--- {name} (at {time.perf_counter() - start:.0f} s)", flush=True)
        try:
            result = fn()
        except Exception as e:
            report["notes"].append(f"{name} failed: {type(e).__name__}: {str(e)[:300]}")
            print(f"{name} FAILED: {type(e).__name__}: {e}", flush=True)
            import traceback
            traceback.print_exc()
            result = None
        save()
        return result

    def row(r):
        if r:
            report["rows"].append(r)
            print(json.dumps(r), flush=True)

    # medcot's engine first: the targets.
    single = make_engine(model, tok, 1, max_len)
    report["warmup"]["single_cold"] = section("engine warm-up, 1 slot", lambda: warm_up(single, prompts, 1, device))
    row(section("engine, single stream", lambda: engine_run(single, prompts[:1], a.single_new, device)))
    if a.profile:
        report["profile"].append(section("profile, 1 stream", lambda: profile_decode(single, prompts[:1], device)))
    single.close()
    single = None  # drop the engine's KV cache before the next one is built
    big = make_engine(model, tok, a.concurrency, max_len)
    report["warmup"]["concurrent_cold"] = section(f"engine warm-up, {a.concurrency} slots",
                                                  lambda: warm_up(big, prompts, a.concurrency, device))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    row(section(f"engine, {a.concurrency} concurrent",
                lambda: engine_run(big, prompts[:a.concurrency], a.new_tokens, device)))
    for c in [int(x) for x in a.sweep.split(",") if x]:
        row(section(f"engine, {c} concurrent", lambda c=c: engine_run(big, prompts[:c], a.sweep_new, device)))
    if a.profile:
        report["profile"].append(section(f"profile, {a.concurrency} concurrent",
                                         lambda: profile_decode(big, prompts[:a.concurrency], device)))
    big.close()
    big = None

    # Today's paths.
    if a.hf_single_new:
        row(section("HF generate, 1", lambda: hf_generate(model, prompts[:1], a.hf_single_new, device)))
    if a.hf_batch:
        row(section(f"HF generate, {a.hf_batch}",
                    lambda: hf_generate(model, prompts[:a.hf_batch], a.hf_batch_new, device)))
    if a.gb_concurrency:
        row(section(f"generate_batch, {a.gb_concurrency}",
                    lambda: hf_generate_batch(model, prompts[:a.gb_concurrency], a.gb_new, device)))
    if device.type == "cuda":
        torch.cuda.empty_cache()

    if a.second_start:
        def second():
            cmd = [sys.executable, "-m", "bench.generate_throughput", "--warmup-only", "--model", a.model,
                   "--dtype", a.dtype, "--prompt-len", str(a.prompt_len), "--concurrency", str(a.concurrency),
                   "--single-new", str(a.single_new), "--new-tokens", str(a.new_tokens), "--sweep", "",
                   "--hf-batch", "1", "--gb-concurrency", "0"] + (["--tokenizer", a.tokenizer] if a.tokenizer else [])
            t = time.perf_counter()
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            lines = [x for x in res.stdout.splitlines() if x.startswith("WARMUP ")]
            if not lines:
                raise RuntimeError(res.stderr[-1500:])
            return {**json.loads(lines[-1][7:]), "process_s_incl_model_build": round(time.perf_counter() - t, 1)}
        report["warmup"]["concurrent_second_start"] = section("second start", second)

    if a.numerics:
        report["numerics"] = section("numerics against HF", lambda: numerics(model, tok, prompts, device))

    variants = [v for v in a.variants.split(",") if v] + (["nocompile1", "nocompileN"] if a.no_compile_check else [])
    for name in variants:
        label, env, c, new = VARIANTS[name.rstrip("1N")]
        c, new = (1, a.single_new) if name.endswith("1") else (a.concurrency, a.new_tokens)
        if name.startswith("nocompile"):
            new = 256 if c == 1 else 128
        row(section(f"{label}, {c}", lambda label=label, env=env, c=c, new=new: variant(
            model, tok, prompts, device, max_len, label, env, c, new)))

    # Bandwidth floor of one decode step: every weight read once (KV reads come on top).
    report["weight_gib"] = round(weight_bytes / 2**30, 2)
    report["single_stream_floor_tokens_per_s_at_4_3_TBps"] = round(4.3e12 / weight_bytes, 1)
    report["total_s"] = round(time.perf_counter() - start, 1)
    save()
    print_table(report)
    return report


def print_table(report: dict) -> None:
    lora = report.get("lora")
    what = (f"{report['dtype']}" + (", 4-bit NF4 base" if report.get("quant") == "4bit" else "")
            + (f", LoRA r{lora['rank']} {'merged' if lora['merged'] else 'unmerged'}" if lora else ""))
    print(f"\n{report['model']} ({'RANDOM weights, ' if report['random_weights'] else ''}{what}) on "
          f"{report['device']}, torch {report['torch']}, transformers {report['transformers']}, "
          f"{report['prompt_len']}-token prompts, EOS off, {report['date']}")
    print(f"{'path':<36} {'conc':>5} {'new':>5} {'tokens':>8} {'wall s':>8} {'tok/s':>9} {'decode tok/s':>12} "
          f"{'TTFT p50':>9}")
    for r in report["rows"]:
        if "error" in r:
            print(f"{r['path']:<36} {r['concurrent']:>5} {r['new_tokens']:>5}  error: {r['error'][:80]}")
            continue
        print(f"{r['path']:<36} {r['concurrent']:>5} {r['new_tokens']:>5} {r['generated_tokens']:>8} "
              f"{r['wall_s']:>8.2f} {r['tokens_per_s']:>9.1f} {r.get('decode_tokens_per_s', '-'):>12} "
              f"{r.get('ttft_p50_s', '-'):>9}")
    for k, w in report["warmup"].items():
        print(f"warm-up {k}: {w}")
    for prof in report["profile"]:
        if prof:
            print(f"profile {prof['concurrent']} concurrent: step wall {prof['step_wall_ms']} ms, GPU "
                  f"{prof['step_gpu_ms']} ms")
            for k in prof["top_kernels"][:8]:
                print(f"    {k['ms_per_step']:>8.3f} ms  x{k['calls_per_step']:<4} {k['name']}")
    if report.get("numerics"):
        print(f"numerics against HF: {report['numerics']}")
    for note in report["notes"]:
        print("note:", note)


if __name__ == "__main__":
    main()
