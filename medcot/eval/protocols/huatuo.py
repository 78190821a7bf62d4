"""HuatuoGPT-o1's evaluation as published, so a medcot run lines up with its table.

Followed: FreedomIntelligence/HuatuoGPT-o1 @ 2c8d7fcaadaad44000eb1765cbe36a09968a0164 (evaluation/
last changed in dc6e08a2), `evaluation/eval.py` (blob bd1c96d4) and `evaluation/scorer.py` (blob
987c9f33), run as its README says (no --strict_prompt):
- prompt: "Please answer the following multiple-choice question:\\n{question}\\n{option_str}" with the
  options as "A. text" lines, as the single user message of the model's chat template with the
  generation prompt; PubMedQA as in its eval_data.json (the abstract, a bridging sentence, the question;
  yes / no / maybe as options A / B / C; `PubMedQA.huatuo_item`);
- sampling: temperature 0.5, top_p 0.9, up to 2000 new tokens (`eval.huatuo_max_new_tokens`), no
  thinking budget;
- scoring: `huatuo_scorer.match_choice` on the whole output, and per benchmark the better of the
  first-match and the last-match accuracy.
Differences, both small: eval.py drops items whose output is empty (here they stay, scored by the same
scorer), and the prompt is tokenized once here (no second BOS from a server's tokenizer).
"""

from __future__ import annotations

from dataclasses import replace

from medcot.errors import ConfigError
from medcot.eval.protocols.base import GenerativeProtocol, verdict_of
from medcot.eval.protocols.huatuo_scorer import (
    MATCH_TYPES,
    better_side,
    match_choice,
    postprocess_output,
)

QUERY = "Please answer the following multiple-choice question:\n{question}\n{option_str}"
TEMPERATURE, TOP_P = 0.5, 0.9  # evaluation/eval.py, call_model


class HuatuoProtocol(GenerativeProtocol):
    name = "huatuo"
    title = "huatuo: HuatuoGPT-o1's evaluation (chat template, its prompt, temperature 0.5, top_p 0.9, its scorer)"
    source = ("FreedomIntelligence/HuatuoGPT-o1 @ 2c8d7fc, evaluation/eval.py and evaluation/scorer.py "
              "(better of first- and last-match accuracy)")
    judged_keys = ("first", "last", "match_type")  # `finalize` picks the side per benchmark

    def settings(self, cfg):
        return {"temperature": TEMPERATURE, "top_p": TOP_P, "max_new_tokens": cfg.eval.huatuo_max_new_tokens,
                "seed": cfg.generate.seed}

    def prompt(self, tokenizer, formatter, task, item):
        question, options, _ = task.huatuo_item(item)
        option_str = "\n".join(f"{k}. {v}" for k, v in options.items())
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("eval.protocol=huatuo puts HuatuoGPT-o1's prompt into the model's chat template, and "
                              "this tokenizer has none; use eval.protocol=medcot or loglik for this model")
        messages = [{"role": "user", "content": QUERY.format(question=question, option_str=option_str)}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text, tokenizer(text, add_special_tokens=False)["input_ids"]

    def decoding(self, cfg):
        gen = replace(cfg.generate, temperature=TEMPERATURE, top_p=TOP_P, max_new_tokens=cfg.eval.huatuo_max_new_tokens)
        return gen, None, 0

    def judge(self, task, item, text):
        _, options, gold = task.huatuo_item(item)
        (first, last), kind = match_choice(postprocess_output(text), options)
        # PubMedQA is asked as A/B/C; its records keep yes/no/maybe like every other protocol's
        label = (lambda letter: options.get(letter, letter)) if item.options is None else (lambda letter: letter)
        first, last = label(first), label(last)
        return {"first": first, "last": last, "match_type": MATCH_TYPES[kind], "extracted": last,
                "method": f"huatuo:last:{MATCH_TYPES[kind]}", "correct": last == item.answer}

    def finalize(self, task, records):
        pairs = [(s, r["answer"]) for r in records for s in (r.get("samples") or [r])]
        hits = {side: sum(s[side] == gold for s, gold in pairs) for side in ("first", "last")}
        side = better_side(hits["first"], hits["last"])
        for s, gold in pairs:
            s.update(extracted=s[side], method=f"huatuo:{side}:{s['match_type']}", correct=s[side] == gold)
        for r in records:
            if r.get("samples"):
                r.update(verdict_of(r["samples"], r["answer"]))
        n = max(len(pairs), 1)
        # over every sampled answer: with eval.samples=k this is the mean of k runs, as HuatuoGPT-o1 scores
        # its GPQA subset (each question listed 5 times)
        return {"first_match_accuracy": hits["first"] / n, "last_match_accuracy": hits["last"] / n,
                "match_side": side, "published_accuracy": hits[side] / n}
