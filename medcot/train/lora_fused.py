"""LoRA linears fused with their base matmul: the training fast path's replacement for PEFT's LoRA glue.

For every LoRA projection PEFT's forward (peft/tuners/lora/layer.py, bnb.py) runs the base layer, clones
a 4-bit layer's output ("defensively"), casts x to the fp32 adapter dtype (a bf16 base), calls dropout (an
identity at p=0), lora_B(lora_A(x)), multiplies by the scaling, casts back and adds: ~90 ms of a 0.70 s
8B QLoRA step in elementwise kernels (docs/benchmarks.md, "Where one step's time goes"). One autograd
Function here computes, as Unsloth's LoRA_W (unsloth/kernels/fast_lora.py) does,

    y = x Wᵀ + s · (x Aᵀ) Bᵀ    as    y = x @ W.t();  y.addmm_(x @ A.t(), B.t(), alpha=s)

in x's dtype (bf16 on a GPU: what PEFT's LoRA matmuls run in under the trainer's autocast too), a 4-bit W
dequantized once in forward and once again in backward (never kept: it is as large as a bf16 layer).

Fused: one active adapter, no dropout, no LoRA variant (DoRA ...), no lora_B bias, a frozen nn.Linear or
bitsandbytes Linear4bit base, x in the base's compute dtype. Everything else runs PEFT's forward
untouched, and so do adapters disabled or merged and inference (grad off outside training mode, or
inference mode): the generation engine keeps bitsandbytes' 4-bit inference kernels and its CUDA graphs.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def fuse_lora(model) -> int:
    """Route the forward of each eligible PEFT LoRA linear of `model` through the fused Function.

    The layer's class becomes a subclass of its PEFT class with the fused forward (`_Fused`); the layer, its
    parameters, state_dict keys and repr stay PEFT's, so saving the adapter, `disable_adapter()`,
    `merge_and_unload` and checkpointing work as before. Returns how many layers are fused (those with
    dropout, DoRA, ... are left alone).
    """
    from peft.tuners.lora import Linear

    kinds = (Linear, *_lora_linear4bit())
    n = 0
    for layer in model.modules():
        if isinstance(layer, kinds) and _active_plain_adapter(layer) is not None:
            if not isinstance(layer, _Fused):
                layer.__class__ = _fused_class(type(layer))
            n += 1
    return n


def _lora_linear4bit() -> tuple[type, ...]:
    # PEFT defines it only where bitsandbytes' 4-bit layers can load.
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:
        return ()
    return (Linear4bit,)


def _active_plain_adapter(layer) -> str | None:
    """The layer's adapter if the fused Function computes exactly what PEFT would, else None."""
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if (name not in layer.lora_A or name in layer.lora_variant or layer.lora_B[name].bias is not None
            or not isinstance(layer.lora_dropout[name], torch.nn.Identity)):  # PEFT's dropout at p=0
        return None
    base = layer.get_base_layer()
    if type(base) is not torch.nn.Linear and not hasattr(base.weight, "quant_state"):  # nn.Linear or 4-bit
        return None
    if getattr(layer, "fan_in_fan_out", False) or base.weight.requires_grad \
            or (base.bias is not None and base.bias.requires_grad):
        return None
    return name


class _Fused:
    """Put in front of a PEFT LoRA class (`_fused_class`): its forward is the fused one where that applies,
    PEFT's (`super().forward`) elsewhere. A class, not a bound method stored on the layer: that would be a
    reference cycle, and a dropped model would hold its GPU memory until the garbage collector runs."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = None if args or kwargs else _active_plain_adapter(self)
        # Grad off in training mode is the forward of an offloaded checkpoint (fast.offload_checkpointing): fused
        # like its recompute, so the two agree. Grad off otherwise, or inference mode: generation, validation.
        training = torch.is_grad_enabled() or (self.training and not torch.is_inference_mode_enabled())
        if name is None or not training:
            return super().forward(x, *args, **kwargs)
        base = self.get_base_layer()
        quant_state = getattr(base.weight, "quant_state", None)
        dtype = base.compute_dtype if quant_state is not None else base.weight.dtype
        device = x.device.type
        if (x.dtype != dtype or (torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) != dtype)
                or getattr(quant_state, "packing_format_for_cpu", False)):
            # A cast that bitsandbytes or autocast would make, or bitsandbytes' CPU inference layout: PEFT's path.
            return super().forward(x, *args, **kwargs)
        bias = None if base.bias is None else base.bias.to(dtype)
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        # .data: a 4-bit weight enters as its plain uint8 storage, not as bitsandbytes' Params4bit subclass.
        return _LoraLinear.apply(x, A, B, base.weight.data, quant_state, bias, self.scaling[name])


@functools.cache
def _fused_class(cls: type) -> type:
    return type(cls.__name__, (_Fused, cls), {"__module__": cls.__module__})  # same name: PEFT's repr


def _base_weight(weight: torch.Tensor, quant_state, dtype: torch.dtype) -> torch.Tensor:
    """W (out × in) in `dtype`: the nn.Linear weight itself, or a 4-bit weight dequantized (a new tensor)."""
    if quant_state is None:
        return weight
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(weight, quant_state).to(dtype)


class _LoraLinear(torch.autograd.Function):
    """y = x Wᵀ + bias + s · (x Aᵀ) Bᵀ with a frozen W; gradients for x, A and B.

    Saves x and x Aᵀ (tokens × r, small), as PEFT's lora_A/lora_B linears do, and the base weight as it
    is stored (4-bit stays 4-bit). A and B (fp32 master weights) take part in x's dtype; their gradients
    are returned in fp32.
    """

    @staticmethod
    def forward(ctx, x, A, B, weight, quant_state, bias, s):
        x2 = x.reshape(-1, x.shape[-1])
        y = F.linear(x2, _base_weight(weight, quant_state, x.dtype), bias)  # the dequantized W is freed here
        xa = x2 @ A.to(x.dtype).t()
        # In place, without PEFT's clone: y is this Function's own fresh output, saved by nothing.
        y.addmm_(xa, B.to(x.dtype).t(), alpha=s)
        ctx.save_for_backward(x, xa, A, B, weight)
        ctx.quant_state, ctx.s = quant_state, s
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x, xa, A, B, weight = ctx.saved_tensors
        s, dt = ctx.s, x.dtype
        dy = dy.reshape(-1, dy.shape[-1]).to(dt)
        dy_b = dy @ B.to(dt)  # tokens × r
        dx = dA = dB = None
        if ctx.needs_input_grad[1]:
            dA = _mm_fp32(dy_b.t(), x.reshape(-1, x.shape[-1])).mul_(s)
        if ctx.needs_input_grad[2]:
            dB = _mm_fp32(dy.t(), xa).mul_(s)
        if ctx.needs_input_grad[0]:
            dx = dy @ _base_weight(weight, ctx.quant_state, dt)
            dx.addmm_(dy_b, A.to(dt), alpha=s)
            dx = dx.view(x.shape)
        return dx, dA, dB, None, None, None, None


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b as fp32, for the fp32 adapter gradients. On CUDA a bf16 product leaves cuBLAS' fp32 accumulator
    unrounded (torch.mm's out_dtype: no slower on an H200, no fp32 copies of the inputs); elsewhere it is
    rounded to bf16 first, as PEFT's bf16 matmuls under autocast are."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda and _MM_OUT_DTYPE:
        return torch.mm(a, b, out_dtype=torch.float32)
    return (a @ b).float()


_MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()  # this torch has torch.mm(..., out_dtype=)
