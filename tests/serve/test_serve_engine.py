"""Engine and prompt building, without HTTP: the streamed reasoning/answer split, conversations into
prompts, and continuous batching against one-at-a-time `generate` on the tiny model."""

from __future__ import annotations

import asyncio

import pytest

from medcot.config import GenerateArgs, PromptArgs
from medcot.data.prompts import INSTRUCTION, PromptFormatter
from medcot.generate.batch import generate
from medcot.generate.engine import Engine, SamplingParams
from medcot.generate.reasoning import ReasoningSplitter, split_reasoning
from medcot.model.load import load_tokenizer
from medcot.serve.chat import build_prompt, conversation_to_question
from medcot.errors import Overloaded
from medcot.serve.protocol import ChatMessageParam, RequestError

# -- ReasoningSplitter --------------------------------------------------------------------------------

SPLIT_CASES = [
    "Fever and flank pain.\n</think>\nPyelonephritis.",
    "\n  step one\nstep two\n</think>\n\n  Answer: B  \n",
    "<think>\nFever and flank pain.\n</think>\nPyelonephritis.",  # the model repeats the prompt's tag
    "Fever and flank pain, so maybe the kidney",  # never closed
    "<think>\nstill thinking",
    "</think>Pyelonephritis.",
    "",
    "r</think>a </think> b",  # a later tag stays in the answer
    "a < b and </thi are not tags\n</think>\nx <think> y",
]


def _run(splitter: ReasoningSplitter, text: str, size: int) -> tuple[str, str]:
    pieces = []
    for i in range(0, len(text), size):
        pieces += splitter.feed(text[i:i + size])
    pieces += splitter.flush()
    assert all(t for _, t in pieces), "empty pieces are never emitted"
    return "".join(t for k, t in pieces if k == "reasoning"), "".join(t for k, t in pieces if k == "content")


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000], ids=lambda n: f"pieces-of-{n}")
@pytest.mark.parametrize("text", SPLIT_CASES)
def test_streamed_split_matches_split_reasoning(text, size):
    """The prompt opened <think>: any chunking of the stream gives split_reasoning's result."""
    s = split_reasoning(text)
    assert _run(ReasoningSplitter(starts_in_reasoning=True), text, size) == (s.reasoning, s.answer)


@pytest.mark.parametrize("size", [1, 3, 1000], ids=lambda n: f"pieces-of-{n}")
@pytest.mark.parametrize(
    ("text", "reasoning", "content"),
    [
        ("<think>\nFever.\n</think>\n\nPyelonephritis.", "Fever.", "Pyelonephritis."),  # R1-style opening
        ("  <think>r</think>a", "r", "a"),
        ("Rest and fluids.", "", "Rest and fluids."),  # no reasoning at all: all answer
        ("<thinking about it> is not a tag", "", "<thinking about it> is not a tag"),
        ("<think>\nnever closed", "never closed", ""),
        ("<thi", "", "<thi"),  # a partial tag at the very end is text
        ("   ", "", ""),
    ],
)
def test_split_when_the_prompt_did_not_open_think(text, reasoning, content, size):
    assert _run(ReasoningSplitter(starts_in_reasoning=False), text, size) == (reasoning, content)


def test_split_holds_back_only_a_possible_tag():
    sp = ReasoningSplitter(starts_in_reasoning=True)
    assert sp.feed("Flank pain </th") == [("reasoning", "Flank pain")]  # "</th" may be the closing tag
    assert sp.feed("ought") == [("reasoning", " </thought")]  # it was not
    assert sp.feed(" done\n</think>\nAns") == [("reasoning", " done"), ("content", "Ans")]
    assert sp.flush() == []


# -- conversations into prompts -------------------------------------------------------------------------


def test_one_question_is_the_training_prompt_verbatim(embedded_dir):
    tok = load_tokenizer(str(embedded_dir))
    fmt = PromptFormatter(tok, PromptArgs(template="seed"))
    q = "What is the first-line treatment for anaphylaxis?"
    prompt = build_prompt(fmt, [ChatMessageParam(role="user", content=q)])
    assert prompt.ids == fmt.encode_prompt(q)
    assert prompt.opens_reasoning


def test_history_and_system_go_into_the_question():
    q = conversation_to_question([
        ("system", "Answer for a paediatric ward."),
        ("user", "A child has a barking cough. Cause?"),
        ("assistant", "Airway swelling below the cords.\n</think>\nCroup."),  # reasoning is dropped
        ("user", "Which virus?"),
    ])
    assert q == ("Answer for a paediatric ward.\n\nEarlier in this conversation:\n"
                 "User: A child has a barking cough. Cause?\nAssistant: Croup.\n\nFollow-up question:\nWhich virus?")


def test_chat_template_renders_the_whole_conversation(embedded_dir):
    tok = load_tokenizer(str(embedded_dir))
    fmt = PromptFormatter(tok, PromptArgs(template="chat"))
    msgs = [ChatMessageParam(role="system", content="Be brief."),
            ChatMessageParam(role="user", content=[{"type": "text", "text": "Barking cough?"}]),
            ChatMessageParam(role="assistant", content="<think>\nlarynx\n</think>\n\nCroup."),
            ChatMessageParam(role="user", content="Which virus?")]
    text = tok.decode(build_prompt(fmt, msgs).ids)
    assert "Be brief." in text and f"{INSTRUCTION}\n\nBarking cough?" in text and "Which virus?" in text
    assert "Croup." in text and "larynx" not in text  # earlier reasoning is not sent back
    assert text.index("Barking cough?") < text.index("Croup.") < text.index("Which virus?")


def test_non_text_content_is_a_400():
    msg = ChatMessageParam(role="user", content=[{"type": "image_url", "image_url": {"url": "data:,"}}])
    with pytest.raises(RequestError, match="only .*text"):
        msg.text(0)


# -- the engine -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    return model, load_tokenizer(str(tiny_model_dir))


async def _collect(engine: Engine, ids: list[int], params: SamplingParams, delay: float = 0.0):
    await asyncio.sleep(delay)
    ticket = engine.submit(ids, params)
    text, last = "", None
    async for ev in ticket.events():
        text += ev.text
        last = ev
    return text, last


def _run_engine(model, tok, jobs, **limits):
    async def main():
        engine = Engine(model, tok, **{"max_batch_size": 4, "max_queue": 8, "request_timeout_s": 60, **limits})
        engine.start()
        try:
            return await asyncio.gather(*[_collect(engine, *job) for job in jobs]), engine
        finally:
            engine.stop()

    return asyncio.run(main())


def test_continuous_batching_matches_one_at_a_time_generate(tiny):
    """Greedy answers are the same whether requests run alone (HF generate) or batched with others that join
    and leave mid-flight (different prompt lengths, different max_tokens)."""
    model, tok = tiny
    fmt = PromptFormatter(tok, PromptArgs())
    questions = ["Croup?", "A 60-year-old smoker has haemoptysis and weight loss. Next step?", "Sepsis?",
                 "Which nerve runs in the spiral groove of the humerus and what does its injury cause?", "Gout?"]
    ids = [fmt.encode_prompt(q) for q in questions]
    lengths = [12, 5, 20, 9, 16]
    jobs = [(p, SamplingParams(max_tokens=n), 0.05 * i) for i, (p, n) in enumerate(zip(ids, lengths))]
    results, engine = _run_engine(model, tok, jobs, max_batch_size=3)  # 5 requests, 3 slots: some wait
    for p, n, (text, done) in zip(ids, lengths, results):
        ref = generate(model, tok, [p], GenerateArgs(max_new_tokens=n, batch_size=1))[0]
        assert text == ref.text
        assert done.kind == "done" and done.completion_tokens == ref.num_tokens
        assert done.finish_reason == ("stop" if ref.finished else "length")
    assert engine.stats.completed == 5 and engine.load() == {"running": 0, "waiting": 0}


def test_seeded_sampling_is_reproducible(tiny):
    model, tok = tiny
    ids = tok("Question: croup?")["input_ids"]
    jobs = [(ids, SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=s)) for s in (1, 1, 2)]
    (a, _), (b, _), (c, _) = _run_engine(model, tok, jobs)[0]
    assert a == b and a != c


def test_stop_strings_and_ignore_eos(tiny):
    model, tok = tiny
    ids = tok("Question: croup?")["input_ids"]
    (full, done), = _run_engine(model, tok, [(ids, SamplingParams(max_tokens=12, ignore_eos=True))])[0]
    assert done.completion_tokens == 12 and done.finish_reason == "length"
    stop = full[5:8]
    (cut, done), = _run_engine(model, tok, [(ids, SamplingParams(max_tokens=12, stop=(stop,), ignore_eos=True))])[0]
    assert cut == full[:full.index(stop)] and done.finish_reason == "stop"


def test_submit_past_capacity_raises_overloaded_with_retry_after(tiny):
    """The engine says when to come back; the server turns that into 429 + Retry-After (tests/serve/test_serve_api.py)."""
    model, tok = tiny

    async def main():
        engine = Engine(model, tok, max_batch_size=2, max_queue=1, request_timeout_s=60)  # not started: all wait
        for _ in range(3):
            engine.submit([1, 2, 3], SamplingParams(max_tokens=1))
        with pytest.raises(Overloaded) as e:
            engine.submit([1, 2, 3], SamplingParams(max_tokens=1))
        return e.value, engine

    err, engine = asyncio.run(main())
    assert err.retry_after_s >= 1 and "serve.max_queue=1" in str(err)
    assert engine.stats.rejected == 1
