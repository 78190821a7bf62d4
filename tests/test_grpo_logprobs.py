"""GRPO's per-token log-probabilities without the full-vocabulary logits: `completion_logprobs` runs lm_head and
the log-softmax a chunk of positions at a time (checkpointed), and must give what the full logits give, values
and LoRA gradients, with the adapter on or off; models whose forward changes the logits take the full path."""

from __future__ import annotations

import pytest
import torch

from medcot.eval.tasks import Item
from medcot.rl import rollout
from medcot.rl.algorithm import token_logprobs
from medcot.rl.rollout import Rollout, collate, completion_logprobs

VOCAB = 1000
ITEM = Item(id="q1", benchmark="medqa", question="?", options={"A": "a", "B": "b"}, answer="A")
NO_AUTOCAST = torch.autocast("cpu", enabled=False)
# Prompts and completions of different lengths: left-padded prompts, right-padded completions (B=3, C=9).
LENGTHS = ((12, 5), (4, 9), (8, 1))
CHUNK = 7  # fewer than the 27 completion positions, and not dividing them


def _tiny(kind: str = "llama"):
    """A 2-layer random model with a LoRA adapter (random non-zero B, so it changes the outputs), on lm_head too."""
    from peft import LoraConfig, get_peft_model
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=0)
    if kind == "llama":
        base = LlamaForCausalLM(LlamaConfig(**common))
    else:  # a strong soft-cap, so that leaving it out would show
        base = Gemma2ForCausalLM(Gemma2Config(**common, head_dim=16, final_logit_softcapping=1.0))
    lora = LoraConfig(r=4, lora_alpha=16, init_lora_weights=False,
                      target_modules=["q_proj", "v_proj", "down_proj", "lm_head"])
    return get_peft_model(base, lora).eval()


def _batch():
    g = torch.Generator().manual_seed(3)
    rows = [Rollout(item=ITEM, prompt_ids=torch.randint(5, VOCAB, (n,), generator=g).tolist(),
                    completion_ids=torch.randint(5, VOCAB, (m,), generator=g).tolist(), policy_mask=[1] * m,
                    text="", num_tokens=m, scored=None) for n, m in LENGTHS]
    return collate(rows, pad_id=0, device="cpu")


def _reference(model, batch, temperature, autocast=NO_AUTOCAST):
    """The full-logits way: every completion position's logits from the model's own forward."""
    c_len = batch["completion_ids"].shape[1]
    with autocast:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], logits_to_keep=c_len + 1, use_cache=False).logits
    return token_logprobs(logits[:, :-1], batch["completion_ids"], temperature)


def _loss_and_grads(model, logp, batch):
    """A masked loss weighting each token differently, and the gradients of every LoRA parameter."""
    w = torch.linspace(-1.0, 2.0, logp.numel()).view_as(logp)
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


def test_no_vocabulary_sized_tensor_is_kept_for_backward_and_backward_recomputes_one_chunk_at_a_time():
    model, batch = _tiny(), _batch()
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

    ref, ref_kept = saved_vocab_numel(lambda: _reference(model, batch, 0.7))
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
    n_chunks = -(-3 * c_len // CHUNK)
    # The model's own forward projects one position per row (logits_to_keep=1), then one call per chunk in
    # forward and each chunk recomputed once in backward; none is wider than a chunk.
    assert forward_calls == 1 + n_chunks and len(rows) == 1 + 2 * n_chunks
    assert rows[0] == 3 and max(rows[1:]) <= CHUNK


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
