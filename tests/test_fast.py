"""The fast path trains the same objective as the plain path: same loss, same LoRA gradients.

CPU: padding-free packing vs padded micro-batches (fp32, tight tolerance).
GPU (runs on the device, skipped on CPU with the reason): packing + Liger kernels vs plain, bf16.
"""

from __future__ import annotations

import pytest
import torch

from medcot.config import LoraArgs, TrainArgs
from medcot.data.collate import count_loss_tokens, micro_batches, pack_collate
from medcot.data.prompts import IGNORE_INDEX, Encoded
from medcot.model.load import attach_lora
from medcot.train.fast import offload_checkpointing, use_packed_attention
from medcot.train.trainer import train_step


def _rows(n: int, vocab: int, seed: int = 0) -> list[Encoded]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = int(torch.randint(20, 90, (1,), generator=g))
        ids = torch.randint(5, vocab, (length,), generator=g).tolist()
        prompt = length // 3
        rows.append(Encoded(ids, [IGNORE_INDEX] * prompt + ids[prompt:], prompt))
    return rows


def _lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}


def _perturb_lora_b(model) -> None:
    """LoRA B starts at zero, which would make A's gradient zero: perturb it so both are tested."""
    for n, p in model.named_parameters():
        if "lora_B" in n:
            g = torch.Generator().manual_seed(len(n))
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.02)


def _model(path, dtype=torch.float32, device="cpu"):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device)
    return base


def test_pack_collate_resets_positions_and_masks_row_starts():
    rows = [Encoded([1, 2, 3], [IGNORE_INDEX, 2, 3], 1), Encoded([4, 5], [4, 5], 0)]
    b = pack_collate(rows)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    # The second row's first label is masked: it would be predicted from the first row's last token.
    assert b["labels"].tolist() == [[IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5]]
    assert b["row_bounds"] == [0, 3, 5]
    assert "attention_mask" not in b


def test_micro_batches_respect_token_budget_and_keep_every_row():
    rows = _rows(8, 100)
    groups = micro_batches(rows, 2, packing=True, max_tokens=150)
    assert [r for g in groups for r in g] == rows
    for g in groups:
        assert len(g) == 1 or sum(len(r.input_ids) for r in g) <= 150
    assert micro_batches(rows, 2, packing=False, max_tokens=150) == [rows[i : i + 2] for i in range(0, 8, 2)]


def test_packed_step_matches_padded_step_loss_and_lora_grads(tiny_model_dir):
    t = TrainArgs(per_device_batch_size=2, micro_batch_tokens=10_000)
    rows = _rows(8, 1000)
    results = {}
    for packing in (False, True):
        base = _model(tiny_model_dir)
        if packing:
            use_packed_attention(base)
        model = attach_lora(base, LoraArgs(r=8, alpha=16), gradient_checkpointing=False)
        _perturb_lora_b(model)
        loss = train_step(model, rows, t, pad_id=0, packing=packing, autocast=torch.autocast("cpu", enabled=False))
        results[packing] = (loss, _lora_grads(model))
    (loss_pad, g_pad), (loss_pack, g_pack) = results[False], results[True]
    assert count_loss_tokens(rows) > 0
    assert abs(loss_pad - loss_pack) < 1e-5 * max(1.0, abs(loss_pad))
    assert g_pad.keys() == g_pack.keys() and len(g_pad) > 0
    for n in g_pad:
        torch.testing.assert_close(g_pack[n], g_pad[n], rtol=1e-4, atol=1e-6, msg=f"gradient of {n} differs")


def test_offloaded_checkpointing_gives_the_same_loss_and_lora_grads(tiny_model_dir, monkeypatch):
    """Host-offloaded recompute (train.offload_activations) is the plain backward, reordered."""
    from transformers.models.llama import modeling_llama

    calls = []
    mlp_forward = modeling_llama.LlamaMLP.forward
    # Counted in the method, not with a module hook: transformers' recompute does not run module hooks.
    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", lambda self, x: calls.append(1) or mlp_forward(self, x))
    t = TrainArgs(per_device_batch_size=2)
    rows = _rows(6, 1000)
    results = {}
    for mode in ("none", "checkpoint", "offload"):
        model = attach_lora(_model(tiny_model_dir), LoraArgs(r=8, alpha=16), gradient_checkpointing=mode != "none")
        if mode == "offload":
            assert offload_checkpointing(model) == len(model.get_decoder().layers)
        _perturb_lora_b(model)
        model.train()
        calls.clear()
        loss = train_step(model, rows, t, pad_id=0, packing=False, autocast=torch.autocast("cpu", enabled=False))
        results[mode] = (loss, _lora_grads(model), len(calls))
    n_layers, n_micro = 2, 3
    assert results["none"][2] == n_layers * n_micro
    assert results["checkpoint"][2] == results["offload"][2] == 2 * n_layers * n_micro  # every layer ran again
    for mode in ("checkpoint", "offload"):
        assert abs(results[mode][0] - results["none"][0]) < 1e-6
        for n, g in results["none"][1].items():
            torch.testing.assert_close(results[mode][1][n], g, rtol=1e-5, atol=1e-7, msg=f"{mode}: gradient of {n}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU for the Liger kernels (run on the device)")
def test_fast_path_matches_plain_on_gpu(tmp_path):
    """bf16 on CUDA: packing + Liger (fused RMSNorm/RoPE/SwiGLU/linear-CE) vs padded plain HF."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from medcot.train.fast import apply_fused_kernels
    cfg = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path)
    t = TrainArgs(per_device_batch_size=2, micro_batch_tokens=10_000)
    rows = _rows(8, 32000)
    device = torch.device("cuda")
    results = {}
    for fast in (False, True):
        base = _model(tmp_path, torch.bfloat16, "cuda")
        if fast:
            assert apply_fused_kernels(base, device)
            use_packed_attention(base)
        model = attach_lora(base, LoraArgs(r=16, alpha=16), gradient_checkpointing=True)
        _perturb_lora_b(model)
        loss = train_step(model, rows, t, 0, packing=fast, autocast=torch.autocast("cuda", dtype=torch.bfloat16))
        results[fast] = (loss, _lora_grads(model))
    (loss_plain, g_plain), (loss_fast, g_fast) = results[False], results[True]
    assert abs(loss_plain - loss_fast) / abs(loss_plain) < 1e-2
    for n in g_plain:
        rel = (g_fast[n] - g_plain[n]).norm() / g_plain[n].norm().clamp_min(1e-12)
        assert rel < 5e-2, f"{n}: relative gradient error {rel:.3g}"


def _fake_bnb(monkeypatch):
    """A stand-in for bitsandbytes.optim.optimizer: Optimizer8bit.step calls the module's sync_gpu per tensor."""
    import sys
    import types

    mod = types.ModuleType("bitsandbytes.optim.optimizer")
    mod.syncs = []
    exec(
        "import torch\n"
        "def sync_gpu(t):\n    syncs.append(t)\n"
        "class Optimizer8bit(torch.optim.SGD):\n"
        "    is_paged = False\n"
        "    def step(self, closure=None):\n"
        "        for group in self.param_groups:\n"
        "            for p in group['params']:\n"
        "                p.data.add_(p.grad, alpha=-group['lr'])\n"
        "                sync_gpu(p)\n",
        mod.__dict__,  # one namespace: step() finds sync_gpu among the module's globals, as in bitsandbytes
    )
    for name in ("bitsandbytes", "bitsandbytes.optim"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim.optimizer", mod)
    return mod


def test_skip_optimizer_syncs_drops_the_per_tensor_sync_and_keeps_the_update(monkeypatch):
    from medcot.train import fast

    bnb = _fake_bnb(monkeypatch)
    monkeypatch.setattr(fast, "_on_default_streams", lambda opt: True)
    params = [torch.nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(i))) for i in range(3)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, q in zip(params, twins):
        p.grad = torch.full_like(p, 0.5)
        q.grad = torch.full_like(q, 0.5)
    plain, unsynced = bnb.Optimizer8bit(twins, lr=0.1), bnb.Optimizer8bit(params, lr=0.1)
    assert fast.skip_optimizer_syncs(unsynced)
    scheduler = torch.optim.lr_scheduler.LambdaLR(unsynced, lambda s: 1.0)  # wraps step after us, as the trainer's does
    plain.step()
    assert len(bnb.syncs) == 3  # the plain optimizer still syncs after each tensor
    unsynced.step()
    scheduler.step()
    assert len(bnb.syncs) == 3  # ... the patched one not at all
    assert all(torch.equal(p, q) for p, q in zip(params, twins))  # the same update
    paged = bnb.Optimizer8bit([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    paged.is_paged = True
    assert not fast.skip_optimizer_syncs(paged) and not fast.skip_optimizer_syncs(torch.optim.AdamW(params))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and bitsandbytes (run on the device)")
def test_skip_optimizer_syncs_is_bit_identical_on_gpu():
    bnb = pytest.importorskip("bitsandbytes")
    from medcot.train.fast import skip_optimizer_syncs

    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(16, 4096), (4096, 16), (16, 14336), (1024, 16)]
    a = [torch.nn.Parameter(torch.randn(s, device="cuda", generator=g)) for s in shapes]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    plain, unsynced = bnb.optim.AdamW8bit(a, lr=2e-4), bnb.optim.AdamW8bit(b, lr=2e-4)
    assert skip_optimizer_syncs(unsynced)
    for _ in range(5):
        grads = [torch.randn(s, device="cuda", generator=g) for s in shapes]
        for p, q, gr in zip(a, b, grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        plain.step()
        unsynced.step()
    torch.cuda.synchronize()
    assert all(torch.equal(p, q) for p, q in zip(a, b))
