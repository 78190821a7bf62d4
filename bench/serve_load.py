"""Serving throughput: `medcot serve` under 1, 8 and 32 concurrent streaming clients, against the same
requests generated one at a time.

The script starts `medcot serve` itself (a subprocess on a free loopback port), sends the same N chat
requests at each concurrency level (streamed, greedy, `ignore_eos` so that every request generates exactly
`--max-tokens` tokens), and measures on the client side: requests/s, time to first token (first reasoning
or answer text), and generated tokens/s (all requests' tokens / wall time). Concurrency 1 is the
one-at-a-time baseline through the server; `offline` is the same requests generated one at a time with
Hugging Face `model.generate` in this process (no server, no batching), after the server has stopped.

    # CPU, the embedded SmolLM2-135M (a few minutes on 2 cores)
    python -m bench.serve_load --requests 16 --max-tokens 32 --out docs/results/DATE_cpu_serve_load.json
    # GPU, the 8B architecture with random weights (python -m bench.make_random_model writes the folder)
    python -m bench.serve_load --model /path/to/r1-8b-random --device cuda --dtype bf16 \\
        --requests 64 --max-tokens 256 --out docs/results/DATE_h100_serve_load_bf16.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.provenance import machine

REPO = Path(__file__).resolve().parents[1]


def _questions(n: int) -> list[str]:
    rows = [json.loads(line) for line in (REPO / "medcot/assets/medical_o1_demo.jsonl").read_text().splitlines()]
    return [rows[i % len(rows)]["Question"] for i in range(n)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "medcot", "serve", "--port", str(port),
           f"model.name_or_path={args.model}", f"model.device={args.device}", f"model.dtype={args.dtype}",
           f"serve.max_batch_size={args.batch_size or max(args.concurrency)}", "serve.max_queue=1024",
           f"serve.max_tokens_limit={max(args.max_tokens, 16)}", "serve.request_timeout_s=3600",
           *args.override]
    if args.adapter:
        cmd += ["--adapter", args.adapter]
    env = {k: v for k, v in os.environ.items() if k != "MEDCOT_API_KEY"}
    log = log_path.open("w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"medcot serve exited with {proc.returncode}; see {log_path}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    sys.exit(f"medcot serve did not start within {args.startup_timeout} s; see {log_path}")


async def _request(client: httpx.AsyncClient, question: str, max_tokens: int) -> dict:
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return {"status": r.status_code}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if ttft is None and chunk["choices"]:
                delta = chunk["choices"][0]["delta"]
                if delta.get("reasoning") or delta.get("content"):
                    ttft = time.perf_counter() - t0
    return {"status": 200, "ttft_s": ttft, "latency_s": time.perf_counter() - t0, "tokens": tokens}


async def run_level(url: str, questions: list[str], clients: int, max_tokens: int) -> dict:
    queue = list(enumerate(questions))
    results: list[dict] = [{}] * len(questions)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(3600.0)) as client:

        async def worker():
            while queue:
                i, q = queue.pop(0)
                results[i] = await _request(client, q, max_tokens)

        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(clients)])
        wall = time.perf_counter() - t0
    return summarize(f"server c={clients}", clients, results, wall)


def summarize(mode: str, clients: int, results: list[dict], wall: float) -> dict:
    ok = [r for r in results if r.get("status") == 200]
    ttfts = sorted(r["ttft_s"] for r in ok if r.get("ttft_s") is not None)
    tokens = sum(r["tokens"] for r in ok)

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None

    return {
        "mode": mode, "clients": clients, "requests": len(results), "ok": len(ok),
        "errors": len(results) - len(ok), "wall_s": wall, "requests_per_s": len(ok) / wall,
        "ttft_p50_s": pct(ttfts, 0.5), "ttft_p95_s": pct(ttfts, 0.95),
        "latency_p50_s": statistics.median(r["latency_s"] for r in ok) if ok else None,
        "generated_tokens": tokens, "tokens_per_s": tokens / wall,
    }


def offline_one_at_a_time(args, questions: list[str]) -> dict:
    """The same prompts through Hugging Face generate, one at a time, in this process."""
    import torch

    from medcot.config import load_config
    from medcot.data.prompts import PromptFormatter
    from medcot.model.load import load_for_inference
    cfg = load_config(None, [f"model.name_or_path={args.model}", f"model.device={args.device}",
                             f"model.dtype={args.dtype}", *args.override])
    model, tok, cfg = load_for_inference(cfg, args.adapter)
    fmt = PromptFormatter(tok, cfg.prompt)
    device = next(model.parameters()).device
    results = []
    t0 = time.perf_counter()
    for q in questions:
        ids = torch.tensor([fmt.encode_prompt(q)], device=device)
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_tokens,
                                 min_new_tokens=args.max_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        if device.type == "cuda":
            torch.cuda.synchronize()
        results.append({"status": 200, "ttft_s": None, "latency_s": time.perf_counter() - t,
                        "tokens": out.shape[1] - ids.shape[1]})
    return summarize("offline HF generate, one at a time", 1, results, time.perf_counter() - t0)


def _fmt(v, spec, suffix=""):
    return "-" if v is None else format(v, spec) + suffix


def print_table(rows: list[dict], baseline: dict) -> None:
    print()
    print(f"{'mode':<38} {'req':>4} {'err':>4} {'wall s':>7} {'req/s':>7} {'TTFT p50':>9} {'TTFT p95':>9} "
          f"{'lat p50':>8} {'gen tok/s':>10} {'vs c=1':>7}")
    for r in rows:
        print(f"{r['mode']:<38} {r['requests']:>4} {r['errors']:>4} {r['wall_s']:>7.1f} {r['requests_per_s']:>7.2f} "
              f"{_fmt(r['ttft_p50_s'], '.2f', 's'):>9} {_fmt(r['ttft_p95_s'], '.2f', 's'):>9} "
              f"{_fmt(r['latency_p50_s'], '.2f', 's'):>8} "
              f"{r['tokens_per_s']:>10.1f} {r['tokens_per_s'] / baseline['tokens_per_s']:>6.2f}x")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded", help="model.name_or_path: 'embedded', a local folder or hub id")
    p.add_argument("--adapter", help="a run folder from medcot train")
    p.add_argument("--device", default="auto", help="model.device: auto, cpu, cuda")
    p.add_argument("--dtype", default="auto", help="model.dtype: auto, bf16, fp16, fp32")
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32],
                   help="concurrent clients per level (default 1,8,32)")
    p.add_argument("--requests", type=int, default=32, help="requests per level (the same ones each time)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request (EOS ignored)")
    p.add_argument("--batch-size", type=int, help="serve.max_batch_size (default: the largest concurrency)")
    p.add_argument("--no-offline", action="store_true", help="skip the in-process one-at-a-time baseline")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    p.add_argument("--startup-timeout", type=float, default=900)
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--server-log", default=str(Path(tempfile.gettempdir()) / "medcot_serve_load.log"))
    args = p.parse_args()

    questions = _questions(args.requests)
    log_path = Path(args.server_log)
    print(f"starting medcot serve ({args.model}, {args.device}); server log: {log_path}", flush=True)
    proc, url = start_server(args, log_path)
    rows = []
    try:
        health = httpx.get(f"{url}/health").json()
        asyncio.run(run_level(url, questions[:2], 1, min(8, args.max_tokens)))  # warm-up (kernels, allocator)
        for clients in args.concurrency:
            row = asyncio.run(run_level(url, questions, clients, args.max_tokens))
            rows.append(row)
            print(f"  c={clients:<3} {row['requests_per_s']:.2f} req/s, {row['tokens_per_s']:.1f} tok/s, "
                  f"TTFT p50 {_fmt(row['ttft_p50_s'], '.2f')} s", flush=True)
    finally:
        proc.terminate()
        proc.wait(60)
    if not args.no_offline:
        print("offline baseline: HF generate, one request at a time ...", flush=True)
        rows.append(offline_one_at_a_time(args, questions))
    baseline = rows[0]
    print_table(rows, baseline)
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    result = {
        "bench": "serve_load", "model": args.model, "adapter": args.adapter, "device": args.device,
        "dtype": args.dtype, "requests": args.requests, "max_tokens": args.max_tokens,
        "max_batch_size": health["max_batch_size"], "rows": rows,
        "machine": machine(loadavg_at_end=load, platform=platform.platform()),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
