"""pull / status: annotations → DIR/{approved,rejected,doubtful}.jsonl.

Rule for several annotations on one task: cancelled (skipped) ones are ignored; each reviewer's latest annotation
counts; if the reviewers' latest decisions differ (or two edits give different texts) the task is a *conflict* and
the record stays doubtful (listed by `status`); otherwise the latest one wins.

An edit is re-checked by the curator (curate.pipeline.curate_records) with the config the folder was curated with
(`config` in DIR/report.json; CurateConfig defaults for folders whose report lacks it, and the summary says so); if
it comes out *rejected* (hard rule broken: length cap, forbidden phrase, ...) the record stays doubtful with a
`review` reason. Doubtful-level signals do not block it: a human has just read the text.

An edit that changed the text gets the re-check's `curation` (reasons and config_hash about the edited text; the
verdict as above: approved, or doubtful if it failed), and the curator's earlier one moves to
`meta.provenance.original_curation`, beside `original_output`, the text it was about. Both keep the first values
when a text is edited again.

Then DIR/report.json and report.html are recounted from the three files, with a `review` block.
"""
from __future__ import annotations

import dataclasses
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from distillery.io import ReadError, read_all, write_json_atomic, write_jsonl_atomic
from distillery.record import ensure_id, provenance, review_decision

from curate.review import ReviewError
from curate.review.client import annotated_tasks
from curate.review.labeling import parse_result


@dataclass
class Outcome:
    approved: int = 0
    edited: int = 0
    rejected: int = 0
    edit_failed: int = 0
    conflicts: list = field(default_factory=list)
    pending: int = 0
    unchanged: int = 0
    config_source: str = ""   # where the re-check's config came from, for the summary line


def _reviewer(a: dict) -> str:
    return a.get("reviewer") or f"user {a.get('completed_by')}"


def decide(annotations: list[dict]):
    """('pending'|'conflict'|'decided', winning annotation dict + parsed) per the rule in the module doc."""
    latest: dict = {}
    for a in sorted((a for a in annotations if not a.get("was_cancelled")), key=lambda a: (str(a.get("updated_at")), a["id"])):
        parsed = parse_result(a.get("result"))
        if parsed["decision"]:
            latest[a.get("completed_by")] = (a, parsed)
    if not latest:
        return "pending", None
    keys = {(p["decision"], p["text"] if p["decision"] == "approve-with-edit" else None) for _, p in latest.values()}
    if len(keys) > 1:
        return "conflict", list(latest.values())
    return "decided", max(latest.values(), key=lambda ap: (str(ap[0].get("updated_at")), ap[0]["id"]))


def _old_report(into: Path) -> tuple[dict, str]:
    """DIR/report.json as `curate run` wrote it ({} if absent or unreadable), and why it is {} ("" if it is not)."""
    path = into / "report.json"
    if not path.exists():
        return {}, "no report.json"
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}, "report.json unreadable"
    return (report, "") if isinstance(report, dict) else ({}, "report.json unreadable")


def folder_config(report: dict, why_none: str = "") -> tuple:
    """(CurateConfig, where it came from): the config recorded in the folder's report.json, else the defaults."""
    from curate.config import CurateConfig
    recorded = report.get("config")
    if not isinstance(recorded, dict):
        return CurateConfig(), f"CurateConfig defaults ({why_none or 'report.json records no config'})"
    known = {f.name for f in dataclasses.fields(CurateConfig)}
    # keys a later version dropped are ignored; ones it added take their defaults
    return CurateConfig(**{k: v for k, v in recorded.items() if k in known}), "the folder's config (report.json)"


def _context(cfg):
    from curate.filters import Context
    try:
        return Context(cfg)
    except OSError as e:
        raise ReviewError(f"cannot read the recipe {cfg.recipe!r} named by the folder's config: {e.strerror}") from None


def _recheck(recs: list[dict], ctx) -> list[dict]:
    """Per edited record: the curator's `curation` of its text (ctx: curate.filters.Context of the folder's config).
    One curator pass for all of them."""
    if not recs:
        return []
    from curate.pipeline import Summary, curate_records
    fresh = []
    for rec in recs:
        r = dict(rec)
        r.pop("curation", None)
        fresh.append(r)
    cur = {}   # keyed by object: the curator yields the records it was given, not necessarily in order
    for r in curate_records(fresh, ctx, Summary(), None):
        cur[id(r)] = r["curation"]
    return [cur[id(r)] for r in fresh]


def _why_rejected(cur: dict) -> str | None:
    """None if a re-check's curation lets the edit through (not rejected), else why not."""
    if cur["verdict"] != "rejected":
        return None
    return "; ".join(f"{x['filter']}: {x['detail']}" for x in cur["reasons"]) or "rejected"


def _read(path: Path) -> list[dict]:
    try:
        records = read_all(path, missing_ok=True)
    except ReadError as e:
        raise ReviewError(str(e)) from None   # never rewrite a file we could not fully read
    for rec in records:
        ensure_id(rec)
    return records


def pull(ls, project, into: Path) -> Outcome:
    into = Path(into)
    doubtful = _read(into / "doubtful.jsonl")
    approved, rejected = _read(into / "approved.jsonl"), _read(into / "rejected.jsonl")
    done = {r["id"] for r in approved} | {r["id"] for r in rejected}
    by_sid = {(t.get("data") or {}).get("sample_id"): t.get("annotations") or []
              for t in annotated_tasks(ls, project.id)}
    res = Outcome()
    keep, edits = [], []   # edits: (record, has text), re-checked after the loop
    for rec in doubtful:
        if rec["id"] in done:   # moved by an earlier pull whose doubtful rewrite did not happen: drop the copy
            continue
        state, win = decide(by_sid.get(rec["id"], []))
        if state == "pending":
            res.pending += 1
            keep.append(rec)
            continue
        if state == "conflict":
            res.conflicts.append((rec["id"], sorted(f"{_reviewer(a)}={p['decision']}" for a, p in win)))
            keep.append(rec)
            continue
        a, p = win
        prov = rec.setdefault("meta", {}).setdefault("provenance", {})
        old = prov.get("review") or {}
        if old.get("annotation_id") == a["id"] and old.get("time") == (a.get("updated_at") or a.get("created_at")):   # already applied (edit that failed re-check)
            res.unchanged += 1
            keep.append(rec)
            continue
        review = {"reviewer": _reviewer(a), "time": a.get("updated_at") or a.get("created_at"),
                  "decision": p["decision"], "annotation_id": a["id"]}
        if p["decision"] == "reject":
            review["reason"] = ", ".join(p["reject_reasons"]) or "unspecified"
            prov["review"] = review
            rec["curation"] = {**(rec.get("curation") or {}), "verdict": "rejected"}
            rejected.append(rec)
            res.rejected += 1
        elif p["decision"] == "approve":
            prov["review"] = review
            rec["curation"] = {**(rec.get("curation") or {}), "verdict": "approved"}
            approved.append(rec)
            res.approved += 1
        else:   # approve-with-edit
            text = (p["text"] or "").strip()
            prov["review"] = review
            if text and text != rec["output"]:
                prov.setdefault("original_output", rec["output"])
                rec["output"] = text
            edits.append((rec, bool(text)))
    # edits are re-checked together: the curator's set-up (recipe, regexes) costs more than judging one record
    old_report, why_none = _old_report(into)
    cfg, res.config_source = folder_config(old_report, why_none)
    ctx = _context(cfg)
    checked = iter(_recheck([rec for rec, has_text in edits if has_text], ctx))
    for rec, has_text in edits:
        fresh = next(checked) if has_text else None
        why = _why_rejected(fresh) if fresh is not None else "empty edited text"
        prov = provenance(rec)
        if fresh is not None and "original_output" in prov:   # the old curation was about another text
            if "curation" in rec:
                prov.setdefault("original_curation", rec["curation"])
            rec["curation"] = fresh
        if why:
            cur = rec.setdefault("curation", {"verdict": "doubtful", "reasons": []})
            cur["verdict"] = "doubtful"
            cur.setdefault("reasons", []).append({"filter": "review", "detail": f"edited text failed re-check: {why}",
                                                  "score": 1.0})
            keep.append(rec)
            res.edit_failed += 1
        else:
            rec["curation"] = {**(rec.get("curation") or {}), "verdict": "approved"}
            approved.append(rec)
            res.edited += 1
    # approved/rejected first: a crash in between leaves a record in two files, which the next pull repairs,
    # never in none.
    write_jsonl_atomic(into / "approved.jsonl", approved)
    write_jsonl_atomic(into / "rejected.jsonl", rejected)
    write_jsonl_atomic(into / "doubtful.jsonl", keep)
    write_review_marker(into, approved + rejected + keep)
    _refresh_report(into, old_report, res, ctx, {"approved": approved, "doubtful": keep, "rejected": rejected})
    return res


def review_counts(approved: list[dict], rejected: list[dict], doubtful: list[dict]) -> dict:
    """Reviewers' decisions the folder holds, this pull's and earlier ones' (from each record's provenance)."""
    n = Counter(map(review_decision, approved))
    return {"approved": n["approve"], "edited": n["approve-with-edit"],
            "rejected": sum(1 for r in rejected if review_decision(r) == "reject"),
            "edit_failed": sum(1 for r in doubtful if review_decision(r) == "approve-with-edit")}


def _refresh_report(into: Path, old: dict, res: Outcome, ctx, by_verdict: dict[str, list[dict]]) -> None:
    """report.json/html recounted from the records just written to the verdict files (atomically, like them)."""
    from curate.report import rebuild_report, write_report
    review = {**review_counts(by_verdict["approved"], by_verdict["rejected"], by_verdict["doubtful"]),
              "pending": res.pending, "conflicts": len(res.conflicts),
              "pulled_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "config": res.config_source}
    write_report(into, rebuild_report(by_verdict, old, {"review": review}, ctx))


def write_review_marker(into: Path, records: list[dict]) -> None:
    """DIR/review.json: how many records carry reviewers' decisions, so `curate run --out DIR` can refuse to
    overwrite them without reading the files (curate.pipeline.reviewed_decisions). Atomic, like the files."""
    from curate.pipeline import REVIEW_MARKER   # lazy, like _recheck: the pipeline's imports are heavy
    n = sum(1 for r in records if provenance(r).get("review"))
    if not n:
        return
    write_json_atomic(into / REVIEW_MARKER, {"reviewed": n, "by": "curate review pull"}, indent=None)


@dataclass
class Status:
    tasks: int = 0
    reviewed: int = 0
    pending: int = 0
    conflicts: list = field(default_factory=list)
    per_reviewer: Counter = field(default_factory=Counter)
    decisions: dict = field(default_factory=lambda: defaultdict(Counter))


def status(ls, project) -> Status:
    st = Status(tasks=ls.projects.get(id=project.id).task_number or 0)
    for t in annotated_tasks(ls, project.id):   # tasks without annotations are pending
        anns = t.get("annotations") or []
        for a in anns:
            if not a.get("was_cancelled"):
                st.per_reviewer[_reviewer(a)] += 1
                d = parse_result(a.get("result"))["decision"]
                st.decisions[_reviewer(a)][d] += 1
        state, win = decide(anns)
        if state == "conflict":
            st.conflicts.append(((t.get("data") or {}).get("sample_id"),
                                 sorted(f"{_reviewer(a)}={p['decision']}" for a, p in win)))
        elif state == "decided":
            st.reviewed += 1
    st.pending = st.tasks - st.reviewed - len(st.conflicts)
    return st
