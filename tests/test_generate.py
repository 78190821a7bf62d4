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


def test_batched_greedy_equals_one_at_a_time(tiny):
    model, tok, prompts = tiny
    batched = generate(model, tok, prompts, GenerateArgs(max_new_tokens=8, temperature=0.0, batch_size=3))
    single = [generate(model, tok, [p], GenerateArgs(max_new_tokens=8, temperature=0.0, batch_size=1))[0] for p in prompts]
    assert batched == single
    assert all(g.num_tokens == 8 or g.finished for g in batched)
    assert all(g.text for g in batched)


def test_progress_is_called_per_batch(tiny):
    model, tok, prompts = tiny
    seen = []
    generate(model, tok, prompts, GenerateArgs(max_new_tokens=2, batch_size=2), progress=seen.append)
    assert seen == [2, 3]


def test_sampling_is_reproducible_with_its_seed(tiny):
    model, tok, prompts = tiny
    args = GenerateArgs(max_new_tokens=8, temperature=1.0, top_p=0.95, seed=7)
    a = generate(model, tok, prompts[:1], args)
    b = generate(model, tok, prompts[:1], args)
    assert a == b


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
    stop.set()  # e.g. the client went away before the first token
    text = "".join(stream(model, tok, prompts[0], GenerateArgs(max_new_tokens=12), stop_event=stop))
    assert text == generate(model, tok, prompts[:1], GenerateArgs(max_new_tokens=1))[0].text


def test_stream_surfaces_generation_errors(tiny):
    _, tok, prompts = tiny

    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def generate(self, **kwargs):
            raise RuntimeError("out of memory (simulated)")

    with pytest.raises(RuntimeError, match="simulated"):
        list(stream(Broken(), tok, prompts[0], GenerateArgs(max_new_tokens=4)))


# -- what generate() does with the model's raw output ---------------------------------------------


class _Scripted(torch.nn.Module):
    """Stands in for a model: returns its prompt + a fixed continuation per row, and records its input."""

    def __init__(self, continuations: list[list[int]]):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.continuations = continuations
        self.calls = []

    def generate(self, input_ids, attention_mask, **kwargs):
        self.calls.append((input_ids.clone(), attention_mask.clone(), kwargs))
        new = torch.tensor(self.continuations[: len(input_ids)])
        return torch.cat([input_ids, new], dim=1)


def test_generate_left_pads_and_cuts_at_eos(embedded_dir):
    tok = load_tokenizer(str(embedded_dir))
    eos, pad = tok.eos_token_id, tok.pad_token_id
    hello, world = tok.encode("Hello"), tok.encode(" world")
    rows = [hello + world + [eos, 5, 6], hello + world * 4]
    assert len(rows[0]) == len(rows[1]) == 5
    model = _Scripted(rows)
    out = generate(model, tok, [[10, 11, 12], [13]], GenerateArgs(max_new_tokens=5, batch_size=2))
    input_ids, mask, kwargs = model.calls[0]
    assert input_ids.tolist() == [[10, 11, 12], [pad, pad, 13]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert kwargs["do_sample"] is False and kwargs["max_new_tokens"] == 5
    assert out == [
        Generation(text="Hello world", num_tokens=len(hello + world), finished=True),  # stops at EOS
        Generation(text="Hello world world world world", num_tokens=5, finished=False),  # ran out of tokens
    ]
