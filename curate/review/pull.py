"""pull / status: annotations → DIR/{approved,rejected,doubtful}.jsonl.

Rule for several annotations on one task: cancelled (skipped) ones are ignored; each reviewer's latest annotation
counts; if the reviewers' latest decisions differ (or two edits give different texts) the task is a *conflict* and
the record stays doubtful (listed by `status`); otherwise the latest one wins.

An edit is re-checked by the curator (curate.pipeline.curate_records with the default CurateConfig); if it
comes out *rejected* (hard rule broken: length cap, forbidden phrase, ...) the record stays doubtful with a
`review` reason. Doubtful-level signals do not block it: a human has just read the text.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from distillery.io import Located, read_records, write_jsonl_atomic
from distillery.record import ensure_id

from curate.review import ReviewError
from curate.review.client import tasks_with_annotations
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


def _reviewer(a: dict) -> str:
    name = (a.get("created_username") or "").strip()
    return name.split(",")[0].strip() if name else f"user {a.get('completed_by')}"


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


def _recheck(rec: dict) -> str | None:
    """None if the edited record passes; else a reason."""
    try:
        from curate.config import CurateConfig
        from curate.filters import Context
        from curate.pipeline import Summary, curate_records
        cfg = CurateConfig()
        if not Path(cfg.recipe).exists():   # default is relative to the repo root; make it cwd-independent
            cfg.recipe = str(Path(__file__).resolve().parents[2] / cfg.recipe)
        r = dict(rec)
        r.pop("curation", None)
        out = next(curate_records([r], Context(cfg), Summary(), None))
        cur = out["curation"]
        if cur["verdict"] == "rejected":
            return "; ".join(f"{x['filter']}: {x['detail']}" for x in cur["reasons"]) or "rejected"
        return None
    except (ImportError, OSError):   # no usable curator here: fall back to the hard rules
        from distillery.text import char_count
        meta = rec.get("meta") or {}
        mc = meta.get("max_chars")
        if mc and char_count(rec["output"]) >= mc:
            return f"length: {char_count(rec['output'])} 字 >= max_chars {mc}"
        return None


def _annotations(task) -> list[dict]:
    return [a if isinstance(a, dict) else a.model_dump(mode="json") for a in (task.annotations or [])]


def _read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for item in read_records(path):
        if isinstance(item, Located):
            ensure_id(item.record)
            out.append(item.record)
        elif item.line == 0 and item.message == "empty file":
            continue
        else:
            raise ReviewError(str(item))   # never rewrite a file we could not fully read
    return out


def pull(ls, project, into: Path) -> Outcome:
    into = Path(into)
    doubtful = _read(into / "doubtful.jsonl")
    approved, rejected = _read(into / "approved.jsonl"), _read(into / "rejected.jsonl")
    done = {r["id"] for r in approved} | {r["id"] for r in rejected}
    by_sid = {}
    for t in tasks_with_annotations(ls, project.id):
        by_sid[(t.data or {}).get("sample_id")] = _annotations(t)
    res = Outcome()
    keep = []
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
            why = _recheck(rec) if text else "empty edited text"
            if why:
                cur = rec.setdefault("curation", {"verdict": "doubtful", "reasons": []})
                cur["verdict"] = "doubtful"
                cur.setdefault("reasons", []).append({"filter": "review", "detail": f"edited text failed re-check: {why}", "score": 1.0})
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
    return res


@dataclass
class Status:
    tasks: int = 0
    reviewed: int = 0
    pending: int = 0
    conflicts: list = field(default_factory=list)
    per_reviewer: Counter = field(default_factory=Counter)
    decisions: dict = field(default_factory=lambda: defaultdict(Counter))


def status(ls, project) -> Status:
    st = Status()
    for t in tasks_with_annotations(ls, project.id):
        anns = _annotations(t)
        st.tasks += 1
        for a in anns:
            if not a.get("was_cancelled"):
                st.per_reviewer[_reviewer(a)] += 1
                d = parse_result(a.get("result"))["decision"]
                st.decisions[_reviewer(a)][d] += 1
        state, win = decide(anns)
        if state == "pending":
            st.pending += 1
        elif state == "conflict":
            st.conflicts.append(((t.data or {}).get("sample_id"), sorted(f"{_reviewer(a)}={p['decision']}" for a, p in win)))
        else:
            st.reviewed += 1
    return st
