"""medcot's own protocol: the model is asked the way it was trained, and read strictly.

The question goes into the training prompt (`prompt.template`); decoding is `generate.*` (greedy unless
generate.temperature > 0) with the thinking budget (`eval.thinking_budget` + `eval.answer_tokens`), and
the answer is read after `</think>` by `medcot.eval.extract` (stated answers first; unparseable is an
outcome). This is the protocol for "did the fine-tune help": base and adapter get the same prompt.
"""

from __future__ import annotations

from medcot.eval.protocols.base import GenerativeProtocol


class MedcotProtocol(GenerativeProtocol):
    name = "medcot"
    title = "medcot: training prompt, thinking budget, strict answer extraction"
    source = "medcot (docs/eval.md); not a published protocol: compare medcot runs with each other"

    def settings(self, cfg):
        e, g = cfg.eval, cfg.generate
        s = {"prompt_template": cfg.prompt.template, "thinking_budget": e.thinking_budget,
             "answer_tokens": e.answer_tokens, "temperature": g.temperature, "top_p": g.top_p, "seed": g.seed}
        if e.thinking_budget is None:
            s["max_new_tokens"] = g.max_new_tokens
        return s

    def prompt(self, tokenizer, formatter, task, item):
        question = task.render(item)
        return formatter.prompt(question), formatter.encode_prompt(question)

    def decoding(self, cfg):
        return cfg.generate, cfg.eval.thinking_budget, cfg.eval.answer_tokens

    def judge(self, task, item, text):
        ex = task.extract(text, item)
        return {"extracted": ex.label, "method": ex.method, "correct": task.score(item, ex)}
