"""Prompt: exact strings, token ids and loss masks for the seed template and for chat templates
(SmolLM's, and DeepSeek-R1's, which strips the reasoning from assistant turns)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from medcot.config import PromptArgs
from medcot.data.prompts import IGNORE_INDEX, PromptFormatter, encode_records
from medcot.data.rows import Record
from medcot.model.load import load_tokenizer

ASSETS = Path(__file__).parent / "assets"

QUESTION = "A 24-year-old woman has fever, dysuria and flank pain. What is the most likely diagnosis?"
REASONING = "Fever with dysuria points to a urinary infection.\nFlank pain means the kidney is involved."
ANSWER = "Acute pyelonephritis."
RECORD = Record(question=QUESTION, reasoning=REASONING, answer=ANSWER, row=1)

INSTRUCTION = (
    "You are a medical expert with advanced knowledge in clinical reasoning, diagnostics, and treatment planning. "
    "Please answer the following medical question."
)
# The seed recipe's template, written out here in full so any change to it shows up as a test failure.
SEED_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n"
    "Before answering, think carefully about the question and create a step-by-step chain of thoughts "
    "to ensure a logical and accurate response.\n"
    "\n"
    "### Instruction:\n"
    f"{INSTRUCTION}\n"
    "\n"
    "### Question:\n"
    f"{QUESTION}\n"
    "\n"
    "### Response:\n"
    "<think>\n"
)

R1_BOS, R1_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"


@pytest.fixture(scope="module")
def tok(embedded_dir):
    """The embedded SmolLM2 tokenizer, as medcot loads it."""
    return load_tokenizer(str(embedded_dir))


@pytest.fixture(scope="module")
def r1_tok(embedded_dir):
    """The embedded tokenizer dressed as DeepSeek-R1's: its BOS/EOS and turn markers, its (abridged) template."""
    t = load_tokenizer(str(embedded_dir))
    t.add_special_tokens(
        {"bos_token": R1_BOS, "eos_token": R1_EOS, "additional_special_tokens": ["<｜User｜>", "<｜Assistant｜>"]}
    )
    t.chat_template = (ASSETS / "r1_chat_template.jinja").read_text(encoding="utf-8")
    return t


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _loss_text(tok, enc) -> str:
    return tok.decode([t for t in enc.labels if t != IGNORE_INDEX])


# -- seed template --------------------------------------------------------------------------------


def test_seed_prompt_and_completion_exact_strings(tok):
    f = PromptFormatter(tok, PromptArgs(template="seed"))
    prompt = f.prompt(QUESTION)
    assert prompt == SEED_PROMPT
    assert prompt.endswith("### Response:\n<think>\n")
    assert f.completion(prompt, REASONING, ANSWER) == REASONING + "\n</think>\n" + ANSWER


def test_seed_token_ids_are_prompt_then_completion_then_eos(tok):
    f = PromptFormatter(tok, PromptArgs(template="seed"))
    enc = f.encode(RECORD)
    prompt_ids = tok(SEED_PROMPT)["input_ids"]
    completion_ids = _ids(tok, REASONING + "\n</think>\n" + ANSWER)
    assert enc.input_ids == prompt_ids + completion_ids + [tok.eos_token_id]
    assert enc.prompt_len == len(prompt_ids)
    assert enc.input_ids.count(tok.eos_token_id) == 1  # EOS ends the answer, once
    assert tok.decode(enc.input_ids) == SEED_PROMPT + REASONING + "\n</think>\n" + ANSWER + tok.eos_token


def test_seed_labels_mask_exactly_the_prompt(tok):
    enc = PromptFormatter(tok, PromptArgs(template="seed", loss_on="response")).encode(RECORD)
    n = enc.prompt_len
    assert len(enc.labels) == len(enc.input_ids)
    assert enc.labels[:n] == [IGNORE_INDEX] * n
    assert enc.labels[n:] == enc.input_ids[n:]  # every response token, EOS included, carries loss
    assert IGNORE_INDEX not in enc.labels[n:]
    assert _loss_text(tok, enc) == REASONING + "\n</think>\n" + ANSWER + tok.eos_token


def test_loss_on_all_masks_nothing(tok):
    enc = PromptFormatter(tok, PromptArgs(template="seed", loss_on="all")).encode(RECORD)
    assert enc.labels == enc.input_ids
    assert enc.prompt_len == len(tok(SEED_PROMPT)["input_ids"])


def test_inference_prompt_ids_are_the_training_prefix(tok):
    for template in ["seed", "chat"]:
        f = PromptFormatter(tok, PromptArgs(template=template))
        enc = f.encode(RECORD)
        assert f.encode_prompt(QUESTION) == enc.input_ids[: enc.prompt_len], template


def test_template_file(tmp_path, tok):
    path = tmp_path / "t.txt"
    path.write_text("Q: {question}\nA: <think>\n", encoding="utf-8")
    f = PromptFormatter(tok, PromptArgs(template=str(path)))
    assert f.prompt("why?") == "Q: why?\nA: <think>\n"
    assert f.completion(f.prompt("why?"), "r", "a") == "r\n</think>\na"
    # A template that does not open the reasoning: the completion opens it.
    path.write_text("Q: {question}\nA:", encoding="utf-8")
    f = PromptFormatter(tok, PromptArgs(template=str(path)))
    assert f.completion(f.prompt("why?"), "r", "a") == "<think>\nr\n</think>\na"
    path.write_text("Q: {question}\n<think>", encoding="utf-8")  # opened, without the newline
    f = PromptFormatter(tok, PromptArgs(template=str(path)))
    assert f.completion(f.prompt("why?"), "r", "a") == "\nr\n</think>\na"


def test_template_errors(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="neither 'seed', 'chat' nor an existing template file"):
        PromptFormatter(tok, PromptArgs(template=str(tmp_path / "nope.txt")))
    path = tmp_path / "t.txt"
    path.write_text("no placeholder here")
    with pytest.raises(ValueError, match=r"must contain the placeholder \{question\}"):
        PromptFormatter(tok, PromptArgs(template=str(path)))
    with pytest.raises(ValueError, match="no EOS token"):
        PromptFormatter(SimpleNamespace(eos_token_id=None), PromptArgs())


# -- chat template: SmolLM ------------------------------------------------------------------------


def test_smollm_chat_template_keeps_the_reasoning(tok):
    f = PromptFormatter(tok, PromptArgs(template="chat"))
    prompt = f.prompt(QUESTION)
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        f"<|im_start|>user\n{INSTRUCTION}\n\n{QUESTION}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    completion = f.completion(prompt, REASONING, ANSWER)
    assert completion == f"<think>\n{REASONING}\n</think>\n\n{ANSWER}<|im_end|>"
    enc = f.encode(RECORD)
    assert enc.input_ids == _ids(tok, prompt) + _ids(tok, completion)
    assert enc.input_ids[-1] == tok.eos_token_id and enc.input_ids.count(tok.eos_token_id) == 3  # 3 turn ends
    assert enc.labels[: enc.prompt_len] == [IGNORE_INDEX] * enc.prompt_len
    assert _loss_text(tok, enc) == completion
    # What we train on is what the template itself renders for the whole conversation (SmolLM's keeps
    # assistant content verbatim), up to its trailing newline.
    full = tok.apply_chat_template(
        [{"role": "user", "content": f"{INSTRUCTION}\n\n{QUESTION}"}, {"role": "assistant", "content": completion[: -len("<|im_end|>")]}],
        tokenize=False,
    )
    assert full == prompt + completion + "\n"


def test_chat_template_required(tok, embedded_dir):
    t = load_tokenizer(str(embedded_dir))
    t.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        PromptFormatter(t, PromptArgs(template="chat"))
    t.chat_template = "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"
    with pytest.raises(ValueError, match="drops assistant content"):
        PromptFormatter(t, PromptArgs(template="chat"))


# -- chat template: DeepSeek-R1 (strips the reasoning from assistant turns) -----------------------


def test_r1_template_naively_applied_drops_the_reasoning(r1_tok):
    """The trap: rendering the whole conversation through R1's template loses the chain of thought."""
    conversation = [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": f"<think>\n{REASONING}\n</think>\n\n{ANSWER}"},
    ]
    rendered = r1_tok.apply_chat_template(conversation, tokenize=False)
    assert rendered == f"{R1_BOS}<｜User｜>{QUESTION}<｜Assistant｜>\n\n{ANSWER}{R1_EOS}"
    assert "Flank pain" not in rendered
    ids = r1_tok.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"]
    assert "Flank pain" not in r1_tok.decode(ids)


def test_r1_template_in_medcot_keeps_the_reasoning(r1_tok):
    f = PromptFormatter(r1_tok, PromptArgs(template="chat", loss_on="response"))
    prompt = f.prompt(QUESTION)
    assert prompt == f"{R1_BOS}<｜User｜>{INSTRUCTION}\n\n{QUESTION}<｜Assistant｜><think>\n"
    completion = f.completion(prompt, REASONING, ANSWER)
    assert completion == f"{REASONING}\n</think>\n\n{ANSWER}{R1_EOS}"  # the prompt already opened <think>

    enc = f.encode(RECORD)
    assert enc.input_ids == _ids(r1_tok, prompt) + _ids(r1_tok, completion)
    assert r1_tok.decode(enc.input_ids) == prompt + completion
    # One BOS (the template's; the tokenizer adds none on top), one EOS at the very end.
    assert enc.input_ids[0] == r1_tok.bos_token_id and enc.input_ids.count(r1_tok.bos_token_id) == 1
    assert enc.input_ids[-1] == r1_tok.eos_token_id and enc.input_ids.count(r1_tok.eos_token_id) == 1
    # The reasoning is in the ids and carries loss; the prompt does not.
    reasoning_ids = _ids(r1_tok, REASONING)
    assert enc.input_ids[enc.prompt_len : enc.prompt_len + len(reasoning_ids)] == reasoning_ids
    assert enc.labels[enc.prompt_len : enc.prompt_len + len(reasoning_ids)] == reasoning_ids
    assert enc.labels[: enc.prompt_len] == [IGNORE_INDEX] * enc.prompt_len
    assert _loss_text(r1_tok, enc) == completion
    assert "Flank pain means the kidney is involved." in _loss_text(r1_tok, enc)
    # Inference starts from exactly the training prefix.
    assert f.encode_prompt(QUESTION) == enc.input_ids[: enc.prompt_len]


def test_r1_template_loss_on_all(r1_tok):
    enc = PromptFormatter(r1_tok, PromptArgs(template="chat", loss_on="all")).encode(RECORD)
    assert enc.labels == enc.input_ids
    assert REASONING in r1_tok.decode(enc.labels)


# -- over-long rows -------------------------------------------------------------------------------


def _records_of_lengths(tok) -> tuple[list[Record], list[int]]:
    f = PromptFormatter(tok, PromptArgs())
    records = [Record(question=QUESTION, reasoning=" ".join(["step"] * n), answer=ANSWER, row=i) for i, n in enumerate([5, 40, 80], 1)]
    return records, [len(f.encode(r).input_ids) for r in records]


@pytest.mark.parametrize("overlong", ["drop", "truncate"])
def test_overlong_rows_dropped_or_truncated_and_counted(tok, overlong):
    f = PromptFormatter(tok, PromptArgs())
    records, lengths = _records_of_lengths(tok)
    assert lengths[0] < lengths[1] < lengths[2]
    limit = lengths[1]  # the first two fit (the second exactly), the third does not
    kept, report = encode_records(f, records, limit, overlong)
    full = [f.encode(r) for r in records]
    assert (report.count, report.min, report.max, report.over_limit, report.max_seq_length) == (3, lengths[0], lengths[2], 1, limit)
    assert report.median == lengths[1]
    if overlong == "drop":
        assert report.action == "dropped"
        assert kept == full[:2]
    else:
        assert report.action == "truncated"
        assert kept[:2] == full[:2]
        assert kept[2].input_ids == full[2].input_ids[:limit] and kept[2].labels == full[2].labels[:limit]
        assert kept[2].prompt_len == full[2].prompt_len
    assert f"1 over max_seq_length={limit} ({report.action})" in report.summary()


def test_row_whose_prompt_fills_the_limit_is_dropped_even_when_truncating(tok):
    f = PromptFormatter(tok, PromptArgs())
    records, _ = _records_of_lengths(tok)
    prompt_len = f.encode(records[0]).prompt_len
    kept, report = encode_records(f, records, prompt_len, "truncate")  # nothing of any response would be left
    assert kept == [] and report.over_limit == 3
