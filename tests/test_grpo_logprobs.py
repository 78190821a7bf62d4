"""GRPO's per-token log-probabilities without the full-vocabulary logits: `completion_logprobs` runs lm_head and
the log-softmax a chunk of positions at a time (checkpointed), and must give what the full logits give, values
and LoRA gradients, with the adapter on or off; models whose forward changes the logits take the full path.

On the fast path the update packs its micro-batches (`pack_rollouts`, attention row by row): the packed
log-probabilities, the GRPO loss's LoRA gradients and the step's loss must be the padded path's, however the
completions are grouped by `train.micro_batch_tokens`, down to a whole GRPO run with `train.fast_path=on`."""

from __future__ import annotations

import dataclasses
import json
import math
from types import SimpleNamespace

import pytest
import torch

from medcot.cli import main
from medcot.config import load_config
from medcot.eval.tasks import Item
from medcot.rl import grpo, rewards, rollout
from medcot.rl.algorithm import step_normaliser, token_logprobs, token_loss
from medcot.rl.rollout import Rollout, collate, completion_logprobs, pack_rollouts
from medcot.train import fast

VOCAB = 1000
ITEM = Item(id="q1", benchmark="medqa", question="?", options={"A": "a", "B": "b"}, answer="A")
NO_AUTOCAST = torch.autocast("cpu", enabled=False)
# Prompts and completions of different lengths: left-padded prompts, right-padded completions (B=3, C=9).
LENGTHS = ((12, 5), (4, 9), (8, 1))
CHUNK = 7  # fewer than the 27 completion positions (15 real ones), and not dividing them
FORCED = (1, slice(3, 6))  # row 1's tokens 3..5 are a forced "</think>" tag: policy_mask 0


def _tiny(kind: str = "llama"):
    """A 2-layer random model with a LoRA adapter (random non-zero B, so it changes the outputs), on lm_head too."""
    from peft import LoraConfig, get_peft_model
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=0)
    if kind == "llama":
        base = LlamaForCausalLM(LlamaConfig(**common))
    else:  # a strong soft-cap, so that leaving it out would show
        base = Gemma2ForCausalLM(Gemma2Config(**common, head_dim=16, final_logit_softcapping=1.0))
    lora = LoraConfig(r=4, lora_alpha=16, init_lora_weights=False,
                      target_modules=["q_proj", "v_proj", "down_proj", "lm_head"])
    return get_peft_model(base, lora).eval()


def _rows(lengths=LENGTHS, seed: int = 3) -> list[Rollout]:
    g = torch.Generator().manual_seed(seed)
    rows = [Rollout(item=ITEM, prompt_ids=torch.randint(5, VOCAB, (n,), generator=g).tolist(),
                    completion_ids=torch.randint(5, VOCAB, (m,), generator=g).tolist(), policy_mask=[1] * m,
                    text="", num_tokens=m, scored=None, advantage=float(torch.randn((), generator=g)))
            for n, m in lengths]
    i, span = FORCED
    if i < len(rows) and len(rows[i].policy_mask) >= span.stop:
        rows[i].policy_mask[span] = [0] * (span.stop - span.start)
    return rows


def _batch(packed: bool = False):
    return pack_rollouts(_rows(), device="cpu") if packed else collate(_rows(), pad_id=0, device="cpu")


def _present() -> torch.Tensor:
    """(B, C) True at every real completion token, forced ones included (the padding columns are False)."""
    return torch.tensor([[j < m for j in range(max(m for _, m in LENGTHS))] for _, m in LENGTHS])


def _reference(model, batch, temperature, autocast=NO_AUTOCAST):
    """The full-logits way: every completion position's logits from the model's own forward."""
    c_len = batch["completion_ids"].shape[1]
    with autocast:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], logits_to_keep=c_len + 1, use_cache=False).logits
    return token_logprobs(logits[:, :-1], batch["completion_ids"], temperature)


def _loss_and_grads(model, logp, batch):
    """A masked loss weighting each token differently, and the gradients of every LoRA parameter."""
    w = torch.linspace(-1.0, 2.0, logp.numel(), device=logp.device).view_as(logp)
    loss = (logp * w * batch["mask"]).sum()
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    return loss, torch.autograd.grad(loss, params)


def test_chunked_logprobs_and_lora_gradients_equal_the_full_logits_ones():
    model, batch = _tiny(), _batch()
    mask = batch["mask"].bool()
    ref = _reference(model, batch, 0.7)
    new = completion_logprobs(model, batch, 0.7, NO_AUTOCAST, chunk_tokens=CHUNK)
    assert rollout._head_and_decoder(model) is not None  # the chunked path was the one taken
    assert (new[mask] - ref[mask]).abs().max() <= 1e-5
    _, g_ref = _loss_and_grads(model, ref, batch)
    _, g_new = _loss_and_grads(model, new, batch)
    assert len(g_ref) == 2 * (3 * 2 + 1)  # A and B of q, v, down in 2 layers, and of lm_head
    for a, b in zip(g_new, g_ref):
        assert b.abs().max() > 0
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    # The temperature is applied: at 1 the values differ.
    at_one = completion_logprobs(model, batch, 1.0, NO_AUTOCAST, chunk_tokens=CHUNK)
    assert (at_one[mask] - new[mask]).abs().max() > 1e-3


@pytest.mark.parametrize("packed", [False, True])
def test_no_vocabulary_sized_tensor_is_kept_for_backward_and_backward_recomputes_one_chunk_at_a_time(packed):
    model, padded, batch = _tiny(), _batch(), _batch(packed)
    if packed:
        fast.use_packed_attention(model)
    head = model.get_base_model().get_output_embeddings()
    c_len = batch["completion_ids"].shape[1]

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved_vocab_numel(fn):
        """Elements of the vocabulary-wide activations autograd keeps for backward while `fn` runs (views of
        the weights, such as lm_head's transposed for the matmul, cost nothing and are left out)."""
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            out = fn()
        return out, sum(t.numel() for t in kept
                        if t.shape[-1] == VOCAB and t.untyped_storage().data_ptr() not in weights)

    ref, ref_kept = saved_vocab_numel(lambda: _reference(model, padded, 0.7))
    assert ref_kept >= 3 * c_len * VOCAB  # the full path keeps the (B, C, V) logits: the check can fail
    rows = []  # positions each lm_head call projects (the base Linear under LoRA's wrapper)
    hook = head.base_layer.register_forward_hook(lambda m, a, o: rows.append(o.reshape(-1, VOCAB).shape[0]))
    try:
        new, new_kept = saved_vocab_numel(
            lambda: completion_logprobs(model, batch, 0.7, NO_AUTOCAST, chunk_tokens=CHUNK))
        forward_calls = len(rows)
        _loss_and_grads(model, new, batch)
    finally:
        hook.remove()
    assert new_kept == 0
    # Padded, the head runs on every (B, C) position; packed, on the real completion tokens only.
    n_positions = sum(m for _, m in LENGTHS) if packed else 3 * c_len
    n_chunks = -(-n_positions // CHUNK)
    # The model's own forward projects one position per row (logits_to_keep=1; packed: one row), then one call
    # per chunk in forward and each chunk recomputed once in backward; none is wider than a chunk.
    assert forward_calls == 1 + n_chunks and len(rows) == 1 + 2 * n_chunks
    assert rows[0] == (1 if packed else 3) and max(rows[1:]) <= CHUNK and sum(rows[1 : 1 + n_chunks]) == n_positions


def test_reference_with_the_adapter_disabled():
    model, batch = _tiny(), _batch()
    mask = batch["mask"].bool()
    with torch.no_grad():
        with model.disable_adapter():
            ref = _reference(model, batch, 0.7)
            new = completion_logprobs(model, batch, 0.7, NO_AUTOCAST, chunk_tokens=CHUNK)
        adapted = completion_logprobs(model, batch, 0.7, NO_AUTOCAST, chunk_tokens=CHUNK)
    assert (new[mask] - ref[mask]).abs().max() <= 1e-5
    assert (adapted[mask] - new[mask]).abs().max() > 1e-3  # the adapter was really off


def test_the_head_runs_under_the_callers_autocast_in_forward_and_in_the_recomputation():
    model, batch = _tiny(), _batch()
    mask = batch["mask"].bool()
    head = model.get_base_model().get_output_embeddings()
    dtypes = []
    hook = head.base_layer.register_forward_hook(lambda m, a, o: dtypes.append(o.dtype))
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16)
    try:
        new = completion_logprobs(model, batch, 0.7, bf16, chunk_tokens=CHUNK)
        _loss_and_grads(model, new, batch)
    finally:
        hook.remove()
    assert len(dtypes) > 2 and set(dtypes) == {torch.bfloat16}  # forward and recomputed chunks alike
    ref = _reference(model, batch, 0.7, bf16)
    assert new.dtype == torch.float32
    torch.testing.assert_close(new[mask], ref[mask], atol=0.05, rtol=0)  # bf16 rounding, same computation


@pytest.mark.parametrize("grad", [False, True])
def test_a_model_that_caps_its_logits_takes_the_full_logits_path(grad):
    model, batch = _tiny("gemma2"), _batch()
    mask = batch["mask"].bool()
    assert rollout._head_and_decoder(model) is None
    with torch.set_grad_enabled(grad):
        ref = _reference(model, batch, 0.7)
        new = completion_logprobs(model, batch, 0.7, NO_AUTOCAST, chunk_tokens=CHUNK)
    torch.testing.assert_close(new, ref, atol=0, rtol=0)
    # The plain lm_head would have been wrong for it: the cap changes the log-probabilities.
    lm = model.get_base_model()
    with torch.no_grad():
        hidden = lm.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  position_ids=batch["position_ids"]).last_hidden_state
        plain = token_logprobs(lm.get_output_embeddings()(hidden[:, -batch["completion_ids"].shape[1] - 1 : -1]),
                               batch["completion_ids"], 0.7)
    assert (plain[mask] - ref[mask]).abs().max() > 1e-2
    # Its micro-batches are never packed: the update asks `packable`, and a packed batch is refused.
    assert not rollout.packable(model)
    with pytest.raises(ValueError, match="packable"):
        completion_logprobs(model, _batch(packed=True), 0.7, NO_AUTOCAST)


# -- packed micro-batches (the fast path) ----------------------------------------------------------


def test_pack_rollouts_concatenates_the_rows_and_ties_each_completion_token_to_its_predictor():
    rows, packed, padded = _rows(), _batch(packed=True), _batch()
    seqs = [r.prompt_ids + r.completion_ids for r in rows]
    assert packed["input_ids"].tolist() == [[i for s in seqs for i in s]]
    assert packed["position_ids"].tolist() == [[j for s in seqs for j in range(len(s))]]
    assert packed["row_bounds"] == [0, 17, 30, 39] and "attention_mask" not in packed
    # The hidden state at each predictor is followed by the completion token it predicts, row by row.
    ids = packed["input_ids"][0]
    assert ids[packed["predictors"] + 1].tolist() == [t for r in rows for t in r.completion_ids]
    present = _present()
    assert packed["slots"].tolist() == present.reshape(-1).nonzero().squeeze(1).tolist()
    # What the loss reads has the padded layout, padding columns aside.
    for key in ("mask", "advantages"):
        assert torch.equal(packed[key], padded[key]), key
    assert torch.equal(packed["completion_ids"][present], padded["completion_ids"][present])
    assert packed["mask"][FORCED].eq(0).all() and packed["mask"].sum() == sum(m for _, m in LENGTHS) - 3


def test_packed_logprobs_and_grpo_lora_gradients_equal_the_padded_ones(monkeypatch):
    model, padded, packed = _tiny(), _batch(), _batch(packed=True)
    seen = []  # row_bounds each attention call of the packed forward got (the wrapper registered below)
    real = fast._packed_sdpa
    monkeypatch.setattr(fast, "_packed_sdpa", lambda *a, row_bounds=None, **kw: seen.append(row_bounds)
                        or real(*a, row_bounds=row_bounds, **kw))
    fast.use_packed_attention(model)
    present, mask = _present(), padded["mask"]
    n_tokens = int(mask.sum())

    def grpo_loss(batch):
        """The update's loss on one micro-batch (the first pass: ratio 1), its log-probs and LoRA gradients."""
        with torch.no_grad(), model.disable_adapter():
            ref = completion_logprobs(model, batch, 0.7, NO_AUTOCAST, chunk_tokens=CHUNK)
        logp = completion_logprobs(model, batch, 0.7, NO_AUTOCAST, chunk_tokens=CHUNK)
        tl = token_loss(logp, logp.detach(), ref, batch["advantages"], batch["mask"], 0.2, 0.2, beta=0.04)
        loss = (tl.loss.sum(dim=1) * step_normaliser("grpo", batch["mask"], 3, n_tokens, 9)).sum()
        params = [p for n, p in model.named_parameters() if "lora_" in n]
        return loss, ref, logp, torch.autograd.grad(loss, params)

    loss_pad, ref_pad, logp_pad, g_pad = grpo_loss(padded)
    assert seen and all(b is None for b in seen)  # padded: plain SDPA with the mask
    seen.clear()
    loss_pack, ref_pack, logp_pack, g_pack = grpo_loss(packed)
    # Each layer's attention in both packed forwards (reference, policy) ran row by row at the batch's bounds.
    assert seen == [packed["row_bounds"]] * 2 * 2
    assert (logp_pack[present] - logp_pad[present]).abs().max() <= 1e-5  # forced and length-1 tokens included
    assert (ref_pack[present] - ref_pad[present]).abs().max() <= 1e-5
    assert (logp_pack[present] - ref_pack[present]).abs().max() > 1e-3  # the adapter is on: the KL is not 0
    torch.testing.assert_close(loss_pack, loss_pad, rtol=1e-5, atol=0)
    for a, b in zip(g_pack, g_pad):
        assert b.abs().max() > 0
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


class _GradRecorder:
    """An optimizer that keeps the gradients it is asked to apply and leaves the weights alone."""

    def __init__(self, params):
        self.params, self.grads = params, []

    def step(self):
        self.grads.append([p.grad.clone() for p in self.params])

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


def _run_update(model, rows, monkeypatch, packing: bool, batch_size: int = 3, max_tokens: int = 16384,
                loss_type: str = "grpo"):
    """`grpo._update` on `model` as the trainer would run it; returns its stats, the gradients of the step, and
    the batches of the reference passes and of the policy passes."""
    cfg = load_config()
    g = dataclasses.replace(cfg.grpo, loss_type=loss_type, iterations=1, beta=0.04)
    t = dataclasses.replace(cfg.train, per_device_batch_size=batch_size, micro_batch_tokens=max_tokens,
                            max_grad_norm=0.0)
    run = SimpleNamespace(model=model, engine=model, device=torch.device("cpu"), packing=packing,
                          autocast=NO_AUTOCAST)
    calls = []
    monkeypatch.setattr(grpo, "completion_logprobs", lambda m, b, *a, **kw: calls.append(
        (torch.is_grad_enabled(), b)) or completion_logprobs(m, b, *a, **kw))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _GradRecorder(params)
    stats = grpo._update(run, params, optimizer, rows, g, t, pad_id=0, limit=16, eps_high=0.2)
    refs = [b for grad, b in calls if not grad]
    policy = [b for grad, b in calls if grad]
    return stats, optimizer.grads[0], refs, policy


# Eight rollouts of 17 to 40 tokens (203 in all), to pack by a budget of 64.
UPDATE_LENGTHS = ((16, 9), (16, 1), (16, 16), (16, 4), (24, 16), (16, 12), (16, 2), (16, 7))


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_update_packs_by_tokens_and_the_step_is_the_same_however_the_completions_are_grouped(loss_type, monkeypatch):
    model = _tiny().train()
    fast.use_packed_attention(model)
    rows = _rows(UPDATE_LENGTHS, seed=5)
    budget = 64
    runs = {"padded": _run_update(model, rows, monkeypatch, packing=False, loss_type=loss_type),
            "one pack": _run_update(model, rows, monkeypatch, packing=True, loss_type=loss_type),
            "by tokens": _run_update(model, rows, monkeypatch, packing=True, max_tokens=budget, loss_type=loss_type)}

    _, _, refs, policy = runs["padded"]
    assert len(policy) == 3 and all("row_bounds" not in b for b in policy)  # per_device_batch_size=3: 3+3+2
    _, _, refs, policy = runs["one pack"]
    assert len(policy) == 1 and policy[0]["row_bounds"][-1] == sum(p + c for p, c in UPDATE_LENGTHS)
    _, _, refs, policy = runs["by tokens"]
    # The reference and the policy pass run the very same micro-batches.
    assert len(refs) == len(policy) and all(a is b for a, b in zip(refs, policy))
    sizes = [b["row_bounds"][-1] for b in policy]
    counts = [len(b["row_bounds"]) - 1 for b in policy]
    assert len(policy) > 1 and sum(counts) == len(rows)
    # None over the budget (unless a single rollout is larger: none is here, see the next test); each holds as
    # many as fit, in order.
    assert all(s <= budget or n == 1 for s, n in zip(sizes, counts))
    lens = [p + c for p, c in UPDATE_LENGTHS]
    assert all(s + lens[sum(counts[: i + 1])] > budget for i, s in enumerate(sizes[:-1]))
    assert torch.cat([b["input_ids"][0] for b in policy]).tolist() == [i for r in rows for i in r.input_ids]

    want_stats, want_grads, _, _ = runs["padded"]
    assert want_stats["kl"] > 0 and any(g.abs().max() > 0 for g in want_grads)
    for name in ("one pack", "by tokens"):
        stats, grads, _, _ = runs[name]
        for key in ("loss", "kl", "grad_norm"):
            assert math.isclose(stats[key], want_stats[key], rel_tol=1e-5, abs_tol=1e-9), (name, key)
        for a, b in zip(grads, want_grads):
            assert (a - b).abs().max() <= 1e-5 * max(b.abs().max(), 1e-12), name


def test_update_packs_a_rollout_larger_than_the_budget_alone(monkeypatch):
    model = _tiny().train()
    fast.use_packed_attention(model)
    rows = _rows(((8, 4), (40, 30), (8, 4), (8, 4)), seed=6)
    _, _, _, policy = _run_update(model, rows, monkeypatch, packing=True, max_tokens=32)
    assert [b["row_bounds"] for b in policy] == [[0, 12], [0, 70], [0, 12, 24]]


def test_update_never_packs_a_model_whose_logits_are_not_its_heads(monkeypatch):
    # Gemma 2 soft-caps its logits (Cohere, Granite, Gemma 3 ... scale or cap them too): padded, whatever the trainer
    # packs. (Gemma 2 itself has no SDPA attention to pack with; the trainer's `packing` is forced here.)
    model = _tiny("gemma2").train()
    stats, _, refs, policy = _run_update(model, _rows(), monkeypatch, packing=True)
    assert policy and all("row_bounds" not in b for b in refs + policy)
    assert math.isfinite(stats["loss"]) and stats["grad_norm"] > 0


def _varied_score(text, num_tokens, closed_by_model, item, task, g, limit):
    """A reward that differs between sampled completions of one prompt: a learning signal for random text."""
    v = (sum(map(ord, text)) % 7) / 6
    return rewards.Scored(values={"correct": float(v > 0.5), "format": v}, total=v, label=None, method="none",
                          correct=v > 0.5)


@pytest.mark.slow
def test_a_grpo_step_on_the_fast_path_packs_and_equals_the_plain_one(tmp_path, tiny_model_dir, shared_data,
                                                                      monkeypatch):
    """train.fast_path=on turns packing on on the CPU too (`fast.fast_path_enabled`): the whole stage runs with
    per-row attention and the fused LoRA, its update packed, and its first step (the same completions: the
    adapter starts as a no-op) has the padded step's loss and gradient norm, over two updates (the second with
    a ratio that is not 1)."""
    assert fast.fast_path_enabled("on", torch.device("cpu"))
    monkeypatch.setattr("medcot.rl.rollout.score", _varied_score)
    packs = []
    monkeypatch.setattr(grpo, "pack_rollouts", lambda rows, device: packs.append(len(rows))
                        or pack_rollouts(rows, device))
    common = [f"model.name_or_path={tiny_model_dir}", "model.device=cpu", "model.dtype=fp32", "train.stage=grpo",
              f"grpo.source={shared_data / 'dev_pools' / 'normalized' / 'medqa_usmle_4opt_dev.jsonl'}",
              "grpo.num_samples=4", "grpo.val_size=1", "grpo.prompts_per_step=2", "grpo.num_generations=4",
              "grpo.max_steps=1", "grpo.iterations=2", "grpo.learning_rate=1.0e-2", "train.warmup_steps=0",
              "grpo.thinking_budget=8", "grpo.answer_tokens=4", "eval.benchmarks=medqa",
              "train.report_to=none", "train.sample_questions=1", "train.per_device_batch_size=4",
              "train.micro_batch_tokens=600", "generate.batch_size=8", f"train.output_dir={tmp_path}"]
    metrics = {}
    for name, setting in (("plain", "off"), ("fast", "on")):
        assert main(["train", *common, f"train.run_name={name}", f"train.fast_path={setting}"]) == 0
        metrics[name] = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])
        assert bool(packs) == (name == "fast")
    assert len(packs) > 1 and sum(packs) == 8  # the step's 8 completions in several packed micro-batches
    assert metrics["fast"]["grad_norm"] > 0 and abs(metrics["fast"]["loss"]) > 1e-4
    for key in ("reward", "loss", "kl", "clip_fraction", "grad_norm"):
        assert math.isclose(metrics["fast"][key], metrics["plain"][key], rel_tol=1e-4, abs_tol=1e-7), key


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (PyTorch's varlen flash attention); run on the device")
def test_packed_update_on_cuda_runs_varlen_attention_and_matches_the_fp32_padded_one(monkeypatch):
    """On CUDA a bf16 model's packed micro-batch goes through varlen flash attention; its log-probs and LoRA gradients
    match the same model's padded fp32 ones to bf16 precision, and a predictor shifted by one would not. An fp32
    model's packed batch goes row by row (the varlen kernel takes 16-bit inputs only) and matches to fp32 precision."""
    import copy

    if fast._varlen() is None:
        pytest.skip("this torch has no torch.nn.attention.varlen (torch >= 2.10)")
    torch.manual_seed(0)
    model32 = _tiny().cuda()
    with torch.no_grad():
        model32.get_output_embeddings().weight.mul_(40)  # spread the logits: a wrong token position shows at once
    model16 = copy.deepcopy(model32).to(torch.bfloat16)
    for m in (model32, model16):
        fast.use_packed_attention(m)
    calls = []
    varlen, kw = fast._varlen()
    monkeypatch.setattr(fast, "_varlen", lambda: (lambda *a, **k: calls.append(1) or varlen(*a, **k), kw))
    padded, packed = collate(_rows(), pad_id=0, device="cuda"), pack_rollouts(_rows(), device="cuda")
    present = _present().cuda()

    def logp_and_grads(model, batch):
        logp = completion_logprobs(model, batch, 1.0, NO_AUTOCAST, chunk_tokens=CHUNK)
        return logp.detach().float(), [g.float() for g in _loss_and_grads(model, logp, batch)[1]]

    ref, ref_grads = logp_and_grads(model32, padded)  # fp32, SDPA with the padding mask
    got32, _ = logp_and_grads(model32, packed)
    assert not calls  # fp32: row by row
    assert (got32[present] - ref[present]).abs().max() <= 1e-4
    got, grads = logp_and_grads(model16, packed)
    assert len(calls) == 2  # bf16: one varlen call per decoder layer (the chunks' recompute runs the head only)
    err = (got[present] - ref[present]).abs().max().item()
    assert err <= 0.5, err
    with torch.no_grad():
        wrong = completion_logprobs(model16, dict(packed, predictors=packed["predictors"] - 1), 1.0, NO_AUTOCAST,
                                    chunk_tokens=CHUNK).float()
    assert (wrong[present] - ref[present]).abs().max().item() > 4 * max(err, 0.25)
    for a, b in zip(grads, ref_grads):
        assert (a - b).norm() <= 0.1 * b.norm()
