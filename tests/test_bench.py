"""bench/ as a package: the comparison rules of the training benchmark and the profile summary, on CPU."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bench import grpo_throughput as grpo_bench
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


# -- bench.grpo_throughput: medcot's GRPO stage against TRL's GRPOTrainer ---------------------------------


def _step(step, step_s, rollout_s, tokens=64, mem=1.0):
    return {"step": step, "step_s": step_s, "rollout_s": rollout_s, "update_s": step_s - rollout_s,
            "generated_tokens": tokens, "trained_tokens": tokens + 3, "mem_gib": mem}


def test_grpo_bench_reward_is_one_function_of_prompt_completion_and_step():
    r = grpo_bench.bench_reward
    assert r(3, 1, 0) == r(3, 1, 0) and 0 <= r(3, 1, 0) < 1
    assert len({r(p, c, s) for p in range(4) for c in range(8) for s in range(3)}) == 96  # every group has a signal


def test_grpo_bench_medians_leave_out_the_warmup_and_the_ratio_is_trl_over_medcot():
    medcot = grpo_bench.finalize("medcot", [_step(1, 50.0, 40.0), _step(2, 4.0, 3.0), _step(3, 6.0, 4.0, mem=9.5)], 1)
    assert medcot["timed_steps"] == 2 and medcot["step_time_median_s"] == 5.0 and medcot["update_median_s"] == 1.5
    assert medcot["rollout_tokens_per_s"] == round(128 / 7, 1) and medcot["peak_mem_gib"] == 9.5
    trl = grpo_bench.finalize("trl", [_step(1, 90.0, 80.0), _step(2, 30.0, 25.0, mem=19.0), _step(3, 40.0, 30.0)], 1)
    medcot.update(quant="4bit", prompt_digests=["a", "b", "c"])
    trl.update(quant="4bit", prompt_digests=["a", "b"])  # stopped a step earlier: the steps both ran agree
    summary = grpo_bench.compare([medcot, trl])
    assert summary["medcot_vs_trl_step"] == medcot["vs_trl"] == 7.0 and trl["vs_trl"] == 1.0
    assert summary["medcot_vs_trl_mem"] == 0.5 and summary["same_prompts"] and summary["same_generated_tokens"]
    trl["prompt_digests"] = ["a", "x"]
    assert grpo_bench.compare([medcot, trl])["same_prompts"] is False
    assert "7.00x" in grpo_bench.table([medcot, trl])
    assert grpo_bench.finalize("trl", [_step(1, 90.0, 80.0)], 1)["error"].startswith("no timed steps")


def test_grpo_bench_keeps_the_steps_of_a_stack_stopped_by_its_timeout():
    out = "noise\n" + "\n".join("STEP " + json.dumps(_step(i, 10.0 + i, 8.0)) for i in (1, 2, 3))
    res = grpo_bench.collect("trl", "4bit", out, 1, "timed out after 300s")
    assert res["partial"] and res["timed_steps"] == 2 and res["step_time_median_s"] == 12.5
    assert res["error"].startswith("timed out") and len(res["steps"]) == 3


def test_grpo_bench_stops_a_stack_when_the_next_step_would_not_fit_but_never_before_a_timed_step():
    import time

    tight = grpo_bench._Deadline(time.time() + 10, min_steps=2)  # --warmup 1: one step to warm up, one timed
    assert tight.another_fits(100.0) and not tight.another_fits(100.0)
    roomy = grpo_bench._Deadline(time.time() + 100, min_steps=1)
    assert roomy.another_fits(60.0) and roomy.another_fits(5.0)  # the last step is the estimate, not the first


@pytest.fixture(scope="session")
def tiny_bench_model(tmp_path_factory, embedded_dir) -> Path:
    """bench.make_random_model --tiny: 2 layers, hidden 64, 64 vocabulary rows past the embedded tokenizer."""
    from bench.make_random_model import main as make_model

    out = tmp_path_factory.mktemp("tiny-bench-model")
    make_model([str(out), "--tiny", "--tokenizer", str(embedded_dir)])
    return out


@pytest.mark.slow
def test_grpo_bench_runs_medcot_and_trl_on_the_same_prompts_and_tokens(tmp_path, tiny_bench_model, shared_data,
                                                                      monkeypatch):
    pytest.importorskip("trl", reason="the TRL baseline needs the bench extra (pip install -e '.[bench]'; CI's newest "
                        "environment has it, the lowest-versions one cannot: trl needs datasets>=4.7)")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "grpo.json"
    p, k, c, steps = 2, 4, 8, 3
    ret = grpo_bench.main(["--model", str(tiny_bench_model), "--quant", "none", "--device", "cpu",
                           "--items", str(shared_data / "dev_pools" / "normalized" / "medqa_usmle_4opt_dev.jsonl"),
                           "--prompts-per-step", str(p), "--k", str(k), "--completion-tokens", str(c),
                           "--micro-batch", "4", "--steps", str(steps), "--warmup", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["summary"] == ret["summary"]
    for key in ("date", "device", "versions", "command", "shape", "same_settings", "weights"):
        assert saved[key], key
    assert saved["device"] == "cpu" and "trl" in saved["versions"]
    medcot, trl = saved["results"]
    for r in (medcot, trl):
        assert "error" not in r, r.get("error")
        assert r["timed_steps"] == steps - 1 and not r["partial"]
        # Every completion is exactly c tokens in both (EOS blocked), and the 64 rows no token decodes to are blocked
        assert r["generated_tokens_per_step"] == [p * k * c] * steps
        assert r["restricted_vocab_rows"] == 64
        for key in ("step_time_median_s", "rollout_median_s", "update_median_s", "rollout_tokens_per_s", "peak_mem_gib"):
            assert r[key] > 0, (r["stack"], key)
    # medcot trains on its completions re-tokenized; TRL on the sampled ids
    assert trl["trained_tokens_per_step"] == trl["generated_tokens_per_step"]
    assert all(t > 0 for t in medcot["trained_tokens_per_step"])
    assert medcot["prompt_digests"] == trl["prompt_digests"] and len(set(trl["prompt_digests"])) == steps
    assert saved["summary"]["same_prompts"]
    assert saved["summary"]["same_generated_tokens"]
    ratio = round(trl["step_time_median_s"] / medcot["step_time_median_s"], 3)
    assert saved["summary"]["medcot_vs_trl_step"] == medcot["vs_trl"] == ratio and trl["vs_trl"] == 1.0
    assert trl["settings"]["generation_batch_size"] == p * k and trl["settings"]["steps_per_generation"] == k * p // 4
    assert not trl["settings"]["use_vllm"] and trl["settings"]["gradient_checkpointing"]
