"""Read inputs, run every filter, write approved/doubtful/rejected/quarantine and report.json."""
from __future__ import annotations

import glob
import json
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from itertools import islice
from typing import Iterable, Iterator

from distillery.io import Located, Problem, read_records
from distillery.record import dumps, ensure_id

from curate.config import CurateConfig, resolve_path
from curate.dedup import DedupIndex
from curate.filters import APPROVED, RANK, Context, Skip, build_filters


@dataclass
class Summary:
    counts: Counter = field(default_factory=Counter)           # verdict → n
    problems: list = field(default_factory=list)               # Problem objects
    by_filter: dict = field(default_factory=lambda: defaultdict(Counter))  # filter → {rejected, doubtful, skipped}
    config_hash: str = ""

    @property
    def valid(self) -> int:
        return sum(self.counts.values())


def expand(inputs: Iterable[str]) -> list[str]:
    """Globs expanded (sorted, for determinism); a name that matches nothing is kept so it is reported missing."""
    out = []
    for pat in inputs:
        hits = sorted(glob.glob(pat)) if any(c in pat for c in "*?[") else []
        out.extend(hits or [pat])
    return out


def build_index(ctx: Context) -> DedupIndex:
    c = ctx.config
    idx = DedupIndex(c.near_dup_ngram, c.minhash_perms, c.minhash_bands, min(c.near_dup_threshold, c.near_dup_doubtful))
    if c.dedup_examples:
        idx.add_many([(f"recipe-example-{i}", e) for i, e in enumerate(ctx.examples)])
    sources = ([c.dedup_reference] if c.dedup_reference else []) + list(c.dedup_releases)
    for src in map(str, map(resolve_path, sources)):
        if not os.path.exists(src):
            continue
        idx.add_many([(item.record.get("id") or f"{src}:{item.line}", item.record["output"])
                      for item in read_records(src) if isinstance(item, Located)])
    return idx


def curate_records(records: Iterable[dict], ctx: Context, summary: Summary, index: DedupIndex | None) -> Iterator[dict]:
    """Yield each record with its `curation` added; deterministic for a given input order and config."""
    filters = build_filters(ctx.config)
    chash = summary.config_hash = ctx.config.config_hash()
    dedup_on = "duplicates" in ctx.config.filters and index is not None
    it = iter(records)
    while True:
        batch = list(islice(it, 2048))  # batches let dedup hash all n-grams in one numpy pass
        if not batch:
            return
        yield from _curate_batch(batch, filters, chash, ctx, summary, index if dedup_on else None)


def _curate_batch(batch, filters, chash, ctx, summary, index):
    prepared = index.prepare([r["output"] for r in batch]) if index is not None else [None] * len(batch)
    for rec, prep in zip(batch, prepared):
        ensure_id(rec)
        info = ctx.resolve(rec)
        reasons, worst = [], APPROVED
        for f in filters:
            try:
                v = f.check(rec, info, ctx)
            except Skip:
                summary.by_filter[f.name]["skipped"] += 1
                continue
            if v is not None:
                reasons.append({"filter": f.name, "detail": v.detail, "score": round(float(v.score), 4)})
                summary.by_filter[f.name][v.verdict] += 1
                if RANK[v.verdict] > RANK[worst]:
                    worst = v.verdict
        if index is not None:
            # Only keep clean-ish texts in the index: a rejected first copy should not block a later good one.
            hit = index.check_add(rec["id"], rec["output"], add=worst != "rejected", prepared=prep)
            if hit and hit[0] != rec["id"]:
                kind = "exact" if hit[1] >= 1.0 else "near"
                v = "rejected" if hit[1] >= ctx.config.near_dup_threshold else "doubtful"
                reasons.append({"filter": "duplicates", "detail": f"{kind} duplicate of {hit[0]}"
                                + ("" if kind == "exact" else f" (similarity ≈ {hit[1]:.2f})"), "score": round(hit[1], 4)})
                summary.by_filter["duplicates"][v] += 1
                if RANK[v] > RANK[worst]:
                    worst = v
        rec["curation"] = {"verdict": worst, "reasons": reasons, "config_hash": chash}
        summary.counts[worst] += 1
        yield rec


def run(inputs: list[str], out_dir: str | Path, config: CurateConfig, ctx: Context | None = None) -> Summary:
    ctx = ctx or Context(config)
    summary = Summary()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index = build_index(ctx) if "duplicates" in config.filters else None

    def records():
        for path in expand(inputs):
            for item in read_records(path):
                if isinstance(item, Problem):
                    summary.problems.append(item)
                    continue
                yield item.record

    names = ("approved", "doubtful", "rejected")
    tmp = {n: out / f".{n}.jsonl.tmp" for n in names}
    files = {n: open(tmp[n], "w", encoding="utf-8", newline="\n") for n in names}
    try:
        for rec in curate_records(records(), ctx, summary, index):
            files[rec["curation"]["verdict"]].write(dumps(rec) + "\n")
    finally:
        for f in files.values():
            f.close()
    for n in names:  # atomic: a crash never leaves half a result behind
        os.replace(tmp[n], out / f"{n}.jsonl")
    with open(out / ".quarantine.tmp", "w", encoding="utf-8") as f:
        for p in summary.problems:
            f.write(dumps(p.to_quarantine()) + "\n")
    os.replace(out / ".quarantine.tmp", out / "quarantine.jsonl")
    report = {
        "inputs": expand(inputs), "config_hash": summary.config_hash,
        "counts": {n: summary.counts.get(n, 0) for n in names}, "valid": summary.valid,
        "bad_lines": len(summary.problems),
        "filters": {k: dict(sorted(v.items())) for k, v in sorted(summary.by_filter.items())},
    }
    with open(out / "report.json", "w", encoding="utf-8") as f:
        json.dump(report, f, ensure_ascii=False, indent=2, sort_keys=True)
        f.write("\n")
    return summary
