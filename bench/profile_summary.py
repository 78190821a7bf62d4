"""Where one training step's GPU time goes, read from a torch.profiler Chrome trace.

    python -m bench.profile_summary TRACE.json.gz [--lora-rank 16] [--vocab 128256]

`bench.train_throughput --profile-stacks ...` records one step per stack with `profile_step` below and
writes the trace and this summary. Every GPU kernel (and copy) is tied to the host call that launched
it (through the trace's correlation ids) and to the host ranges open at that moment, then sorted:

  kind   NF4 dequantize | base matmuls | LoRA matmuls (an operand of size --lora-rank) |
         attention | lm_head + loss (an operand of size --vocab, or a cross-entropy kernel) |
         norm/RoPE/SwiGLU kernels | optimizer | copies (memcpy/memset: offload, host<->device) | other
  phase  forward | recompute (a decoder layer run again inside backward) | backward | optimizer

Also: GPU busy vs idle time inside the step (idle = the GPU waited for the host: launches, syncs),
host synchronisations (count, time the host was blocked, which op asked), and the top kernels.
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import Counter, defaultdict
from pathlib import Path

KINDS = ["NF4 dequantize", "base matmuls", "LoRA matmuls", "attention", "lm_head + loss",
         "norm/RoPE/SwiGLU kernels", "optimizer", "copies", "other"]
PHASES = ["forward", "recompute", "backward", "optimizer"]
STEP = "bench::step"
FORWARD, RECOMPUTE, OPTIMIZER = "bench::layer_forward", "bench::layer_recompute", "bench::optimizer"

_MM_OPS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
           "aten::_scaled_mm", "aten::addmv", "aten::mv"}
_GEMM_NAMES = ("gemm", "nvjet", "xmma", "cutlass", "cublas", "wgmma", "splitk")
_ATTN_KERNEL = ("flash", "fmha", "attn", "attention")
_ATTN_OPS = ("flash_attention", "varlen", "scaled_dot_product", "efficient_attention", "cudnn_attention")
_FUSED_NAMES = ("rms", "rope", "swiglu", "silu", "geglu", "layernorm", "layer_norm", "_fg_kernel", "dfg_kernel")
_SYNCS = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy", "cuStreamSynchronize",
          "cuCtxSynchronize"}


def load_trace(path: str | Path) -> dict:
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return json.load(f)


def _flat_dims(dims) -> set[int]:
    out: set[int] = set()
    stack = [dims]
    while stack:
        d = stack.pop()
        if isinstance(d, list):
            stack.extend(d)
        elif isinstance(d, int):
            out.add(d)
    return out


def _close_aborted_recomputes(events: list[dict]) -> None:
    """End each recompute range no later than the backward node that triggered it.

    Non-reentrant checkpointing stops a layer's recompute with an exception once it has what backward
    needs; a profile recorded before the hooks used `always_call` has that range left open to the end
    of the step. The range cannot outlast the `evaluate_function` it started in, so it is cut there.
    """
    nodes = defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and str(e.get("name", "")).startswith("autograd::engine::evaluate_function"):
            nodes[(e.get("pid"), e.get("tid"))].append((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))))
    for e in events:
        if e.get("ph") != "X" or e.get("name") != RECOMPUTE or e.get("cat") != "user_annotation":
            continue
        ts = float(e["ts"])
        inside = [n for n in nodes.get((e.get("pid"), e.get("tid")), ()) if n[0] <= ts <= n[1]]
        if inside:
            end = max(inside)[1]  # the innermost node: the one that started last
            if ts + float(e.get("dur", 0)) > end:
                e["dur"] = end - ts


def _ancestors(events: list[dict]) -> dict[int, tuple]:
    """correlation id -> the host ranges (name, args) open on the launching thread, outermost first."""
    ranges, launches = defaultdict(list), defaultdict(list)
    for e in events:
        if e.get("ph") != "X":
            continue
        cat = e.get("cat", "")
        key = (e.get("pid"), e.get("tid"))
        if cat in ("cpu_op", "user_annotation"):
            ranges[key].append((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), e["name"], e.get("args", {})))
        elif cat in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {}):
            launches[key].append((float(e["ts"]), e["args"]["correlation"]))
    found: dict[int, tuple] = {}
    for key, calls in launches.items():
        rs = sorted(ranges.get(key, []), key=lambda r: (r[0], -r[1]))
        calls.sort()
        stack: list[tuple] = []
        i = 0
        for ts, corr in calls:
            while i < len(rs) and rs[i][0] <= ts:
                while stack and stack[-1][1] <= rs[i][0]:
                    stack.pop()
                stack.append(rs[i])
                i += 1
            while stack and stack[-1][1] < ts:
                stack.pop()
            found[corr] = tuple((r[2], r[3]) for r in stack if r[0] <= ts <= r[1])
    return found


def _phase(names: list[str]) -> str:
    if any(n == OPTIMIZER or n.startswith(("Optimizer.step", "Optimizer.zero_grad")) for n in names):
        return "optimizer"
    if RECOMPUTE in names:
        return "recompute"
    if any(n.startswith("autograd::engine::evaluate_function") for n in names):
        return "backward"
    return "forward"


def _kind(kernel: str, cat: str, anc: tuple, phase: str, lora_rank: int, vocab: int) -> str:
    if cat in ("gpu_memcpy", "gpu_memset"):
        return "copies"
    if phase == "optimizer":
        return "optimizer"
    k = kernel.lower()
    names = [n for n, _ in anc]
    lower = [n.lower() for n in names]
    if "dequant" in k or any("dequantize" in n for n in lower):
        return "NF4 dequantize"
    if any(s in k for s in _ATTN_KERNEL) or any(s in n for n in lower for s in _ATTN_OPS):
        return "attention"
    mm = next((a for n, a in reversed(anc) if n in _MM_OPS and a.get("Input Dims")), None)
    if mm is not None or any(s in k for s in _GEMM_NAMES):
        dims = _flat_dims(mm.get("Input Dims")) if mm is not None else set()
        if vocab in dims or any("cross_entropy" in n for n in lower):
            return "lm_head + loss"
        if lora_rank in dims:
            return "LoRA matmuls"
        return "base matmuls"
    if "cross_entropy" in k or any("cross_entropy" in n for n in lower):
        return "lm_head + loss"
    if any(s in k for s in _FUSED_NAMES):
        return "norm/RoPE/SwiGLU kernels"
    return "other"


def _union_ms(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, None
    for s, e in sorted(intervals):
        if end is None or s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total / 1e3


def summarize(trace: dict, lora_rank: int = 16, vocab: int = 128256) -> dict:
    """The breakdown described in the module docstring, in milliseconds."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    _close_aborted_recomputes(events)
    anc = _ancestors(events)
    table = {k: dict.fromkeys(PHASES, 0.0) for k in KINDS}
    kernels, busy, top, dequant = 0, [], Counter(), 0
    top_n: Counter = Counter()
    for e in events:
        if e.get("ph") != "X" or e.get("cat") not in ("kernel", "gpu_memcpy", "gpu_memset"):
            continue
        a = anc.get(e.get("args", {}).get("correlation"), ())
        phase = _phase([n for n, _ in a])
        kind = _kind(e["name"], e["cat"], a, phase, lora_rank, vocab)
        ms = float(e.get("dur", 0)) / 1e3
        table[kind][phase] += ms
        kernels += 1
        busy.append((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))))
        top[e["name"][:90]] += ms
        top_n[e["name"][:90]] += 1
        dequant += kind == "NF4 dequantize" and e["cat"] == "kernel"
    step = [e for e in events if e.get("ph") == "X" and e.get("name") == STEP]
    lo = min([s for s, _ in busy] + [float(x["ts"]) for x in step], default=0.0)
    hi = max([t for _, t in busy] + [float(x["ts"]) + float(x.get("dur", 0)) for x in step], default=0.0)
    syncs = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("cuda_runtime", "cuda_driver")
             and e.get("name") in _SYNCS]
    by_op = Counter()
    for s in syncs:
        a = anc.get(s.get("args", {}).get("correlation"), ())
        ops = [n for n, _ in a if not n.startswith("bench::")]
        by_op[ops[-1] if ops else "(no op)"] += 1
    busy_ms = _union_ms(busy)
    return {
        "window_ms": round((hi - lo) / 1e3, 2), "gpu_busy_ms": round(busy_ms, 2),
        "gpu_idle_ms": round((hi - lo) / 1e3 - busy_ms, 2), "kernels": kernels,
        "kind_ms": {k: round(sum(v.values()), 2) for k, v in table.items()},
        "phase_ms": {p: round(sum(table[k][p] for k in KINDS), 2) for p in PHASES},
        "table_ms": {k: {p: round(v, 2) for p, v in row.items()} for k, row in table.items()},
        "dequantize_kernels": dequant,
        "host_syncs": {"count": len(syncs), "blocked_ms": round(sum(float(s.get("dur", 0)) for s in syncs) / 1e3, 2),
                       "by_op": dict(by_op.most_common(8))},
        "top_kernels": [[n, round(ms, 2), top_n[n]] for n, ms in top.most_common(15)],
    }


def format_summary(s: dict, title: str = "") -> str:
    """A Markdown table: kind x phase (ms of kernel time), then busy/idle and host syncs."""
    total = sum(s["kind_ms"].values())
    lines = [f"**{title}**" if title else "", "",
             "| GPU time, ms | " + " | ".join(PHASES) + " | total | share |",
             "|---|" + "---|" * (len(PHASES) + 2)]
    for k in KINDS:
        row = s["table_ms"][k]
        if s["kind_ms"][k] == 0:
            continue
        lines.append(f"| {k} | " + " | ".join(f"{row[p]:.1f}" for p in PHASES)
                     + f" | {s['kind_ms'][k]:.1f} | {100 * s['kind_ms'][k] / max(total, 1e-9):.0f}% |")
    lines.append("| **all kernels** | " + " | ".join(f"{s['phase_ms'][p]:.1f}" for p in PHASES) + f" | {total:.1f} | |")
    hs = s["host_syncs"]
    syncs = ", ".join(f"{k} ×{v}" for k, v in hs["by_op"].items()) or "none"
    lines += ["", (f"Step window {s['window_ms']:.1f} ms: GPU busy {s['gpu_busy_ms']:.1f} ms, idle {s['gpu_idle_ms']:.1f} ms; "
                   f"{s['kernels']} kernels, {s['dequantize_kernels']} dequantize kernels; host syncs: {hs['count']} "
                   f"({hs['blocked_ms']:.1f} ms blocked; {syncs}).")]
    return "\n".join(lines).strip("\n")


# ---------------------------------------------------------------------------------------------
# Recording one step (on the GPU machine).


class LayerPhases:
    """Marks each decoder layer call as forward or recompute (a layer run inside backward), for the trace.

    Forward hooks open a `bench::layer_forward` or `bench::layer_recompute` range around each layer
    call. Where transformers checkpoints the layer's `__call__` (5.17), recompute calls the module again
    and the hooks see it; where it checkpoints `forward` only (later 5.x), the layer's
    `_gradient_checkpointing_func` is wrapped so that its re-run inside backward is marked too.
    """

    def __init__(self, model):
        self.layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
        self.handles, self.open, self.wrapped = [], defaultdict(list), []

    def __enter__(self):
        import functools

        import torch

        def label():
            return RECOMPUTE if torch._C._current_graph_task_id() != -1 else FORWARD

        def pre(module, args):
            rf = torch.autograd.profiler.record_function(label())
            rf.__enter__()
            self.open[id(module)].append(rf)

        def post(module, args, out):
            if self.open[id(module)]:
                self.open[id(module)].pop().__exit__(None, None, None)

        def marked(fn):
            @functools.wraps(fn)
            def run(*a, **k):
                if label() != RECOMPUTE:
                    return fn(*a, **k)
                with torch.autograd.profiler.record_function(RECOMPUTE):
                    return fn(*a, **k)
            return run

        try:
            from transformers.modeling_layers import GradientCheckpointingLayer
            hooks_see_recompute = "__call__" in GradientCheckpointingLayer.__dict__
        except ImportError:
            hooks_see_recompute = True
        for layer in self.layers:
            self.handles.append(layer.register_forward_pre_hook(pre))
            # always_call: non-reentrant checkpointing ends a recompute early by raising; close the range then too
            self.handles.append(layer.register_forward_hook(post, always_call=True))
            func = layer.__dict__.get("_gradient_checkpointing_func")
            if func is not None and not hooks_see_recompute:
                layer._gradient_checkpointing_func = lambda fn, *a, _f=func, **k: _f(marked(fn), *a, **k)
                self.wrapped.append((layer, func))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        for layer, func in self.wrapped:
            layer._gradient_checkpointing_func = func
        self.handles, self.wrapped = [], []


class StepProfiler:
    """Profile one training step: `start()` before it, `stop()` after it; writes TRACE (.json.gz) and returns
    the summary. Shapes are recorded (to tell LoRA from base matmuls), which adds host overhead: the
    profiled step's wall time is longer than an unprofiled one, kernel times are not."""

    def __init__(self, model, trace_path: str | Path, lora_rank: int = 16, vocab: int = 128256):
        self.model, self.trace_path, self.lora_rank, self.vocab = model, Path(trace_path), lora_rank, vocab

    def start(self) -> None:
        """Never raises: a failure is reported by `stop()`, so the benchmark keeps its timed steps."""
        self.error, self.entered, self.prof = None, [], None
        try:
            import torch
            from torch.profiler import ProfilerActivity, profile

            if torch.cuda.is_available():
                torch.cuda.synchronize()
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = profile(activities=activities, record_shapes=True)
            for cm in (LayerPhases(self.model), self.prof, torch.autograd.profiler.record_function(STEP)):
                cm.__enter__()
                self.entered.append(cm)
        except Exception as e:  # noqa: BLE001  (a profiling failure must not cost the measurement)
            self.error = f"start: {type(e).__name__}: {e}"

    def stop(self) -> dict:
        """The summary of the profiled step (module docstring), or {"error": ...}."""
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
            while self.entered:
                self.entered.pop().__exit__(None, None, None)
            if self.error:
                return {"error": self.error}
            self.trace_path.parent.mkdir(parents=True, exist_ok=True)
            raw = self.trace_path.with_name(self.trace_path.name.removesuffix(".gz"))
            self.prof.export_chrome_trace(str(raw))
            trace = json.loads(raw.read_text())
            if self.trace_path.suffix == ".gz":
                with gzip.open(self.trace_path, "wt", compresslevel=6) as f:
                    json.dump(trace, f)
                raw.unlink()
            return summarize(trace, self.lora_rank, self.vocab)
        except Exception as e:  # noqa: BLE001
            return {"error": f"stop: {type(e).__name__}: {e}"}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace", nargs="+", help="Chrome trace(s) from torch.profiler (.json or .json.gz)")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = ap.parse_args(argv)
    for path in args.trace:
        s = summarize(load_trace(path), args.lora_rank, args.vocab)
        print(json.dumps(s, indent=2) if args.json else format_summary(s, Path(path).name) + "\n")


if __name__ == "__main__":
    main()
