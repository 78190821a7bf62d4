"""The model runner: a Llama-architecture model's own modules over the slot KV cache, prefill and decode.

It walks the model's modules itself (embedding, each layer's norms, q/k/v/o projections, MLP, final norm,
lm_head) instead of calling `model.forward`, so that
- the KV cache is static (`kv.SlotKVCache`): one decode step over n running requests is a fixed sequence
  of kernels that a CUDA graph replays, one graph per (batch bucket, cache-length bucket), captured on
  first use; the host launches one graph per token instead of ~1,500 kernels;
- the projections are whatever modules the model holds: plain `nn.Linear`, PEFT LoRA layers (unmerged),
  bitsandbytes 4-bit linears all work, since they are called, not read;
- on CUDA the pointwise work between the matrix products (RMSNorm with the residual add, RoPE, SiLU*up,
  the masked softmax) runs as a few fused kernels (`torch.compile` of those small functions, dynamic
  shapes, so one compile covers every batch size); on CPU the same functions run eagerly, computing
  exactly what the transformers modules compute.

Prefill runs eagerly (long sequences keep the GPU busy without graphs): several prompts right-padded into
one batch with causal attention (padding comes after each prompt's last token, so it changes nothing), or
one long prompt in chunks, each chunk attending to the cache written so far.

Decode attention reads each running slot's cache up to the step's length bucket, with grouped-query
heads kept grouped (no repeated K/V): scores [b, kv_heads, group, L] = q @ K^T, masked past each slot's
position, softmax in fp32, @ V.

Supported: Llama, Mistral and Qwen2 without sliding windows, Qwen3 (q/k norms); one device. Anything else
raises `UnsupportedModel`.
"""

from __future__ import annotations

import logging
import os
import time

import torch
import torch.nn.functional as F

from medcot.generate.kv import SlotKVCache

log = logging.getLogger(__name__)

SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_PLAIN_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"}
_SILU = {"SiLU", "SiLUActivation"}

# Decode batch buckets (one CUDA graph each, times the length buckets): small steps at small batches,
# where padding rows cost weight reads anyway; 32 apart past 128.
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 80, 96, 112, 128, *range(160, 4097, 32))


class UnsupportedModel(ValueError):
    """The engine cannot run this model (architecture, sliding window, several devices)."""


# -- the pointwise pieces, computed as the transformers modules compute them ---------------------------


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return w * x.to(dtype)


def _add_rms(h: torch.Tensor, o: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    h = h + o
    return h, _rms(h, w, eps)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q [N, Hq, D], k [N, Hkv, D], cos/sin [N, D]."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return F.silu(g) * u


def _masked_softmax(s: torch.Tensor, valid: torch.Tensor, scaling: float) -> torch.Tensor:
    """s [b, Hkv, G, L] raw scores, valid [b, L]: fp32 softmax over the valid positions, in s's dtype."""
    dtype = s.dtype
    s = (s * scaling).to(torch.float32).masked_fill(~valid[:, None, None, :], float("-inf"))
    return torch.softmax(s, dim=-1).to(dtype)


_EAGER = {"rms": _rms, "add_rms": _add_rms, "rope": _rope, "silu_mul": _silu_mul, "softmax": _masked_softmax}
_COMPILED: dict[str, object] = {}


def _kernels(compiled: bool) -> dict:
    if not compiled:
        return _EAGER
    if not _COMPILED:
        for name, fn in _EAGER.items():
            _COMPILED[name] = torch.compile(fn, dynamic=True, fullgraph=True)
    return _COMPILED


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    return default if value is None else value.strip().lower() not in ("0", "false", "no", "off", "")


def unwrap(model):
    """The transformers model under a PEFT wrapper (its LoRA layers stay in place, unmerged)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def check_supported(model, max_len: int | None = None) -> None:
    """Raise UnsupportedModel with the reason when the runner cannot run `model`."""
    base = unwrap(model)
    cfg = getattr(base, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind not in SUPPORTED_TYPES:
        raise UnsupportedModel(f"the generation engine runs {', '.join(SUPPORTED_TYPES)} models; this one is "
                               f"{kind or type(base).__name__!r}")
    window = getattr(cfg, "sliding_window", None)
    if window and getattr(cfg, "use_sliding_window", True) and (max_len is None or max_len > window):
        raise UnsupportedModel(f"sliding-window attention (sliding_window={window}) is not supported")
    inner = getattr(base, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb") or not hasattr(base, "lm_head"):
        raise UnsupportedModel(f"{type(base).__name__} does not have the Llama module layout")
    devices = {p.device for p in base.parameters()}
    if len(devices) != 1:
        raise UnsupportedModel(f"the model is spread over several devices ({sorted(map(str, devices))})")


class ModelRunner:
    """Prefill and decode over a static slot KV cache (see the module docstring).

    Args:
        slots: KV-cache slots (the most requests decoded together).
        max_len: positions per slot (prompt + generated tokens).
        cuda_graphs / compile: default on for CUDA, off elsewhere (env MEDCOT_CUDA_GRAPHS / MEDCOT_COMPILE=0
            turn them off).
    """

    def __init__(self, model, *, slots: int, max_len: int, cuda_graphs: bool | None = None,
                 compile: bool | None = None):
        check_supported(model, max_len)
        base = unwrap(model)
        cfg = base.config
        inner = base.model
        self.embed = inner.embed_tokens
        self.layers = list(inner.layers[: cfg.num_hidden_layers])
        self.final_norm = inner.norm
        self.lm_head = base.lm_head
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.group = self.n_heads // self.n_kv
        self.scaling = float(getattr(attn, "scaling", self.head_dim ** -0.5))
        self.device = self.embed.weight.device
        self.dtype = self.embed.weight.dtype if self.embed.weight.is_floating_point() else torch.bfloat16
        self.vocab = cfg.vocab_size
        on_cuda = self.device.type == "cuda"
        self.use_graphs = on_cuda and _env_flag("MEDCOT_CUDA_GRAPHS", True if cuda_graphs is None else cuda_graphs)
        self.use_compile = on_cuda and _env_flag("MEDCOT_COMPILE", True if compile is None else compile)
        self.k = _kernels(self.use_compile)
        # Decode attention: "bmm" (q @ K^T, fp32 softmax, @ V; as transformers' eager attention) or "sdpa"
        # (PyTorch's fused kernel, fp32 scores); MEDCOT_DECODE_ATTN picks one (measured in bench/generate_throughput).
        self.decode_attn = os.environ.get("MEDCOT_DECODE_ATTN", "bmm")
        self.slots, self.max_len = slots, max_len
        self.kv = SlotKVCache(len(self.layers), slots, self.n_kv, max_len, self.head_dim, self.dtype, self.device)
        # Per-layer plans: fused norms where the norm is the plain RMSNorm, the module itself otherwise.
        norms = [(la.input_layernorm, la.post_attention_layernorm) for la in self.layers]
        self._plain_norms = all(self._plain(n) for pair in norms for n in pair) and self._plain(self.final_norm)
        self._fused_mlp = all(
            all(hasattr(la.mlp, p) for p in ("gate_proj", "up_proj", "down_proj"))
            and type(getattr(la.mlp, "act_fn", None)).__name__ in _SILU for la in self.layers)
        self._qk_norm = hasattr(attn, "q_norm") and hasattr(attn, "k_norm")
        # MEDCOT_FUSE_PROJ=1: q/k/v and gate/up of plain nn.Linear layers as one matrix product each (fewer,
        # larger GEMVs at small batches), at the cost of a fused copy of those weights (~9 GiB for 8B).
        self._fused: dict[int, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
        if on_cuda and _env_flag("MEDCOT_FUSE_PROJ", False):
            plain = lambda *ms: all(type(m) is torch.nn.Linear and m.bias is None for m in ms)  # noqa: E731
            with torch.no_grad():
                for i, la in enumerate(self.layers):
                    a, m = la.self_attn, la.mlp
                    qkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]) \
                        if plain(a.q_proj, a.k_proj, a.v_proj) and not self._qk_norm else None
                    gu = torch.cat([m.gate_proj.weight, m.up_proj.weight]) \
                        if self._fused_mlp and plain(m.gate_proj, m.up_proj) else None
                    self._fused[i] = (qkv, gu)
        with torch.inference_mode():
            # RoPE for every position, from the model's own rotary module (any rope type it implements).
            probe = torch.zeros(1, dtype=self.dtype, device=self.device)
            cos, sin = inner.rotary_emb(probe, torch.arange(max_len, device=self.device)[None])
            self.cos, self.sin = cos[0].to(self.dtype), sin[0].to(self.dtype)
            self._arange = torch.arange(max_len, device=self.device)
            # Decode inputs: row 0 the tokens, row 1 their positions (graphs read these addresses).
            self._io = torch.zeros((2, slots), dtype=torch.long, device=self.device)
            self._host = torch.zeros((2, slots), dtype=torch.long, pin_memory=on_cuda)
        self._copied: torch.cuda.Event | None = None
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.capture_s = 0.0  # time spent warming up and capturing graphs

    @staticmethod
    def _plain(norm) -> bool:
        return type(norm).__name__ in _PLAIN_NORMS and hasattr(norm, "variance_epsilon")

    # -- the pieces -------------------------------------------------------------------------------------

    def _norm(self, norm, x):
        if self._plain_norms:
            return self.k["rms"](x, norm.weight, norm.variance_epsilon)
        return norm(x)

    def _add_norm(self, h, o, norm):
        if self._plain_norms:
            return self.k["add_rms"](h, o, norm.weight, norm.variance_epsilon)
        h = h + o
        return h, norm(h)

    def _mlp(self, i, mlp, x):
        gu = self._fused.get(i, (None, None))[1]
        if gu is not None:
            g, u = F.linear(x, gu).split(gu.shape[0] // 2, dim=-1)
            return mlp.down_proj(self.k["silu_mul"](g, u))
        if self._fused_mlp:
            return mlp.down_proj(self.k["silu_mul"](mlp.gate_proj(x), mlp.up_proj(x)))
        return mlp(x)

    def _qkv(self, i, attn, x, cos, sin):
        """x [N, hidden] -> q [N, Hq, D], k/v [N, Hkv, D], RoPE applied."""
        n = x.shape[0]
        qkv = self._fused.get(i, (None, None))[0]
        if qkv is not None:
            nq, nkv = self.n_heads * self.head_dim, self.n_kv * self.head_dim
            q, k, v = F.linear(x, qkv).split([nq, nkv, nkv], dim=-1)
            q = q.view(n, self.n_heads, self.head_dim)
            k = k.view(n, self.n_kv, self.head_dim)
            v = v.view(n, self.n_kv, self.head_dim)
        else:
            q = attn.q_proj(x).view(n, self.n_heads, self.head_dim)
            k = attn.k_proj(x).view(n, self.n_kv, self.head_dim)
            v = attn.v_proj(x).view(n, self.n_kv, self.head_dim)
        if self._qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = self.k["rope"](q, k, cos, sin)
        return q, k, v

    def _layers(self, h, cos, sin, attend):
        """The decoder stack on flat tokens h [N, hidden]; returns the final-normed hidden states."""
        x = self._norm(self.layers[0].input_layernorm, h)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            q, k, v = self._qkv(i, attn, x, cos, sin)
            o = attn.o_proj(attend(i, q, k, v))
            h, x = self._add_norm(h, o, layer.post_attention_layernorm)
            m = self._mlp(i, layer.mlp, x)
            nxt = self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else self.final_norm
            h, x = self._add_norm(h, m, nxt)
        return x

    # -- decode -----------------------------------------------------------------------------------------

    def _decode_forward(self, b: int, length: int) -> torch.Tensor:
        """One token for slots 0..b-1 (inputs in self._io), attending to positions < length."""
        tok, pos = self._io[0, :b], self._io[1, :b]
        h = self.embed(tok)
        cos, sin = self.cos.index_select(0, pos), self.sin.index_select(0, pos)
        valid = self._arange[:length][None, :] <= pos[:, None]
        kv, g = self.kv, self.group
        idx = kv.decode_index(pos)
        if self.decode_attn == "sdpa":
            # The query heads of one KV head as the query positions of one attention (no repeated K/V):
            # the fused kernel reads K/V once and keeps scores in fp32.
            bias = torch.zeros(valid.shape, dtype=self.dtype, device=self.device).masked_fill_(~valid, float("-inf"))
            bias = bias[:, None, None, :]

        def attend(i, q, k, v):
            kv.write_decode(i, idx, k, v)
            keys, values = kv.k[i, :b, :, :length], kv.v[i, :b, :, :length]
            q = q.view(b, self.n_kv, g, self.head_dim)
            if self.decode_attn == "sdpa":
                o = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, scale=self.scaling)
                return o.reshape(b, self.n_heads * self.head_dim)
            s = torch.matmul(q, keys.transpose(-1, -2))
            p = self.k["softmax"](s, valid, self.scaling)
            return torch.matmul(p, values).reshape(b, self.n_heads * self.head_dim)

        return self.lm_head(self._layers(h, cos, sin, attend)).float()

    def batch_bucket(self, n: int) -> int:
        for b in BATCH_BUCKETS:
            if b >= n:
                return min(b, self.slots)
        return self.slots

    def length_bucket(self, n: int) -> int:
        """Cache positions a step attends to: 256 apart up to 2,048, then 1,024 apart."""
        step = 256 if n <= 2048 else 1024
        return min(self.max_len, -(-n // step) * step)

    @torch.inference_mode()
    def decode(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """Feed tokens[i] at positions[i] to slot i (i < n); returns the next-token logits [n, vocab] (fp32)."""
        n = len(tokens)
        if not self.use_graphs:
            self._io[0, :n] = torch.tensor(tokens, dtype=torch.long).to(self.device)
            self._io[1, :n] = torch.tensor(positions, dtype=torch.long).to(self.device)
            return self._decode_forward(n, max(positions) + 1)
        b, length = self.batch_bucket(n), self.length_bucket(max(positions) + 1)
        host = self._host
        if self._copied is not None:  # the last step's copy out of the pinned buffer must be done before reuse
            self._copied.synchronize()
        host[0, :n] = torch.tensor(tokens, dtype=torch.long)
        host[1, :n] = torch.tensor(positions, dtype=torch.long)
        host[:, n:b] = 0  # padding rows decode token 0 at position 0 of free slots: their results are unused
        self._io[:, :b].copy_(host[:, :b], non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()
        graph = self._graphs.get((b, length)) or self._capture(b, length)
        if graph is None:  # capture failed: eager from now on
            return self._decode_forward(b, length)[:n]
        graph[0].replay()
        return graph[1][:n]

    def _capture(self, b: int, length: int):
        t0 = time.perf_counter()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with torch.cuda.stream(stream):
                self._decode_forward(b, length)  # compiles the fused pieces, warms cuBLAS (same inputs: idempotent)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                out = self._decode_forward(b, length)
        except Exception as e:  # a module that syncs with the host (or is otherwise uncapturable)
            log.warning("CUDA graph capture failed (%s: %s); decoding without graphs", type(e).__name__, e)
            torch.cuda.synchronize(self.device)
            self.use_graphs = False
            self._graphs.clear()
            return None
        self._graphs[(b, length)] = (graph, out)
        self.capture_s += time.perf_counter() - t0
        return self._graphs[(b, length)]

    def capture(self, batch_sizes: list[int], lengths: list[int]) -> float:
        """Capture the graphs for these batch sizes and cache lengths ahead of time (only while no request
        runs: it decodes dummy tokens into slots). Returns the seconds it took."""
        if not self.use_graphs:
            return 0.0
        t0 = time.perf_counter()
        with torch.inference_mode():
            for n in sorted({self.batch_bucket(n) for n in batch_sizes}, reverse=True):
                for length in sorted({self.length_bucket(x) for x in lengths}, reverse=True):
                    if (n, length) not in self._graphs:
                        self._io.zero_()
                        if self._capture(n, length) is None:
                            return time.perf_counter() - t0
        torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    # -- prefill ----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, seqs: list[list[int]], slots: list[int], start: int = 0) -> torch.Tensor:
        """Write the KV of each token sequence into its slot (positions start..) and return the logits after
        each sequence's last token [n, vocab] (fp32). Several sequences only with start == 0."""
        n, t = len(seqs), max(len(s) for s in seqs)
        if start and n != 1:
            raise ValueError("a chunk after the start of a prompt is prefilled alone")
        if start + t > self.max_len:
            raise ValueError(f"{start + t} positions do not fit a cache slot of {self.max_len}")
        ids = torch.zeros((n, t), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        ids = ids.to(self.device)
        slot_idx = torch.tensor(slots, dtype=torch.long, device=self.device)
        h = self.embed(ids).reshape(n * t, -1)
        cos = self.cos[start:start + t][None].expand(n, t, -1).reshape(n * t, -1)
        sin = self.sin[start:start + t][None].expand(n, t, -1).reshape(n * t, -1)
        kv = self.kv
        mask = None
        if start:  # this chunk attends to the cache written so far and causally to itself
            mask = self._arange[: start + t][None, :] <= (start + self._arange[:t])[:, None]

        def attend(i, q, k, v):
            q = q.view(n, t, self.n_heads, self.head_dim).transpose(1, 2)
            k = k.view(n, t, self.n_kv, self.head_dim).transpose(1, 2)
            v = v.view(n, t, self.n_kv, self.head_dim).transpose(1, 2)
            kv.write_prefill(i, slot_idx, start, k, v)
            if mask is None:
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling,
                                                   enable_gqa=self.group > 1)
            else:
                keys = kv.k[i][slot_idx, :, : start + t].repeat_interleave(self.group, dim=1)
                values = kv.v[i][slot_idx, :, : start + t].repeat_interleave(self.group, dim=1)
                o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling)
            return o.transpose(1, 2).reshape(n * t, self.n_heads * self.head_dim)

        x = self._layers(h, cos, sin, attend)
        last = torch.tensor([i * t + len(s) - 1 for i, s in enumerate(seqs)], device=self.device)
        return self.lm_head(x.index_select(0, last)).float()


def fit_slots(model, want: int, max_len: int, *, reserve_gib: float = 6.0, memory_fraction: float = 0.92) -> int:
    """How many KV-cache slots of `max_len` positions fit next to the model (all of `want` off CUDA)."""
    base = unwrap(model)
    device = next(base.parameters()).device
    if device.type != "cuda":
        return want
    cfg = base.config
    attn = base.model.layers[0].self_attn
    dtype = base.model.embed_tokens.weight.dtype
    per_slot = SlotKVCache.bytes_per_slot(cfg.num_hidden_layers, getattr(cfg, "num_key_value_heads", None)
                                          or cfg.num_attention_heads, max_len, attn.head_dim, dtype)
    free, total = torch.cuda.mem_get_info(device)
    budget = free - (1 - memory_fraction) * total - reserve_gib * 2**30
    # Each decode row also holds fp32 logits (twice: the graph's output and the sampler's work).
    per_slot += 8 * cfg.vocab_size
    fit = int(budget // per_slot)
    if fit < 1:
        raise torch.cuda.OutOfMemoryError(
            f"no room for one KV-cache slot of {max_len} positions ({per_slot / 2**30:.2f} GiB): "
            f"{free / 2**30:.1f} GiB free; lower the maximum prompt + new tokens")
    return max(1, min(want, fit))
