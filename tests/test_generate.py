"""Generate: splitting reasoning from answer, batched (left-padded) vs one-at-a-time, streaming."""

from __future__ import annotations

import threading

import pytest
import torch

from medcot.config import GenerateArgs, PromptArgs
from medcot.data.prompts import PromptFormatter
from medcot.generate.batch import Generation, generate, stream
from medcot.generate.reasoning import split_reasoning
from medcot.model.load import load_tokenizer

QUESTIONS = [
    "What is the first-line treatment for anaphylaxis?",
    "A child has a barking cough and inspiratory stridor after a cold. What is the likely cause, and which virus "
    "is most often responsible for it?",
    "Which nerve is at risk?",
]


# -- split_reasoning ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "reasoning", "answer", "closed"),
    [
        # Our prompts open <think>, so a normal completion starts inside the reasoning.
        ("Fever and flank pain.\n</think>\nPyelonephritis.", "Fever and flank pain.", "Pyelonephritis.", True),
        ("\n  step one\nstep two\n</think>\n\n  Answer: B  \n", "step one\nstep two", "Answer: B", True),
        # The model repeats the opening tag that the prompt already wrote.
        ("<think>\nFever and flank pain.\n</think>\nPyelonephritis.", "Fever and flank pain.", "Pyelonephritis.", True),
        # Never closed: it all is reasoning; there is no answer.
        ("Fever and flank pain, so maybe the kidney", "Fever and flank pain, so maybe the kidney", "", False),
        ("<think>\nstill thinking", "still thinking", "", False),
        # Closed at once: no reasoning, an answer.
        ("</think>Pyelonephritis.", "", "Pyelonephritis.", True),
        ("", "", "", False),
    ],
    ids=["normal", "whitespace", "repeated-open-tag", "never-closed", "open-never-closed", "empty-reasoning", "empty"],
)
def test_split_reasoning(text, reasoning, answer, closed):
    s = split_reasoning(text)
    assert (s.reasoning, s.answer, s.closed) == (reasoning, answer, closed)


def test_split_reasoning_keeps_later_tags_in_the_answer():
    s = split_reasoning("r</think>a </think> b")
    assert s.reasoning == "r" and s.answer == "a </think> b" and s.closed


# -- generation on the tiny model -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tok = load_tokenizer(str(tiny_model_dir))
    prompts = [PromptFormatter(tok, PromptArgs()).encode_prompt(q) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) == 3  # different lengths: the batch needs padding
    return model, tok, prompts


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """HF `generate`, greedy, one prompt, no padding: the reference the engine must equal."""
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=n, min_new_tokens=n, do_sample=False, temperature=None, top_p=None,
                             top_k=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def engine_tokens(model, tok, prompts, n: int, batch_size: int, **engine_attrs) -> list[list[int]]:
    from medcot.generate.batch import engine_for
    from medcot.generate.engine import Request, SamplingParams

    engine = engine_for(model, tok, prompts, n, batch_size)
    for k, v in engine_attrs.items():
        setattr(engine, k, v)
    requests = [Request(p, SamplingParams(max_tokens=n, ignore_eos=True)) for p in prompts]
    engine.run(requests)
    assert all(r.result.kind == "done" for r in requests)
    return [r.token_ids for r in requests]


def test_engine_greedy_equals_hf_generate(tiny):
    """The numerics test (its GPU twin is tests/test_generate_gpu.py): three prompts of different lengths,
    batched in one engine, give HF `generate`'s greedy tokens, one by one."""
    model, tok, prompts = tiny
    assert engine_tokens(model, tok, prompts, 24, batch_size=3) == [hf_greedy(model, p, 24) for p in prompts]


@pytest.mark.slow
def test_engine_greedy_equals_hf_generate_on_the_embedded_model(embedded_dir):
    """The same on real weights (SmolLM2-135M, fp32), where the logits have a clear winner."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32).eval()
    tok = load_tokenizer(str(embedded_dir))
    prompts = [PromptFormatter(tok, PromptArgs()).encode_prompt(q) for q in QUESTIONS[:2]]
    ref = [hf_greedy(model, p, 12) for p in prompts]
    assert engine_tokens(model, tok, prompts, 12, batch_size=2) == ref


def test_chunked_and_grouped_prefill_and_slot_moves_change_nothing(tiny):
    """Prompts prefilled in chunks of 8 tokens, 2 slots for 3 prompts (the third joins when a slot frees, and
    rows move between slots): the same tokens as HF generate."""
    model, tok, prompts = tiny
    ref = [hf_greedy(model, p, 10) for p in prompts]
    assert engine_tokens(model, tok, prompts, 10, batch_size=2, _prefill_tokens=8) == ref


def test_lora_layers_run_unmerged(tiny_model_dir):
    """A PEFT model: the engine calls its LoRA layers as they are (no merge) and matches HF generate."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # fresh adapters are zero: make them matter
    model.eval()
    tok = load_tokenizer(str(tiny_model_dir))
    p = PromptFormatter(tok, PromptArgs()).encode_prompt(QUESTIONS[0])
    with model.disable_adapter():
        without = hf_greedy(model, p, 12)
    assert hf_greedy(model, p, 12) != without  # the adapters change the answer
    assert engine_tokens(model, tok, [p], 12, batch_size=1) == [hf_greedy(model, p, 12)]


def _lora_all(base, tok):
    """PEFT LoRA on all 7 projections, lora_B perturbed; asserts the adapter changes the greedy answer."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(5)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.eval()
    p = PromptFormatter(tok, PromptArgs()).encode_prompt(QUESTIONS[0])
    with model.disable_adapter():
        without = hf_greedy(model, p, 12)
    assert hf_greedy(model, p, 12) != without  # the adapters change the answer
    return model


def test_merged_lora_engine_equals_hf_generate(tiny_model_dir):
    """The adapter merged into the base (what `medcot export` writes): two prompts of different lengths, batched,
    give HF generate's greedy tokens on the merged model, and those equal the unmerged model's."""
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(str(tiny_model_dir))
    model = _lora_all(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), tok)
    prompts = [PromptFormatter(tok, PromptArgs()).encode_prompt(q) for q in QUESTIONS[:2]]
    unmerged = [hf_greedy(model, p, 12) for p in prompts]
    merged = model.merge_and_unload().eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    ref = [hf_greedy(merged, p, 12) for p in prompts]
    assert engine_tokens(merged, tok, prompts, 12, batch_size=2) == ref
    assert ref == unmerged


def test_4bit_engine_equals_hf_generate(tiny_model_dir):
    """QLoRA on CPU: a bitsandbytes NF4 base (fp32 compute) with an unmerged LoRA on all 7 projections; two prompts
    of different lengths, batched, give HF generate's greedy tokens."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed (its CPU backend runs NF4 layers)")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, quantization_config=nf4,
                                                device_map={"": "cpu"})
    assert type(base.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    tok = load_tokenizer(str(tiny_model_dir))
    model = _lora_all(base, tok)
    prompts = [PromptFormatter(tok, PromptArgs()).encode_prompt(q) for q in QUESTIONS[:2]]
    ref = [hf_greedy(model, p, 12) for p in prompts]
    assert engine_tokens(model, tok, prompts, 12, batch_size=2) == ref


def test_batched_greedy_equals_one_at_a_time(tiny):
    model, tok, prompts = tiny
    batched = generate(model, tok, prompts, GenerateArgs(max_new_tokens=8, temperature=0.0, batch_size=3))
    single = [generate(model, tok, [p], GenerateArgs(max_new_tokens=8, temperature=0.0, batch_size=1))[0] for p in prompts]
    assert batched == single
    assert all(g.num_tokens == 8 or g.finished for g in batched)
    assert all(g.text for g in batched)


def test_progress_counts_finished_completions(tiny):
    model, tok, prompts = tiny
    seen = []
    generate(model, tok, prompts, GenerateArgs(max_new_tokens=2, batch_size=2), progress=seen.append)
    assert seen == sorted(seen) and seen[-1] == 3


def test_sampling_is_reproducible_with_its_seed(tiny):
    model, tok, prompts = tiny
    args = GenerateArgs(max_new_tokens=8, temperature=1.0, top_p=0.95, seed=7)
    a = generate(model, tok, prompts[:1], args)
    b = generate(model, tok, prompts[:1], args)
    assert a == b
    assert generate(model, tok, prompts[:1], GenerateArgs(max_new_tokens=8, temperature=1.0, top_p=0.95, seed=8)) != a


def test_a_seeded_request_draws_the_same_tokens_alone_or_in_a_batch(tiny):
    from medcot.generate.batch import run_requests
    from medcot.generate.engine import SamplingParams

    model, tok, prompts = tiny
    params = [SamplingParams(max_tokens=10, temperature=1.0, seed=s, ignore_eos=True) for s in (1, 2, 3)]
    together = [r.token_ids for r in run_requests(model, tok, prompts, params, batch_size=3)]
    alone = [run_requests(model, tok, [p], [sp], batch_size=1)[0].token_ids for p, sp in zip(prompts, params)]
    assert together == alone


def test_sampler_draws_from_the_distribution():
    """The exponential race with hashed noise samples p: frequencies over 4,000 draws (steps) match it."""
    from medcot.generate.sampler import RowParams, sample

    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 4000
    logits = p.log().repeat(n, 1)
    rows = RowParams(temperature=[1.0] * n, top_p=[1.0] * n, seeds=[42] * n, steps=list(range(n)),
                     block_eos=[False] * n)
    freq = torch.bincount(sample(logits.clone(), rows, []), minlength=4).float() / n
    assert (freq - p).abs().max() < 0.03
    # top_p=0.5 keeps the most likely token only; EOS (token 0 here) blocked moves greedy to the next one.
    rows.top_p = [0.5] * n
    assert sample(logits.clone(), rows, []).eq(0).all()
    greedy = RowParams(temperature=[0.0], top_p=[1.0], seeds=[0], steps=[0], block_eos=[True])
    assert sample(p.log()[None].clone(), greedy, [0]).tolist() == [1]


def test_stream_pieces_join_to_the_generated_text(tiny):
    model, tok, prompts = tiny
    args = GenerateArgs(max_new_tokens=12)
    for p in prompts:
        pieces = list(stream(model, tok, p, args))
        assert pieces and all(pieces)
        assert "".join(pieces) == generate(model, tok, [p], args)[0].text


def test_stream_stops_when_asked(tiny):
    model, tok, prompts = tiny
    stop = threading.Event()
    full = generate(model, tok, prompts[:1], GenerateArgs(max_new_tokens=12))[0].text
    text = ""
    for piece in stream(model, tok, prompts[0], GenerateArgs(max_new_tokens=12), stop_event=stop):
        text += piece
        stop.set()  # e.g. the client went away after the first piece
    assert text and full.startswith(text) and len(text) < len(full)


def test_stream_surfaces_generation_errors(tiny, monkeypatch):
    from medcot.generate.runner import ModelRunner

    model, tok, prompts = tiny

    def broken(self, *args):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(ModelRunner, "decode", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        list(stream(model, tok, prompts[0], GenerateArgs(max_new_tokens=4)))


def test_unsupported_models_say_why(embedded_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    from medcot.generate.runner import UnsupportedModel

    tok = load_tokenizer(str(embedded_dir))
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tok)))
    with pytest.raises(UnsupportedModel, match="gpt2"):
        generate(model, tok, [[1, 2, 3]], GenerateArgs(max_new_tokens=2))


# -- what generate() does with the model's output -----------------------------------------------------


def test_generate_cuts_at_eos(tiny, monkeypatch):
    """A completion ends at EOS (not counted, not in the text); one that never writes it runs to max_new_tokens."""
    from medcot.generate.engine import Engine

    model, tok, prompts = tiny
    eos = tok.eos_token_id
    real = Engine._forward
    steps = {"n": 0}

    def eos_at_third_token_of_row_0(self, *args):
        logits, cache = real(self, *args)
        steps["n"] += 1
        if steps["n"] == 3:  # prefill, then two decode steps: row 0's third token
            logits[0, eos] = 1e4
        return logits, cache

    monkeypatch.setattr(Engine, "_forward", eos_at_third_token_of_row_0)
    out = generate(model, tok, prompts[:2], GenerateArgs(max_new_tokens=5, batch_size=2))
    monkeypatch.setattr(Engine, "_forward", real)
    ref = generate(model, tok, prompts[:2], GenerateArgs(max_new_tokens=5, batch_size=2))
    assert out[0] == Generation(text=tok.decode(hf_greedy(model, prompts[0], 2)), num_tokens=2, finished=True)
    assert out[1] == ref[1] and out[1].num_tokens == 5 and not out[1].finished
