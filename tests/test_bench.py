"""bench/ as a package: the comparison rules of the training benchmark and the profile summary, on CPU."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bench.profile_summary import StepProfiler, format_summary, load_trace, summarize
from bench.train_throughput import batch_split, compare, expand_stacks

REPO = Path(__file__).resolve().parents[1]


def test_unsloth_runs_every_split_of_the_step():
    assert expand_stacks("plain,unsloth,medcot", 8, 2) == ["plain-2x4", "unsloth-2x4", "unsloth-4x2", "unsloth-8x1", "medcot"]
    assert expand_stacks("unsloth", 16, 2) == ["unsloth-2x8", "unsloth-4x4", "unsloth-8x2", "unsloth-16x1"]
    assert batch_split("unsloth-8x1") == (8, 1) and batch_split("medcot-mbt4096") is None
    with pytest.raises(SystemExit, match="not 8 rows"):
        expand_stacks("unsloth-4x4", 8, 2)


def test_medcot_is_compared_with_the_fastest_and_the_lowest_memory_unsloth_split():
    r = lambda stack, tok_s, gib: {"stack": stack, "real_tokens_per_s": tok_s, "peak_allocated_gib": gib}
    results = [r("plain-2x4", 2000, 6.75), r("unsloth-2x4", 3500, 6.40), r("unsloth-4x2", 6000, 6.68),
               r("unsloth-8x1", 8700, 7.23), r("medcot", 8200, 8.75), {"stack": "unsloth-16x1", "error": "x"}]
    summary = compare(results)
    assert summary["unsloth_best"]["stack"] == "unsloth-8x1"
    assert summary["unsloth_lowmem"]["stack"] == "unsloth-2x4"
    medcot = results[4]
    assert medcot["vs_unsloth_best"] == pytest.approx(8200 / 8700, abs=1e-3)
    assert medcot["vs_unsloth_lowmem"] == pytest.approx(8200 / 3500, abs=1e-3)
    assert medcot["vs_plain"] == pytest.approx(4.1)
    assert medcot["mem_vs_unsloth_best"] == pytest.approx(1.52)
    assert compare([r("medcot", 1, 1)])["unsloth_best"] is None


def _x(name, cat, ts, dur, tid=1, **args):
    """A trace event; times given in ms (the trace's unit is µs)."""
    return {"ph": "X", "cat": cat, "name": name, "pid": 1, "tid": tid, "ts": ts * 1000, "dur": dur * 1000, "args": args}


def test_profile_summary_sorts_kernels_by_kind_and_phase():
    ev = [
        _x("bench::step", "user_annotation", 0, 1000),
        # forward: a dequantize, a base matmul, a LoRA matmul, attention
        _x("bench::layer_forward", "user_annotation", 10, 300),
        _x("bitsandbytes::dequantize_4bit", "cpu_op", 20, 20),
        _x("cudaLaunchKernel", "cuda_runtime", 25, 2, correlation=1),
        _x("kDequantizeBlockwise<bf16>", "kernel", 30, 10, tid=7, correlation=1),
        _x("aten::mm", "cpu_op", 50, 20, **{"Input Dims": [[6000, 4096], [4096, 4096]]}),
        _x("cudaLaunchKernel", "cuda_runtime", 55, 2, correlation=2),
        _x("nvjet_tst_128x256", "kernel", 60, 100, tid=7, correlation=2),
        _x("aten::mm", "cpu_op", 80, 20, **{"Input Dims": [[6000, 4096], [4096, 16]]}),
        _x("cudaLaunchKernel", "cuda_runtime", 85, 2, correlation=3),
        _x("nvjet_tst_64x8", "kernel", 160, 5, tid=7, correlation=3),
        _x("aten::_flash_attention_forward", "cpu_op", 110, 20),
        _x("cudaLaunchKernel", "cuda_runtime", 115, 2, correlation=4),
        _x("flash_fwd_kernel", "kernel", 170, 30, tid=7, correlation=4),
        # backward on the autograd thread: the layer runs again (recompute), then a backward matmul
        _x("autograd::engine::evaluate_function: CheckpointFunctionBackward", "cpu_op", 400, 300, tid=2),
        _x("bench::layer_recompute", "user_annotation", 410, 100, tid=2),
        _x("bitsandbytes::dequantize_4bit", "cpu_op", 420, 20, tid=2),
        _x("cudaLaunchKernel", "cuda_runtime", 425, 2, tid=2, correlation=5),
        _x("kDequantizeBlockwise<bf16>", "kernel", 430, 10, tid=7, correlation=5),
        _x("aten::mm", "cpu_op", 600, 20, tid=2, **{"Input Dims": [[4096, 6000], [6000, 4096]]}),
        _x("cudaLaunchKernel", "cuda_runtime", 605, 2, tid=2, correlation=6),
        _x("nvjet_tst_256x128", "kernel", 610, 80, tid=7, correlation=6),
        # optimizer, a copy and a host sync
        _x("Optimizer.step#AdamW8bit.step", "user_annotation", 800, 100),
        _x("cuLaunchKernel", "cuda_driver", 805, 2, correlation=7),
        _x("kOptimizer32bit2State", "kernel", 810, 20, tid=7, correlation=7),
        _x("aten::_local_scalar_dense", "cpu_op", 950, 40),
        _x("cudaMemcpyAsync", "cuda_runtime", 955, 2, correlation=8),
        _x("Memcpy DtoH", "gpu_memcpy", 960, 1, tid=7, correlation=8),
        _x("cudaStreamSynchronize", "cuda_runtime", 958, 30, correlation=9),
    ]
    s = summarize({"traceEvents": ev})
    t = s["table_ms"]
    assert t["NF4 dequantize"]["forward"] == 10 and t["NF4 dequantize"]["recompute"] == 10
    assert t["base matmuls"]["forward"] == 100 and t["base matmuls"]["backward"] == 80
    assert t["LoRA matmuls"]["forward"] == 5
    assert t["attention"]["forward"] == 30
    assert t["optimizer"]["optimizer"] == 20
    assert t["copies"]["forward"] == 1
    assert s["dequantize_kernels"] == 2 and s["kernels"] == 8
    assert s["host_syncs"]["count"] == 1 and s["host_syncs"]["by_op"] == {"aten::_local_scalar_dense": 1}
    assert s["window_ms"] == 1000 and s["gpu_busy_ms"] == 256
    assert "| NF4 dequantize | 10.0 | 10.0 | 0.0 | 0.0 | 20.0 |" in format_summary(s)


def test_the_profiler_marks_recomputed_layers(tmp_path):
    """On CPU (no kernels): a checkpointed layer shows up once as forward and once as recompute."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    prof = StepProfiler(model, tmp_path / "t.json.gz")
    prof.start()
    ids = torch.randint(0, 64, (1, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    s = prof.stop()
    names = [e.get("name") for e in load_trace(tmp_path / "t.json.gz")["traceEvents"]]
    assert names.count("bench::layer_forward") == 2 and names.count("bench::layer_recompute") == 2
    assert s["kernels"] == 0


def test_bench_is_a_package_without_path_hacks_and_its_readme_lists_every_script():
    readme = (REPO / "bench" / "README.md").read_text()
    for f in sorted((REPO / "bench").glob("*.py")):
        assert "sys.path" not in f.read_text(), f"{f.name} edits sys.path"
        if f.name != "__init__.py":
            assert re.search(rf"`bench\.{f.stem}`|bench/{f.name}", readme), f"bench/README.md misses {f.name}"
