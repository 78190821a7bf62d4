"""Data: training rows (question, reasoning, answer) and raw text, from local files, the hub or the
shipped sample → validated records → prompts and token ids with a loss mask → batches.

    sources.py  where rows come from: one local-vs-hub rule, readers for .jsonl/.json/.csv/.parquet
    rows.py     chain-of-thought rows: validate (file/row/field errors), map columns, split
    corpus.py   raw text for continued pre-training: documents → fixed blocks
    prompts.py  the prompt template: text → ids + loss mask
    collate.py  row order per step; padded or packed micro-batches
"""
