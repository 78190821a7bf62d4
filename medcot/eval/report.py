"""Eval report: `report.md`, `report.html` (chart inlined) and `accuracy.png` from summary + items.

Both documents are rendered from one list of blocks (heading, paragraph, list, table, image), so
the Markdown and the HTML always say the same thing. Every table of results is followed by the
protocol that produced it and the source that protocol follows: a number is only comparable with
numbers made the same way.
"""

from __future__ import annotations

import base64
import html
import io
from collections import Counter
from pathlib import Path

from medcot.disclaimer import DISCLAIMER
from medcot.io import write_atomic

COLORS = {"base": "#8c8c8c", "adapter": "#1f77b4", "train": "#1f77b4"}


# ---------------------------------------------------------------------------------------------
# Chart


def plot_accuracy(summary: dict) -> bytes:
    """Grouped bars per benchmark (one per model) with Wilson 95% error bars and the chance level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tags = list(summary["models"])
    names = list(summary["titles"])
    width = 0.8 / len(tags)
    fig, ax = plt.subplots(figsize=(1.9 * len(names) + 2, 4), dpi=130)
    for j, tag in enumerate(tags):
        scores = [summary["models"][tag]["benchmarks"][n] for n in names]
        xs = [i + (j - (len(tags) - 1) / 2) * width for i in range(len(names))]
        acc = [100 * s["accuracy"] for s in scores]
        err = [[max(0.0, 100 * (s["accuracy"] - s["ci_low"])) for s in scores],
               [max(0.0, 100 * (s["ci_high"] - s["accuracy"])) for s in scores]]
        ax.bar(xs, acc, width * 0.95, yerr=err, capsize=4, color=COLORS.get(tag, None), label=tag,
               error_kw={"elinewidth": 1, "ecolor": "#333333"})
        for x, a in zip(xs, acc):
            inside = a >= 8
            ax.text(x, 1 if inside else a + 1, f"{a:.0f}", ha="center", va="bottom", fontsize=8,
                    color="white" if inside else "#333333", fontweight="bold")
    for i, n in enumerate(names):
        first = summary["models"][tags[0]]["benchmarks"][n]
        ax.hlines(100 * first["chance"], i - 0.45, i + 0.45, colors="#d62728", linestyles="--", linewidth=1.2,
                  label="chance (uniform guess)" if i == 0 else None)
        ax.hlines(100 * first["majority"], i - 0.45, i + 0.45, colors="#ff7f0e", linestyles=":", linewidth=1.4,
                  label="always the most common answer" if i == 0 else None)
    ns = [summary["models"][tags[0]]["benchmarks"][n]["n"] for n in names]
    ax.set_xticks(range(len(names)), [f"{n}\n(n={k})" for n, k in zip(names, ns)], fontsize=9)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Accuracy per benchmark (protocol {summary['settings'].get('protocol', 'medcot')}), 95% Wilson "
                 "intervals" + (": before vs after" if len(tags) > 1 else ""), fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Blocks → Markdown / HTML


def _md(blocks: list[tuple]) -> str:
    out = []
    for b in blocks:
        kind = b[0]
        if kind == "h1":
            out += [f"# {b[1]}", ""]
        elif kind == "h2":
            out += [f"## {b[1]}", ""]
        elif kind == "p":
            out += [b[1], ""]
        elif kind == "ul":
            out += [f"- {x}" for x in b[1]] + [""]
        elif kind == "table":
            header, rows = b[1], b[2]
            out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            out += ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in r) + " |" for r in rows]
            out.append("")
        elif kind == "img":
            out += [f"![{b[2]}]({b[1]})", ""]
        elif kind == "details":
            out += [f"<details><summary>{html.escape(b[1])}</summary>", "", "```text", b[2].replace("```", "'''"),
                    "```", "", "</details>", ""]
    return "\n".join(out)


def _html(blocks: list[tuple], png: bytes | None) -> str:
    e = html.escape
    body = []
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2", "p"):
            body.append(f"<{kind}>{e(b[1])}</{kind}>")
        elif kind == "ul":
            body.append("<ul>" + "".join(f"<li>{e(x)}</li>" for x in b[1]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{e(h)}</th>" for h in b[1])
            rows = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in b[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img" and png is not None:
            data = base64.b64encode(png).decode()
            body.append(f'<img alt="{e(b[2])}" src="data:image/png;base64,{data}">')
        elif kind == "details":
            body.append(f"<details><summary>{e(b[1])}</summary><pre>{e(b[2])}</pre></details>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
             "th{background:#f3f3f3}img{max-width:100%}pre{white-space:pre-wrap;background:#f7f7f7;padding:8px}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>medcot eval</title><style>{style}</style>"
            f"</head><body>{''.join(body)}</body></html>")


# ---------------------------------------------------------------------------------------------
# The report


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _acc(s: dict) -> str:
    return f"{_pct(s['accuracy'])} [{100 * s['ci_low']:.1f}–{100 * s['ci_high']:.1f}] ({s['correct']}/{s['n']})"


def _protocol_note(st: dict) -> tuple:
    return ("p", f"Protocol: {st.get('protocol', 'medcot')}; follows {st.get('protocol_source', 'medcot')}.")


def _how_asked(st: dict) -> str:
    """One line: how the items were put to the model and how its answers were read."""
    protocol = st.get("protocol", "medcot")
    if protocol == "loglik":
        return ("Prompt: lm-evaluation-harness's zero-shot prompt of each benchmark; the answer is the option label "
                "with the highest log-likelihood; nothing is generated")
    decoding = "greedy" if st["temperature"] == 0 else f"sampling (temperature {st['temperature']}, top_p {st['top_p']})"
    if protocol == "huatuo":
        return (f"Prompt: HuatuoGPT-o1's user prompt in the model's chat template; decoding {decoding}, up to "
                f"{st['max_new_tokens']} tokens; answers read by HuatuoGPT-o1's scorer (never unparseable)")
    budget = (f"reasoning up to {st['thinking_budget']} tokens, then '</think>' is forced and the answer gets "
              f"{st['answer_tokens']} tokens" if st["thinking_budget"] else
              f"one pass of {st.get('max_new_tokens')} tokens (no thinking budget)")
    return (f"Prompt: the training prompt ({st['prompt_template']} template) with the question, lettered options and "
            f"an instruction to finish with the answer; decoding {decoding}; {budget}")


def _blocks(summary: dict, records: dict, chart: str | None) -> list[tuple]:
    st = summary["settings"]
    tags = list(summary["models"])
    names = list(summary["titles"])
    samples = st.get("samples", 1)
    blocks: list[tuple] = [("h1", "medcot eval"), ("p", DISCLAIMER)]
    blocks.append(("ul", [f"{tag}: {summary['models'][tag]['label']}" for tag in tags] + [
        f"Protocol: {st.get('protocol_title', 'medcot')} (follows {st.get('protocol_source', 'medcot')})",
        f"Items: source {st['source']}, " + ", ".join(
            f"{n} {summary['models'][tags[0]]['benchmarks'][n]['n']}" for n in names)
        + (f" (limit {st['limit']} per benchmark, spread evenly over each file)" if st["limit"] else ""),
        _how_asked(st) + (f"; {samples} sampled answers per item, scored by majority vote" if samples > 1 else ""),
        f"Wall time {summary.get('wall_s', 0):.0f} s",
    ]))

    # -- Accuracy
    blocks.append(("h2", "Accuracy"))
    what = f"majority vote of {samples}" if samples > 1 else "accuracy"
    header = ["benchmark", "chance", "most common answer"] + [f"{t} {what} [95% CI] (correct/n)" for t in tags]
    if summary["comparison"]:
        header += ["Δ after − before", "only before ✓ / only after ✓", "McNemar p"]
    rows = []
    for n in names:
        first = summary["models"][tags[0]]["benchmarks"][n]
        row = [summary["titles"][n], _pct(first["chance"]), _pct(first["majority"])]
        row += [_acc(summary["models"][t]["benchmarks"][n]) for t in tags]
        c = summary["comparison"].get(n)
        if c:
            row += [f"{100 * c['delta']:+.1f} pts", f"{c['only_before_correct']} / {c['only_after_correct']}",
                    f"{c['mcnemar_p']:.3f}"]
        rows.append(row)
    blocks.append(("table", header, rows))
    blocks.append(_protocol_note(st))
    blocks.append(("p", "Chance is uniform guessing over each item's answer choices (25% for 4 options, 33.3% for "
                        "yes/no/maybe); 'most common answer' is what always giving the most frequent gold label of "
                        "these items scores (PubMedQA is mostly 'yes', so a model that always says yes beats chance). "
                        "Unparseable answers count as wrong. Intervals are Wilson 95% score intervals; the before/after "
                        "test is an exact McNemar test on the paired items."))
    if chart:
        blocks.append(("img", chart, "accuracy per benchmark with 95% intervals"))
    if samples > 1:
        blocks += _samples_blocks(summary, tags, names)
    if st.get("protocol") == "huatuo":
        blocks += _huatuo_blocks(summary, tags, names)
    blocks += _extraction_blocks(summary, records, tags, names)

    # -- CoT loss
    cot = summary.get("cot_loss") or {}
    if any(cot.values()):
        blocks.append(("h2", "Held-out chain-of-thought loss"))
        rows = [[t, f"{c['loss']:.4f}", f"{c['perplexity']:.2f}", str(c["rows"]), c["source"]]
                for t, c in cot.items() if c]
        blocks.append(("table", ["model", "loss per response token", "perplexity", "validation rows", "data"], rows))
        blocks.append(("p", "The training run's validation rows (its data.val_size held-out rows), with the training "
                            "prompt; the loss covers the reasoning, the answer and EOS, as medcot train reports it."))

    # -- Overlap
    ov = summary.get("overlap")
    blocks.append(("h2", "Contamination check"))
    if ov:
        blocks += _overlap_blocks(ov)
        if summary.get("excluded_overlapping"):
            blocks.append(("p", "Excluded from scoring (eval.exclude_overlap=true): " + ", ".join(
                f"{n} {k}" for n, k in summary["excluded_overlapping"].items())))
    else:
        blocks.append(("p", "Skipped: the training data could not be loaded"
                            + (f" ({summary['overlap_skipped']})." if summary.get("overlap_skipped") else " (see the log).")))

    # -- Examples
    blocks.append(("h2", "Examples"))
    for n in names:
        recs = {t: records[t][n] for t in tags}
        pick = 0
        if len(tags) > 1:  # show an item where the two models disagree, if there is one
            diff = [i for i, (a, b) in enumerate(zip(recs[tags[0]], recs[tags[1]])) if a["correct"] != b["correct"]]
            pick = diff[0] if diff else 0
        for t in tags:
            if pick < len(recs[t]):
                r = recs[t][pick]
                shown = r["output"] or "log-likelihood of each label: " + ", ".join(
                    f"{k} {v:.3f}" for k, v in r.get("loglik", {}).items())
                blocks.append(("details", f"{n} {r['id']} — {t}: extracted {r['extracted']} ({r['method']}), "
                                          f"gold {r['answer']}, {'correct' if r['correct'] else 'wrong'}",
                               f"{r['prompt']}{shown}" if r["output"] else f"{r['prompt']}\n\n{shown}"))
    blocks.append(("h2", "Files"))
    blocks.append(("ul", ["items.jsonl: one line per model and item (prompt, output, extracted label, method, correct)",
                          "summary.json: every number in this report", "accuracy.png: the chart",
                          "settings.json: what produced items.jsonl (a rerun must match it to resume)"]))
    return blocks


def _samples_blocks(summary: dict, tags: list[str], names: list[str]) -> list[tuple]:
    rows = []
    for t in tags:
        for n in names:
            s = summary["models"][t]["benchmarks"][n]
            c = s.get("samples")
            if c:
                rows.append([n, t, str(c["k"]), _acc(s),
                             f"{_pct(c['pass_at_k'])} [{100 * c['pass_ci_low']:.1f}–{100 * c['pass_ci_high']:.1f}]",
                             f"{_pct(c['mean_at_k'])} [{100 * c['mean_ci_low']:.1f}–{100 * c['mean_ci_high']:.1f}]"])
    return [
        ("h2", "Self-consistency"),
        ("table", ["benchmark", "model", "samples k", "majority vote [95% CI]", "pass@k [95% CI]",
                   "mean accuracy of one sample [95% CI]"], rows),
        _protocol_note(summary["settings"]),
        ("p", "Majority vote: the answer given most often among an item's k samples (ties to the one given first). "
              "pass@k: an item counts when any sample is right, an upper bound that needs someone to pick the right "
              "sample. Mean accuracy of one sample: what a single sampled answer scores on average; its interval is "
              "a bootstrap over items, since an item's samples are not independent."),
    ]


def _huatuo_blocks(summary: dict, tags: list[str], names: list[str]) -> list[tuple]:
    rows = []
    for t in tags:
        for n in names:
            s = summary["models"][t]["benchmarks"][n]
            rows.append([n, t, _pct(s["first_match_accuracy"]), _pct(s["last_match_accuracy"]), s["match_side"],
                         _pct(s["published_accuracy"])])
    return [
        ("h2", "HuatuoGPT-o1's scorer"),
        ("table", ["benchmark", "model", "first match", "last match", "side taken", "score as HuatuoGPT-o1 reports it"],
         rows),
        _protocol_note(summary["settings"]),
        ("p", "HuatuoGPT-o1's scorer reads the first and the last answer it finds in the whole output and reports, per "
              "benchmark, the better of the two accuracies; where it finds neither a letter nor an option's text it "
              "takes the option most similar to the output. The last column is that number over every sampled answer."),
    ]


def _extraction_blocks(summary: dict, records: dict, tags: list[str], names: list[str]) -> list[tuple]:
    st = summary["settings"]
    generative = st.get("protocol") != "loglik"
    rows = []
    for t in tags:
        for n in names:
            s = summary["models"][t]["benchmarks"][n]
            recs = records[t][n]
            methods = Counter(r["method"] for r in recs).most_common(3)
            top = f"{s['top_prediction']} ({_pct(s['top_prediction_share'])})" if s["top_prediction"] else "-"
            row = [n, t, f"{s['unparseable']} ({_pct(s['unparseable_rate'])})", top]
            if generative:
                row += [_pct(s["closed_rate"]), f"{sum(r['forced'] for r in recs)}", f"{s['mean_output_tokens']:.0f}"]
            rows.append(row + [", ".join(f"{m} {k}" for m, k in methods)])
    header = ["benchmark", "model", "unparseable", "most given answer"]
    if generative:
        header += ["closed </think> itself", "forced </think>", "mean output tokens"]
    blocks = [("h2", "Answers and extraction"), ("table", header + ["methods (top 3)"], rows), _protocol_note(st)]
    if st.get("protocol", "medcot") == "medcot":
        blocks.append(("p", "The answer is read from the text after </think>; where the model never wrote </think>, "
                            "only an explicitly stated answer in the whole output counts (method whole_output:explicit). "
                            "items.jsonl holds every prompt, output, extracted label and method."))
    return blocks


def _overlap_blocks(ov: dict) -> list[tuple]:
    rows = [[n, str(r["n_items"]), str(r["n_overlapping"]), str(r["n_any"]), _pct(r["max_score"]),
             ", ".join(f"{f['id']} ({_pct(f['score'])}, training file row {f['train_row']})" for f in r["flagged"][:5])]
            for n, r in ov["benchmarks"].items()]
    return [
        ("p", f"Word {ov['ngram']}-grams of each benchmark question stem against the {ov['training_questions']} "
              f"training questions of {ov['training_source']}. An item overlaps when at least "
              f"{_pct(ov['threshold'])} of its n-grams occur there (stems shorter than {ov['ngram']} words: the whole "
              f"stem inside a training question). Paraphrased questions are not detected."),
        ("table", ["benchmark", "items", "overlapping", "sharing any n-gram", "max overlap", "overlapping items (first 5)"],
         rows),
    ]


def write_report(out: Path, summary: dict, records: dict) -> None:
    """Write accuracy.png, report.md and report.html into `out`."""
    png = plot_accuracy(summary)
    write_atomic(out / "accuracy.png", png)
    blocks = _blocks(summary, records, "accuracy.png")
    write_atomic(out / "report.md", _md(blocks))
    write_atomic(out / "report.html", _html(blocks, png))


def write_overlap_report(path: Path, ov: dict) -> None:
    write_atomic(path, _md([("h1", "medcot contamination check"), *_overlap_blocks(ov)]))


def summary_lines(summary: dict) -> list[str]:
    """The end-of-command block: `Final: n/N (acc%)` per benchmark and model, side by side."""
    tags = list(summary.get("models", {}))
    st = summary.get("settings", {})
    lines = [f"protocol      {st['protocol']} (follows {st['protocol_source']})"] if tags else []
    for n in summary.get("titles", {}):
        cells = []
        for t in tags:
            s = summary["models"][t]["benchmarks"][n]
            cells.append(f"{t} {s['correct']}/{s['n']} ({100 * s['accuracy']:.1f}%, CI {100 * s['ci_low']:.0f}-"
                         f"{100 * s['ci_high']:.0f}, unparseable {100 * s['unparseable_rate']:.0f}%)")
            c = s.get("samples")
            if c:
                cells[-1] += f", pass@{c['k']} {100 * c['pass_at_k']:.1f}%, mean@{c['k']} {100 * c['mean_at_k']:.1f}%"
        c = summary["comparison"].get(n)
        delta = f"  Δ {100 * c['delta']:+.1f} pts (McNemar p {c['mcnemar_p']:.2f})" if c else ""
        first = summary["models"][tags[0]]["benchmarks"][n]
        lines.append(f"{n:<13} chance {100 * first['chance']:4.1f}% (most common {100 * first['majority']:.0f}%)  "
                     + "  ->  ".join(cells) + delta)
    cot = {t: c for t, c in (summary.get("cot_loss") or {}).items() if c}
    if cot:
        lines.append("held-out CoT loss  " + "  ->  ".join(
            f"{t} {c['loss']:.4f} (perplexity {c['perplexity']:.2f})" for t, c in cot.items()))
    ov = summary.get("overlap")
    if ov:
        lines.append("overlap       " + ", ".join(
            f"{n} {r['n_overlapping']}/{r['n_items']}" for n, r in ov["benchmarks"].items())
            + f" items share >= {100 * ov['threshold']:.0f}% of {ov['ngram']}-grams with the training questions")
    return lines
