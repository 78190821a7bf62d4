"""Write medcot/assets/pubmed_abstracts.jsonl, the embedded corpus for continued pre-training.

    python scripts/make_pubmed_sample.py   # reads ../shared/data beside the repository

The abstracts are PubMedQA PQA-L contexts (pubmedqa/pubmedqa `data/ori_pqal.json`, MIT), taken in
upstream order. Items of the official test split are left out, and so is every PMID in medcot's
shipped PubMedQA eval sample: pre-training must never read the text of an item we evaluate on.
"""

from __future__ import annotations

import json
from pathlib import Path

from medcot.data.sources import iter_jsonl

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO.parent / "shared" / "data" / "eval" / "normalized" / "pubmedqa_pqal.shared.jsonl"
EVAL_SAMPLE = REPO / "medcot" / "assets" / "eval" / "pubmedqa_pqal.sample.jsonl"
OUT = REPO / "medcot" / "assets" / "pubmed_abstracts.jsonl"
LIMIT = 200  # ~280 KB: enough text to see pre-training move perplexity, small enough to ship


def _rows(path: Path) -> list[dict]:
    rows = []
    for _, row in iter_jsonl(path):
        if isinstance(row, Exception):
            raise row
        rows.append(row)
    return rows


def main(out: Path = OUT) -> int:
    evaluated = {row["id"] for row in _rows(EVAL_SAMPLE)}
    rows = _rows(SOURCE)
    splits = {row["official_split"] for row in rows}
    if splits != {"test", "trainval"}:
        raise ValueError(f"{SOURCE}: expected official_split values test/trainval, got {sorted(splits)}")
    kept = [row for row in rows if row["official_split"] != "test" and row["id"] not in evaluated][:LIMIT]
    with out.open("w", encoding="utf-8") as f:
        for row in kept:
            pmid = row["id"].removeprefix("pubmedqa_")
            f.write(json.dumps({"id": f"pubmed_{pmid}", "text": row["context"]}, ensure_ascii=False) + "\n")
    print(f"Wrote {len(kept)} abstracts ({out.stat().st_size:,} bytes) to {out}")
    return len(kept)


if __name__ == "__main__":
    main()
