"""Engine and prompt building, without HTTP: the streamed reasoning/answer split, conversations into
prompts, and continuous batching against one-at-a-time `generate` on the tiny model."""

from __future__ import annotations

import asyncio
import time

import pytest

from medcot.config import GenerateArgs, PromptArgs
from medcot.data.prompts import INSTRUCTION, PromptFormatter
from medcot.errors import Overloaded, Unavailable
from medcot.generate.batch import generate
from medcot.generate.budget import FORCE_CLOSE
from medcot.generate.engine import Engine, SamplingParams
from medcot.generate.reasoning import ReasoningSplitter, split_reasoning
from medcot.model.load import load_tokenizer
from medcot.serve.chat import build_prompt, conversation_to_question
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


def _run_engine(model, tok, jobs, engine_cls=Engine, **limits):
    async def main():
        engine = engine_cls(model, tok, **{"max_batch_size": 4, "max_queue": 8, "request_timeout_s": 60, **limits})
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


# -- the thinking budget: the contract every engine keeps ---------------------------------------------------


def _greedy(model, ids: list[int], n: int) -> list[int]:
    """n greedy tokens without a KV cache or batching: the reference the engine must match."""
    import torch

    out = []
    with torch.inference_mode():
        for _ in range(n):
            out.append(int(model(torch.tensor([ids + out])).logits[0, -1].argmax()))
    return out


def _forced(tok) -> list[int]:
    return tok(FORCE_CLOSE, add_special_tokens=False)["input_ids"]


def test_budget_forces_the_close_then_generates_the_answer(tiny):
    """After `thinking_budget` reasoning tokens the engine appends "\\n</think>\\n" (fed to the model, sent as
    text, not counted) and generates up to `answer_tokens` more: the text is what a greedy model continues."""
    model, tok = tiny
    ids = PromptFormatter(tok, PromptArgs()).encode_prompt("Croup?")
    reasoning = _greedy(model, ids, 8)
    answer = _greedy(model, ids + reasoning + _forced(tok), 6)
    forced_text = tok.decode(_forced(tok) + answer)[len(tok.decode(_forced(tok))):]
    params = SamplingParams(max_tokens=200, thinking_budget=8, answer_tokens=6)
    (text, done), = _run_engine(model, tok, [(ids, params)])[0]
    assert text == tok.decode(reasoning) + FORCE_CLOSE + forced_text
    assert done.kind == "done" and done.forced_close and done.finish_reason == "length"
    assert (done.completion_tokens, done.reasoning_tokens) == (8 + 6, 8)
    assert split_reasoning(text).closed


def test_budget_keeps_room_for_the_answer_inside_max_tokens(tiny):
    """max_tokens still caps the whole completion: the reasoning gets max_tokens - answer_tokens at most, and
    none at all when max_tokens is smaller than answer_tokens (the model answers at once)."""
    model, tok = tiny
    ids = tok("Question: croup?")["input_ids"]
    jobs = [(ids, SamplingParams(max_tokens=10, thinking_budget=100, answer_tokens=4)),
            (ids, SamplingParams(max_tokens=3, thinking_budget=100, answer_tokens=4)),
            (ids, SamplingParams(max_tokens=10, thinking_budget=0, answer_tokens=4))]
    (a, da), (b, db), (c, dc) = _run_engine(model, tok, jobs)[0]
    assert (da.reasoning_tokens, da.completion_tokens) == (6, 10) and FORCE_CLOSE in a
    assert (db.reasoning_tokens, db.completion_tokens) == (0, 3) and b.startswith(FORCE_CLOSE)
    assert (dc.reasoning_tokens, dc.completion_tokens) == (0, 4) and c.startswith(FORCE_CLOSE)
    assert da.forced_close and db.forced_close and dc.forced_close


def test_no_budget_is_the_old_behaviour(tiny):
    model, tok = tiny
    ids = tok("Question: croup?")["input_ids"]
    (text, done), = _run_engine(model, tok, [(ids, SamplingParams(max_tokens=12, ignore_eos=True))])[0]
    assert FORCE_CLOSE not in text and not done.forced_close and done.completion_tokens == 12
    assert done.reasoning_tokens == 12  # never closed: all of it was reasoning


def _scripted(model, tok, jobs, **limits):
    from serve_utils import (
        ScriptedEngine,  # tokens follow a script named by a word of the prompt
    )

    return _run_engine(model, tok, jobs, engine_cls=ScriptedEngine, **limits)


def test_eos_inside_the_reasoning_forces_the_close_and_an_answer(tiny):
    """The documented rule for a model that stops (EOS) without closing its reasoning: with a budget, the
    EOS ends the reasoning, "</think>" is forced and the answer generated; without one, it just stops."""
    model, tok = tiny
    ids = PromptFormatter(tok, PromptArgs()).encode_prompt("unclosed?")
    reasoning, answer = "Rest, fluids and a review in a week", "Viral croup."  # serve_utils.SCRIPTS["unclosed"]
    n_reasoning, n_answer = (len(tok(t, add_special_tokens=False)["input_ids"]) for t in (reasoning, answer))
    jobs = [(ids, SamplingParams(max_tokens=60, thinking_budget=50, answer_tokens=20)),
            (ids, SamplingParams(max_tokens=60))]
    (forced, done), (plain, plain_done) = _scripted(model, tok, jobs)[0]
    assert forced == reasoning + FORCE_CLOSE + answer and done.finish_reason == "stop"
    assert done.forced_close and (done.reasoning_tokens, done.completion_tokens) == (n_reasoning, n_reasoning + n_answer)
    assert plain == reasoning and plain_done.finish_reason == "stop" and not plain_done.forced_close


def test_a_model_that_closes_itself_is_not_forced(tiny):
    """</think> written by the model ends the reasoning; answer_tokens limits only a forced answer."""
    model, tok = tiny
    ids = PromptFormatter(tok, PromptArgs()).encode_prompt("croup?")
    (text, done), = _scripted(model, tok, [(ids, SamplingParams(max_tokens=60, thinking_budget=50,
                                                                 answer_tokens=2))])[0]
    assert text.startswith("Barking cough") and text.endswith("parainfluenza virus.")
    assert not done.forced_close and done.finish_reason == "stop"
    head = "Barking cough and stridor after a cold point to the larynx and trachea.\n</think>"
    assert done.reasoning_tokens == len(tok(head, add_special_tokens=False)["input_ids"])


def test_a_prompt_that_did_not_open_think(tiny):
    """starts_in_reasoning=False: an answer without <think> is never forced; one that opens <think> is."""
    model, tok = tiny
    jobs = [(tok("plain?")["input_ids"], SamplingParams(max_tokens=30, thinking_budget=0, starts_in_reasoning=False)),
            (tok("tagged?")["input_ids"], SamplingParams(max_tokens=30, thinking_budget=5, answer_tokens=3,
                                                         starts_in_reasoning=False))]
    (plain, pd), (tagged, td) = _scripted(model, tok, jobs)[0]
    assert plain == "Rest and fluids." and not pd.forced_close and pd.reasoning_tokens == 0
    s = split_reasoning(tagged, starts_in_reasoning=False)
    assert tagged.startswith("<think>") and FORCE_CLOSE in tagged and s.closed and s.answer
    assert td.forced_close and td.reasoning_tokens == 5 and td.completion_tokens <= 5 + 3


def test_a_forced_answer_is_never_empty(tiny):
    """A model that wants to stop at every step (its second choice a word): after a forced close, EOS
    waits for a visible character."""
    model, tok = tiny
    word = tok("Croup", add_special_tokens=False)["input_ids"][0]

    class AlwaysStops(Engine):
        def _forward(self, *args):
            logits, cache = super()._forward(*args)
            logits[:, word] += 1e3
            logits[:, list(self._eos)] += 1e4
            return logits, cache

    ids = tok("Question: croup?")["input_ids"]
    jobs = [(ids, SamplingParams(max_tokens=20, thinking_budget=10, answer_tokens=5)), (ids, SamplingParams(max_tokens=20))]
    (text, done), (empty, empty_done) = _run_engine(model, tok, jobs, engine_cls=AlwaysStops)[0]
    assert empty == "" and empty_done.finish_reason == "stop"  # without a budget the model just stops
    assert text.startswith(FORCE_CLOSE) and text[len(FORCE_CLOSE):].strip() and done.finish_reason == "stop"
    assert done.forced_close and done.reasoning_tokens == 0 and done.completion_tokens == 1


def test_a_running_request_past_its_deadline_is_an_error_not_a_short_answer(tiny):
    """Never a cut-short "done" (an empty 200 at the server): the deadline ends it with a timeout error."""
    model, tok = tiny

    class Slow(Engine):
        def _sample(self, logits, rows):
            time.sleep(0.05)
            return super()._sample(logits, rows)

    ids = tok("Question: croup?")["input_ids"]
    t0 = time.monotonic()
    (text, last), = _run_engine(model, tok, [(ids, SamplingParams(max_tokens=1000, ignore_eos=True))],
                                engine_cls=Slow, request_timeout_s=0.5)[0]
    assert last.kind == "error" and isinstance(last.error, Unavailable) and last.error.code == "timeout"
    assert time.monotonic() - t0 < 0.5 + 1.0  # at the deadline, give or take a step
