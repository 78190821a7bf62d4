"""A chat conversation becomes the training prompt, so a served model sees what it was fine-tuned on.

- `prompt.template=seed` (or a template file): the template has one `{question}`. A single user message
  (the common case) is the question verbatim, exactly as in training. Earlier turns and system messages
  are written into the question text above the last user message.
- `prompt.template=chat`: the tokenizer's chat template renders the whole conversation, with the
  training instruction in front of the first user message (as `PromptFormatter.prompt` does).

Assistant turns sent back by the client keep only their answer: reasoning from earlier turns is dropped,
as DeepSeek recommends for R1 models, and it keeps long conversations short.
"""

from __future__ import annotations

from dataclasses import dataclass

from medcot.data.prompts import INSTRUCTION, PromptFormatter
from medcot.generate.reasoning import THINK_CLOSE, THINK_OPEN, split_reasoning
from medcot.serve.protocol import ChatMessageParam, RequestError


@dataclass(frozen=True)
class ChatPrompt:
    ids: list[int]
    opens_reasoning: bool  # the prompt ends in <think>: the completion starts inside the reasoning


def _answer_only(text: str) -> str:
    return split_reasoning(text).answer if THINK_CLOSE in text else text


def conversation_to_question(messages: list[tuple[str, str]]) -> str:
    """Fold a conversation into the single question of an instruction template.

    Args:
        messages: (role, text) pairs; the last one is the user's new question.
    """
    *history, (_, question) = messages
    system = [text for role, text in history if role in ("system", "developer") and text.strip()]
    turns = [(role, text) for role, text in history if role in ("user", "assistant")]
    parts = []
    if system:
        parts.append("\n".join(system))
    if turns:
        lines = [f"{'User' if role == 'user' else 'Assistant'}: {_answer_only(text).strip()}" for role, text in turns]
        parts.append("Earlier in this conversation:\n" + "\n".join(lines))
        parts.append(f"Follow-up question:\n{question}")
    else:
        parts.append(question)
    return "\n\n".join(parts)


def build_prompt(formatter: PromptFormatter, messages: list[ChatMessageParam]) -> ChatPrompt:
    """Token ids of the prompt for a conversation, rendered with the config's prompt template.

    Raises:
        RequestError: a non-text message part, or a conversation the chat template rejects.
    """
    pairs = [(m.role, m.text(i)) for i, m in enumerate(messages)]
    for i, (_, text) in enumerate(pairs):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # JSON allows lone surrogates ("\ud800"); no tokenizer does
            raise RequestError(f"messages[{i}].content is not valid Unicode text (a lone surrogate)",
                               param=f"messages.{i}.content") from None
    tokenizer = formatter.tokenizer
    if formatter.args.template != "chat":
        text = formatter.prompt(conversation_to_question(pairs))
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]  # as PromptFormatter.encode_prompt
    else:
        chat, instructed = [], False
        for role, content in pairs:
            if role == "user" and not instructed:
                content, instructed = f"{INSTRUCTION}\n\n{content}", True
            elif role == "assistant":
                content = _answer_only(content)
            chat.append({"role": "system" if role == "developer" else role, "content": content})
        try:
            text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # jinja2's TemplateError, e.g. "Conversation roles must alternate"
            raise RequestError(f"the model's chat template rejected the conversation: {e}", param="messages") from e
        # The chat template writes its own BOS.
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ChatPrompt(ids=ids, opens_reasoning=text.rstrip(" \n").endswith(THINK_OPEN))
