"""Fast path: what makes CUDA training faster than the plain transformers + PEFT stack.

1. Padding-free packing (collate.pack_collate / micro_batches): a step's rows are concatenated
   into few large micro-batches with position ids restarting per row; no compute on padding, and
   4-bit weights are dequantized once per micro-batch instead of once per 2 rows. Attention runs
   per row (`use_packed_attention`), so packing adds no cross-row attention work.
2. Liger Kernel's fused Triton kernels for HF Llama: RMSNorm, RoPE, SwiGLU, and a fused
   linear + cross-entropy that never materialises the (tokens × 128k vocabulary) fp32 logits.
3. Selective activation checkpointing (train.checkpoint_ratio): recompute only as many layers as
   memory requires; with train.offload_activations the recomputed layers' inputs wait in host memory.
4. `skip_optimizer_syncs`: no device sync after every tensor in bitsandbytes' 8-bit optimizer step.
5. LoRA fused with the base matmul (`lora_fused.fuse_lora`): x Wᵀ + s·(x Aᵀ)Bᵀ as one autograd function
   per projection, without PEFT's casts, clone and separate add.

Numerics are the same as the plain path within bf16 tolerance (tests/test_fast.py): the same rows
per step, the loss normalised by the same count of response tokens.
"""

from __future__ import annotations

import contextvars
import functools
import importlib.util
import inspect
import logging
import types

import torch

log = logging.getLogger(__name__)


def fast_path_enabled(setting: str, device: torch.device) -> bool:
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def apply_fused_kernels(model, device: torch.device) -> list[str]:
    """Patch the (not yet LoRA-wrapped) model with Liger kernels where they can run.

    Returns:
        The names of the kernels applied (empty where Liger cannot run, with the reason logged).
    """
    if device.type != "cuda":
        log.info("fast path: Liger kernels need CUDA (Triton); using packing only on %s", device)
        return []
    if importlib.util.find_spec("liger_kernel") is None:
        log.warning("fast path: liger-kernel is not installed (pip install 'medcot[cuda]'); using packing only")
        return []
    if model.config.model_type != "llama":
        log.warning("fast path: Liger patching is wired for Llama models only, not %r", model.config.model_type)
        return []
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    try:
        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=True, model=model)
    except Exception as e:  # a liger/transformers version mismatch must not stop training: say so, go on
        log.warning("fast path: Liger kernels could not be applied (%s: %s); using packing only", type(e).__name__, e)
        return []
    return ["rms_norm", "rope", "swiglu", "fused_linear_cross_entropy"]


PACKED_ATTENTION = "medcot_packed_sdpa"


def _packed_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, row_bounds=None, **kwargs):
    """Attention over a packed sequence that never crosses a row boundary.

    transformers would build a block-diagonal (tokens × tokens) mask for packed rows, which sends
    SDPA to a masked kernel that computes every block: 8× the attention work for 8 rows. On CUDA
    in fp16/bf16 this calls PyTorch's variable-length flash attention over the row offsets instead
    (only the diagonal blocks); elsewhere one causal SDPA call per row. Without `row_bounds` (evaluation,
    generation) it is plain SDPA.
    """
    from transformers.integrations.sdpa_attention import (
        repeat_kv,
        sdpa_attention_forward,
    )

    if row_bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    # The varlen flash kernel takes fp16/bf16 only; an fp32 model (model.dtype=fp32 on CUDA) goes row by row.
    if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and _varlen() is not None:
        varlen_attn, causal_kw = _varlen()
        # (1, heads, tokens, dim) -> (tokens, heads, dim), the layout of the varlen kernel
        q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))
        if k.shape[1] != q.shape[1]:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        cu = torch.tensor(row_bounds, dtype=torch.int32, device=q.device)  # tiny host-to-device copy
        longest = max(e - s for s, e in zip(row_bounds[:-1], row_bounds[1:]))
        out = varlen_attn(q, k, v, cu, cu, longest, longest, scale=scaling, **causal_kw)
        return out.unsqueeze(0), None
    key = repeat_kv(key, query.shape[1] // key.shape[1])
    value = repeat_kv(value, query.shape[1] // value.shape[1])
    out = torch.cat(
        [
            torch.nn.functional.scaled_dot_product_attention(
                query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True, scale=scaling
            )
            for s, e in zip(row_bounds[:-1], row_bounds[1:])
        ],
        dim=2,
    )
    return out.transpose(1, 2).contiguous(), None


@functools.cache
def _varlen():
    """PyTorch's varlen flash attention and how this version spells 'causal' (None before torch 2.10)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        return varlen_attn, {"window_size": (-1, 0)}
    if "is_causal" in params:
        return varlen_attn, {"is_causal": True}
    return None


def use_packed_attention(model) -> None:
    """Switch the model to per-row attention for packed batches (plain SDPA otherwise)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PACKED_ATTENTION, _packed_sdpa)
    AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)  # the usual masks for unpacked calls
    model.set_attn_implementation(PACKED_ATTENTION)


def limit_checkpointing(model, ratio: float) -> int:
    """Keep activation recompute on the first `ratio` of the decoder layers only.

    The layers left un-checkpointed are the last ones: their activations are the first consumed by
    backward, so they are freed earliest. Returns how many layers still recompute.
    """
    layers = model.get_decoder().layers
    n_ckpt = round(ratio * len(layers))
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i < n_ckpt
    return n_ckpt


class _OffloadedCheckpoint(torch.autograd.Function):
    """Activation checkpointing whose only saved tensor, the layer input, waits in host memory.

    Forward runs the decoder layer without grad and copies its input to pinned host memory;
    backward copies it back, re-runs the layer with grad and back-propagates through it. GPU memory
    then holds no activation between layers at all (Unsloth's "unsloth" checkpointing does the
    same), at the cost of one host round trip of the hidden states per layer, which overlaps with
    compute (non-blocking copies on pinned memory).
    """

    @staticmethod
    def forward(ctx, run, hidden, *args):
        ctx.run, ctx.args, ctx.device = run, args, hidden.device
        ctx.autocast = torch.is_autocast_enabled(hidden.device.type), torch.get_autocast_dtype(hidden.device.type)
        if hidden.device.type == "cuda":
            ctx.host = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)
            ctx.host.copy_(hidden.detach(), non_blocking=True)
        else:
            ctx.host = hidden.detach().clone()
        with torch.no_grad():
            return run(hidden, *args)

    @staticmethod
    def backward(ctx, grad_out):
        hidden = ctx.host.to(ctx.device, non_blocking=True).requires_grad_(True)
        enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(ctx.device.type, dtype=dtype, enabled=enabled):
            out = ctx.run(hidden, *ctx.args)
        torch.autograd.backward(out, grad_out)
        ctx.host = None
        return (None, hidden.grad, *(None for _ in ctx.args))


def _offloaded_checkpoint(run, hidden, *args):
    return _OffloadedCheckpoint.apply(run, hidden, *args)


def offload_checkpointing(model) -> int:
    """Make every checkpointed decoder layer keep its input in host memory (train.offload_activations).

    Call after `limit_checkpointing`; returns how many layers offload.
    """
    n = 0
    for layer in model.get_decoder().layers:
        if layer.gradient_checkpointing:
            layer._gradient_checkpointing_func = _offloaded_checkpoint
            n += 1
    return n


def skip_optimizer_syncs(optimizer) -> bool:
    """Drop the device sync that bitsandbytes' 8-bit optimizers make after every parameter update.

    `Optimizer8bit.step` calls `torch.cuda.synchronize()` after each tensor: 448 host stalls per step for
    the seed recipe's LoRA tensors, which leave the GPU idle between tiny update kernels (the profile in
    docs/benchmarks.md). For a non-paged optimizer on the current default stream the sync orders
    nothing (every kernel is issued in order on that one stream), so the update is bit-identical; paged
    optimizers keep it (their prefetches need it). Unsloth makes the same change. Only this optimizer
    instance is affected. Returns whether its step was changed.
    """
    try:
        import bitsandbytes.optim.optimizer as bnb_optim
    except ImportError:
        return False
    if not isinstance(optimizer, bnb_optim.Optimizer8bit) or getattr(optimizer, "is_paged", False):
        return False
    if not _on_default_streams(optimizer):
        return False
    if not getattr(bnb_optim.sync_gpu, "_medcot_gated", False):
        original = bnb_optim.sync_gpu

        @functools.wraps(original)
        def sync_gpu(t):
            if not _SKIP_SYNC.get():
                original(t)

        sync_gpu._medcot_gated = True
        bnb_optim.sync_gpu = sync_gpu
    step = type(optimizer).step

    def unsynced_step(self, *args, **kwargs):
        token = _SKIP_SYNC.set(True)
        try:
            return step(self, *args, **kwargs)
        finally:
            _SKIP_SYNC.reset(token)

    optimizer.step = types.MethodType(functools.wraps(step)(unsynced_step), optimizer)
    return True


_SKIP_SYNC: contextvars.ContextVar[bool] = contextvars.ContextVar("medcot_skip_bnb_sync", default=False)


def _on_default_streams(optimizer) -> bool:
    """Every parameter on a CUDA device whose current stream is its default stream (bitsandbytes' kernels run there)."""
    devices = {p.device for group in optimizer.param_groups for p in group["params"]}
    return bool(devices) and all(d.type == "cuda" and torch.cuda.current_stream(d) == torch.cuda.default_stream(d)
                                 for d in devices)
