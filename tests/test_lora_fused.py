"""The fused LoRA linear (medcot/train/lora_fused.py) trains what PEFT's LoRA forward trains.

CPU: a tiny Llama with LoRA r=4 on all 7 projections and a non-zero lora_B, fused vs PEFT: the same loss
and the same gradient of every lora_A/lora_B (fp32 to 1e-5; bf16 under autocast as close to an fp32
reference as PEFT's; 4-bit NF4 where bitsandbytes' CPU backend loads), with and without gradient
checkpointing. PEFT's own features keep working (disable_adapter, merge_and_unload, the adapter's keys),
inference runs PEFT's forward, and layers the Function cannot compute (dropout, DoRA) are left to PEFT.
GPU (skipped on CPU with the reason): bf16 and 4-bit as the trainer runs them (packing, Liger, autocast).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from medcot.config import LoraArgs
from medcot.model.load import attach_lora
from medcot.train import lora_fused
from medcot.train.lora_fused import fuse_lora

N_LAYERS = 2
N_FUSED = 7 * N_LAYERS


def _llama(dtype=torch.float32, hidden=64, vocab=128, layers=N_LAYERS, heads=4, bias=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads // 2, max_position_embeddings=4096,
                      attention_bias=bias, mlp_bias=bias)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(dtype)


def _nf4(path, dtype, device="cpu"):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                           bnb_4bit_use_double_quant=True)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=q, dtype=dtype, device_map={"": device})


def _lora(base, fused: bool, gradient_checkpointing=False, r=4, **lora):
    """PEFT LoRA as the trainer attaches it (same A for the same seed), lora_B perturbed so A gets a gradient."""
    torch.manual_seed(1)
    model = attach_lora(base, LoraArgs(r=r, alpha=2 * r, **lora), gradient_checkpointing)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.1)
    model.train()  # transformers recomputes checkpointed layers only in training mode
    if fused:
        assert fuse_lora(model) == 7 * len(model.get_decoder().layers)
    return model


def _ids(vocab=128, shape=(2, 40), device="cpu"):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(2)).to(device)


def _loss_and_grads(model, ids, autocast=None):
    with autocast or contextlib.nullcontext():
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return float(loss.detach()), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.fixture()
def fused_calls(monkeypatch):
    """How many times the fused Function ran (a fused layer may fall back to PEFT's forward)."""
    calls = []
    apply = lora_fused._LoraLinear.apply
    monkeypatch.setattr(lora_fused._LoraLinear, "apply", lambda *a: calls.append(1) or apply(*a))
    return calls


@pytest.mark.parametrize(("checkpointing", "bias"), [(False, False), (True, False), (False, True)])
def test_fp32_loss_and_lora_grads_match_peft(checkpointing, bias, fused_calls):
    """bias: base layers with a (frozen) bias, as Qwen2's q/k/v projections have."""
    ids = _ids()
    peft_loss, peft_grads = _loss_and_grads(_lora(_llama(bias=bias), False, checkpointing), ids)
    assert not fused_calls
    loss, grads = _loss_and_grads(_lora(_llama(bias=bias), True, checkpointing), ids)
    assert len(fused_calls) == N_FUSED * (2 if checkpointing else 1)  # recompute runs the fused layers again
    assert abs(loss - peft_loss) <= 1e-6 * abs(peft_loss)
    assert grads.keys() == peft_grads.keys() and len(grads) == 2 * N_FUSED
    for n, g in peft_grads.items():
        assert g.norm() > 0, n
        assert _rel(grads[n], g) < 1e-5, f"{n}: relative error {_rel(grads[n], g):.2e}"
        torch.testing.assert_close(grads[n], g, rtol=1e-5, atol=1e-5 * float(g.abs().max()), msg=n)


def test_bf16_under_autocast_is_as_close_to_fp32_as_peft(fused_calls):
    """bf16 weights, autocast bf16 (the trainer's GPU setting): the fused layers compute the LoRA term in bf16,
    as PEFT's autocast matmuls do; both are compared with fp32 on the same (bf16-rounded) weights."""
    ids = _ids()
    ref_loss, ref = _loss_and_grads(_lora(_llama(torch.bfloat16).float(), False), ids)
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16)
    peft_loss, peft_grads = _loss_and_grads(_lora(_llama(torch.bfloat16), False), ids, bf16)
    loss, grads = _loss_and_grads(_lora(_llama(torch.bfloat16), True), ids, bf16)
    assert len(fused_calls) == N_FUSED
    assert abs(loss - peft_loss) < 1e-3 * abs(peft_loss) and abs(loss - ref_loss) < 1e-3 * abs(ref_loss)
    _assert_as_close_as_peft(grads, peft_grads, ref)


def _assert_as_close_as_peft(grads, peft_grads, ref, tol=5e-2):
    """Every LoRA gradient within `tol` of PEFT's and of fp32, and on average about as far from fp32 as PEFT's
    (at most 1.25x; measured on CPU: 1.26% vs 1.18%, each tensor 0.5-2% for either path)."""
    for n, g in ref.items():
        assert _rel(grads[n], peft_grads[n]) < tol and _rel(grads[n], g) < tol, n
    err, peft_err = (sum(_rel(gs[n], g) for n, g in ref.items()) / len(ref) for gs in (grads, peft_grads))
    assert err < 1.25 * peft_err, f"mean relative error from fp32: fused {err:.2e}, PEFT {peft_err:.2e}"


@pytest.mark.parametrize("checkpointing", [False, True])
def test_4bit_nf4_matches_peft(tmp_path, checkpointing, fused_calls):
    """bitsandbytes NF4 base on CPU: fp32 compute (tight: the dequantized W, its transposes, the re-dequantize
    in backward) and bf16 compute under autocast (the QLoRA recipe's dtypes)."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed (its CPU backend runs NF4 layers)")
    _llama(torch.bfloat16).save_pretrained(tmp_path)
    ids = _ids()
    for dtype, autocast, loss_tol, grad_tol in [(torch.float32, None, 1e-6, 1e-5),
                                                (torch.bfloat16, torch.autocast("cpu", dtype=torch.bfloat16), 1e-3, 5e-2)]:
        peft_loss, peft_grads = _loss_and_grads(_lora(_nf4(tmp_path, dtype), False, checkpointing), ids, autocast)
        fused_calls.clear()
        loss, grads = _loss_and_grads(_lora(_nf4(tmp_path, dtype), True, checkpointing), ids, autocast)
        assert len(fused_calls) == N_FUSED * (2 if checkpointing else 1)
        assert abs(loss - peft_loss) <= loss_tol * abs(peft_loss), dtype
        for n, g in peft_grads.items():
            assert _rel(grads[n], g) < grad_tol, f"{dtype} {n}: relative error {_rel(grads[n], g):.2e}"


def test_inference_runs_peft_forward_and_train_mode_no_grad_is_fused(fused_calls):
    """Generation and validation (grad off in eval mode, or inference mode) keep PEFT's path and bitsandbytes'
    4-bit inference kernels; an offloaded checkpoint's forward (grad off in training mode) is fused, as its
    recompute is."""
    ids = _ids()
    peft, fused = _lora(_llama(), False), _lora(_llama(), True)
    with torch.no_grad():
        expected = peft(input_ids=ids).logits
        assert torch.allclose(fused(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert len(fused_calls) == N_FUSED
    fused.eval()
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            assert torch.equal(fused(input_ids=ids).logits, expected)  # PEFT's own kernels: bit-equal
    fused.train()
    with torch.inference_mode():
        assert torch.equal(fused(input_ids=ids).logits, expected)
    assert len(fused_calls) == N_FUSED


def test_disable_adapter_gives_the_base_and_merge_gives_the_fused_output(fused_calls):
    ids = _ids()
    with torch.no_grad():
        base_logits = _llama()(input_ids=ids).logits
    model = _lora(_llama(), True)
    with torch.no_grad():
        lora_logits = model(input_ids=ids).logits
        assert not torch.allclose(lora_logits, base_logits, atol=1e-3)  # the LoRA term matters
        with model.disable_adapter():
            assert torch.allclose(model(input_ids=ids).logits, base_logits, rtol=1e-5, atol=1e-6)
        assert torch.allclose(model(input_ids=ids).logits, lora_logits)  # enabled again: fused again
        assert len(fused_calls) == 2 * N_FUSED
        merged = model.merge_and_unload()
        assert not any(hasattr(m, "lora_A") for m in merged.modules())
        assert torch.allclose(merged(input_ids=ids).logits, lora_logits, rtol=1e-5, atol=1e-5)


def test_adapter_state_dict_and_saved_adapter_are_unchanged(tmp_path):
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    peft, fused = _lora(_llama(), False), _lora(_llama(), True)
    assert fused.state_dict().keys() == peft.state_dict().keys()
    adapter = get_peft_model_state_dict(fused)
    assert adapter.keys() == get_peft_model_state_dict(peft).keys() and len(adapter) == 2 * N_FUSED
    peft.save_pretrained(tmp_path / "peft")
    fused.save_pretrained(tmp_path / "fused")
    saved, expected = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("fused", "peft"))
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved)


def test_a_dropped_fused_model_is_freed_at_once():
    """No reference cycle (a bound method stored on each layer would make one): a dropped model's memory
    comes back without waiting for the garbage collector, as a plain PEFT model's does."""
    import gc
    import weakref

    model = _lora(_llama(), True, gradient_checkpointing=True)
    _loss_and_grads(model, _ids())
    layer = model.get_decoder().layers[0].mlp.down_proj
    assert repr(layer).startswith("lora.Linear(")  # PEFT's repr
    weight = weakref.ref(layer.base_layer.weight)
    gc.disable()
    try:
        del model, layer
        assert weight() is None
    finally:
        gc.enable()


def test_layers_the_function_cannot_compute_are_left_to_peft():
    from peft import LoraConfig, get_peft_model

    assert fuse_lora(_lora(_llama(), False, dropout=0.1)) == 0
    targets = list(LoraArgs().target_modules)
    assert fuse_lora(get_peft_model(_llama(), LoraConfig(r=4, target_modules=targets, use_dora=True))) == 0
    assert fuse_lora(get_peft_model(_llama(), LoraConfig(r=4, target_modules=targets, lora_bias=True))) == 0
    model = _lora(_llama(), True)
    assert fuse_lora(model) == N_FUSED  # again: the same layers, wrapped once


def test_trainer_fuses_on_the_fast_path(tmp_path):
    from medcot.config import Config
    from medcot.train.distributed import World
    from medcot.train.trainer import Trainer

    lines = []
    for fast_path in ("on", "off"):
        cfg = Config()
        cfg.train.fast_path, cfg.train.gradient_checkpointing = fast_path, False
        run = Trainer.build(_llama(), cfg, World(), tmp_path, lines.append, started=0.0)
        fused = sum(isinstance(m, lora_fused._Fused) for m in run.model.modules())
        assert fused == (N_FUSED if fast_path == "on" else 0)
    assert f"fast path: LoRA fused into the base matmul in {N_FUSED} linear layers" in lines


# ---------------------------------------------------------------------------------------------
# GPU: run on the device with `pytest -m gpu tests/test_lora_fused.py`.


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (and bitsandbytes for 4-bit; run on the device)")
@pytest.mark.parametrize("quant", ["bf16", "4bit"])
def test_fused_matches_peft_on_gpu(tmp_path, quant, fused_calls):
    """As the trainer runs it: packed rows, varlen attention, Liger kernels, recompute, autocast bf16; the
    only difference is fuse_lora. Loss within 0.2%, every LoRA gradient within 5% of PEFT's and of the fp32
    plain path on the same weights, and on average about as far from the latter as PEFT's."""
    from medcot.config import TrainArgs
    from medcot.data.prompts import IGNORE_INDEX, Encoded
    from medcot.train.fast import apply_fused_kernels, use_packed_attention
    from medcot.train.trainer import train_step

    if quant == "4bit":
        pytest.importorskip("bitsandbytes", reason="4-bit needs bitsandbytes (pip install 'medcot[cuda]')")
    vocab, device = 32000, torch.device("cuda")
    _llama(torch.bfloat16, hidden=1024, vocab=vocab, layers=4, heads=16).save_pretrained(tmp_path)
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(8):
        ids = torch.randint(5, vocab, (int(torch.randint(300, 900, (1,), generator=g)),), generator=g).tolist()
        rows.append(Encoded(ids, [IGNORE_INDEX] * 100 + ids[100:], 100))
    t = TrainArgs(per_device_batch_size=8, micro_batch_tokens=16384)

    def run(fused: bool, fast=True):
        """The bf16 fast path, or (fast=False) the plain path in fp32: the reference (4-bit: fp32 compute)."""
        from transformers import AutoModelForCausalLM

        dtype = torch.bfloat16 if fast else torch.float32
        base = _nf4(tmp_path, dtype, "cuda") if quant == "4bit" else \
            AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype).to(device)
        if fast:
            assert apply_fused_kernels(base, device)
            use_packed_attention(base)
        model = _lora(base, fused, gradient_checkpointing=True, r=16)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=fast)
        loss = train_step(model, rows, t, 0, packing=fast, autocast=autocast)
        return loss, {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}

    ref_loss, ref = run(False, fast=False)
    peft_loss, peft_grads = run(False)
    fused_calls.clear()
    loss, grads = run(True)
    assert len(fused_calls) == 2 * 7 * 4  # forward and recompute, every projection
    assert abs(loss - peft_loss) < 2e-3 * abs(peft_loss), (loss, peft_loss, ref_loss)
    _assert_as_close_as_peft(grads, peft_grads, ref)
