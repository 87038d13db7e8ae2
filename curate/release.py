"""Releases: immutable, versioned folders of approved records that trainers read unchanged; and `diff` between two.

    python -m curate release SRC [SRC ...] --name v3 [--root dataset/releases] [--eval-fraction 0.05] [--parent auto]
    python -m curate diff v2 v3 [--root dataset/releases] [--json]

A release folder holds
    train.json      the reference tutorial's format, exactly: a JSON array of {instruction, input, output}
    eval.json       the held-out split, same format
    records.jsonl   the full records (meta, curation, provenance) of both splits, each with "split"
    manifest.json   counts (total and per scene × style), sources, recipes, filter configs, review decisions,
                    content hash, parent release, eval rule

The eval split is a pure function of the id (sha256(id) mod 10 000 < fraction·10 000), so a sample stays on the same
side in every release of a growing corpus: a refresh never leaks an earlier eval sample into training.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from distillery.io import ReadError, read_all, write_json_atomic, write_jsonl_atomic
from distillery.record import canonical_hash, dumps, ensure_id, provenance, reference_format, review_decision

DEFAULT_ROOT = "dataset/releases"
EVAL_BUCKETS = 10_000
EVAL_METHOD = f"sha256(id) as a big-endian integer mod {EVAL_BUCKETS} < round(fraction * {EVAL_BUCKETS})"
EXIT_CODES = """exit codes:
  0  done
  2  usage error, missing or unreadable source / release, a bad line in a source, an existing release name,
     no approved record (one line on stderr, no traceback)"""
NONE_CELL = "(none)"  # scene / style of a record without meta


class ReleaseError(Exception):
    """A user-facing problem (bad source, existing release, bad name): one line, exit code 2."""


# ---------------------------------------------------------------- reading sources

@dataclass
class Sources:
    records: list[dict] = field(default_factory=list)        # approved records, first occurrence of each id
    infos: list[dict] = field(default_factory=list)          # one per SRC: path, file, sha256, counts
    duplicate_ids: list[str] = field(default_factory=list)   # later occurrences skipped
    rejected_by_review: int = 0                              # reviewers' rejections seen in the sources


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_all(path: Path) -> list[dict]:
    """Every record of a file, or ReleaseError naming the first bad line: a release is never cut from a partial read."""
    try:
        records = read_all(path)
    except ReadError as e:
        raise ReleaseError(str(e)) from None
    for r in records:
        ensure_id(r)
    return records


def _verdict(rec: dict) -> str | None:
    return (rec.get("curation") or {}).get("verdict")


def read_sources(srcs: list[str]) -> Sources:
    """A folder contributes its approved.jsonl (what `curate run` and `review pull` write); a file contributes the
    records whose curation.verdict is approved."""
    out = Sources()
    seen: set[str] = set()
    for src in srcs:
        p = Path(src)
        if p.is_dir():
            path = p / "approved.jsonl"
            if not path.exists():
                raise ReleaseError(f"{p}: no approved.jsonl (expected a `curate run --out` folder)")
            taken = _read_all(path)  # approved by construction (run and review pull write only those here)
            rejected_file = p / "rejected.jsonl"
            others = _read_all(rejected_file) if rejected_file.exists() else []
            curated_from = _curated_from(p)
        elif p.exists():
            path = p
            records = _read_all(path)
            uncurated = sum(1 for r in records if _verdict(r) is None)
            if uncurated:  # never drop them silently: they were simply not judged yet
                raise ReleaseError(f"{p}: {uncurated} of {len(records)} records have no curation verdict; "
                                   f"run `python -m curate run {p} --out DIR` and release DIR")
            taken = [r for r in records if _verdict(r) == "approved"]
            others = [r for r in records if _verdict(r) == "rejected"]
            curated_from = []
        else:
            raise ReleaseError(f"{p}: no such file or folder")
        out.rejected_by_review += sum(1 for r in others if review_decision(r) == "reject")
        kept = 0
        for r in taken:
            if r["id"] in seen:
                out.duplicate_ids.append(r["id"])
                continue
            seen.add(r["id"])
            out.records.append(r)
            kept += 1
        info = {"path": str(p), "file": str(path), "sha256": _sha256_file(path), "approved": len(taken),
                "taken": kept}
        if curated_from:
            info["curated_from"] = curated_from
        out.infos.append(info)
    return out


def _curated_from(folder: Path) -> list[str]:
    """The synth files a curated folder was made from, per its report.json (absent on older folders)."""
    try:
        return list(json.loads((folder / "report.json").read_text(encoding="utf-8")).get("inputs", []))
    except (OSError, ValueError, AttributeError):
        return []


# ---------------------------------------------------------------- split, hashes, manifest

def is_eval(record_id: str, fraction: float) -> bool:
    bucket = int.from_bytes(hashlib.sha256(record_id.encode("utf-8")).digest()[:8], "big") % EVAL_BUCKETS
    return bucket < round(fraction * EVAL_BUCKETS)


def content_hash(train: list[dict], eval_: list[dict]) -> str:
    """Hash of what a trainer sees, order-independent: the same samples in the same splits give the same hash."""
    def norm(rs):
        return sorted(dumps(reference_format(r)) for r in rs)
    return canonical_hash({"train": norm(train), "eval": norm(eval_)})


def _cell(rec: dict) -> tuple[str, str]:
    meta = rec.get("meta") or {}
    return meta.get("scene") or NONE_CELL, meta.get("style") or NONE_CELL


def cell_counts(records: list[dict]) -> dict[str, dict[str, dict[str, int]]]:
    """{scene: {style: {"train": n, "eval": m}}}, sorted for stable manifests."""
    c = Counter((*_cell(r), r["split"]) for r in records)
    out: dict = {}
    for (scene, style, split), n in sorted(c.items()):
        out.setdefault(scene, {}).setdefault(style, {"train": 0, "eval": 0})[split] = n
    return out


def _review_counts(records: list[dict], rejected_by_review: int) -> dict[str, int]:
    d = Counter(review_decision(r) for r in records)
    return {"human_approved": d["approve"], "edited": d["approve-with-edit"], "rejected_by_review": rejected_by_review}


def _seen(records: list[dict], *keys: str) -> list:
    """Distinct values of meta keys (a tuple per record), sorted; records without them are left out."""
    vals = set()
    for r in records:
        meta = r.get("meta") or {}
        v = tuple(meta.get(k) for k in keys)
        if any(x is not None for x in v):
            vals.add(v)
    return sorted(vals, key=lambda t: tuple(str(x) for x in t))


# ---------------------------------------------------------------- finding releases

def check_name(name: str) -> None:
    if not name or name in (".", "..") or name.startswith(".") or any(s in name for s in ("/", "\\", os.sep)):
        raise ReleaseError(f"invalid release name {name!r}: use a plain folder name such as v3 "
                           "(no path separators, not starting with a dot)")


def find_release(ref: str, root: str | Path) -> Path:
    """A release by name under root, or by path."""
    for cand in (Path(root) / ref, Path(ref)):
        if (cand / "manifest.json").is_file():
            return cand
    raise ReleaseError(f"no such release: {ref} (looked for {Path(root) / ref}/manifest.json and {ref}/manifest.json)")


def read_manifest(path: Path) -> dict:
    try:
        return json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ReleaseError(f"{path / 'manifest.json'}: unreadable manifest ({e})") from None


def newest_release(root: Path) -> Path | None:
    """The release under root with the latest created_at (ties: name), or None."""
    best = None
    if root.is_dir():
        for d in root.iterdir():
            if d.name.startswith(".") or not (d / "manifest.json").is_file():
                continue
            key = (str(read_manifest(d).get("created_at", "")), d.name)
            if best is None or key > best[0]:
                best = (key, d)
    return best[1] if best else None


def _parent(parent: str | None, root: Path) -> dict | None:
    if parent in (None, "", "none"):
        return None
    path = newest_release(root) if parent == "auto" else find_release(parent, root)
    if path is None:
        return None
    m = read_manifest(path)
    return {"name": m.get("name", path.name), "content_hash": m.get("content_hash")}


# ---------------------------------------------------------------- building

@dataclass
class Built:
    path: Path
    manifest: dict


def build_release(srcs: list[str], name: str, root: str | Path = DEFAULT_ROOT, eval_fraction: float = 0.05,
                  parent: str | None = "auto") -> Built:
    check_name(name)
    if not 0.0 <= eval_fraction < 1.0:
        raise ReleaseError(f"--eval-fraction must be in [0, 1), got {eval_fraction}")
    root = Path(root)
    final = root / name
    if final.exists():
        raise ReleaseError(f"{final}: release already exists; releases are immutable, choose a new --name")
    src = read_sources(srcs)
    if not src.records:
        raise ReleaseError(f"no approved records in {', '.join(srcs)}: nothing to release")
    par = _parent(parent, root)

    records = sorted(src.records, key=lambda r: r["id"])  # a stable order: small diffs between releases
    for r in records:
        r["split"] = "eval" if is_eval(r["id"], eval_fraction) else "train"
    train = [r for r in records if r["split"] == "train"]
    eval_ = [r for r in records if r["split"] == "eval"]
    manifest = {
        "name": name,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
        "format": "train.json / eval.json: JSON array of {instruction, input, output}",
        "counts": {"train": len(train), "eval": len(eval_), "total": len(records),
                   "duplicates_skipped": len(src.duplicate_ids)},
        "cells": cell_counts(records),
        "sources": src.infos,
        "duplicate_ids_skipped": src.duplicate_ids[:100],
        "runs": sorted({str(run) for run in (provenance(r).get("run") for r in records) if run}),
        "recipes": [{"name": n, **({"hash": h} if h else {})} for n, h in _seen(records, "recipe", "recipe_hash")],
        "curation_config_hashes": dict(sorted(Counter(
            (r.get("curation") or {}).get("config_hash") or "(none)" for r in records).items())),
        "review": _review_counts(records, src.rejected_by_review),
        "content_hash": content_hash(train, eval_),
        "parent": par,
        "eval_rule": {"fraction": eval_fraction, "method": EVAL_METHOD},
    }
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        # indent=4: the tutorial's huanhuan.json layout (write_json_atomic keeps the Chinese readable)
        write_json_atomic(tmp / "train.json", [reference_format(r) for r in train], indent=4)
        write_json_atomic(tmp / "eval.json", [reference_format(r) for r in eval_], indent=4)
        write_jsonl_atomic(tmp / "records.jsonl", records)
        write_json_atomic(tmp / "manifest.json", manifest)
        for f in tmp.iterdir():
            f.chmod(0o444)  # a release is read-only; exports/ is added beside the files, so the folder stays writable
        if final.exists():  # created by someone else meanwhile; rename would replace an empty folder silently
            raise ReleaseError(f"{final}: release already exists; releases are immutable, choose a new --name")
        os.rename(tmp, final)  # atomic: readers see the whole release or none
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Built(final, manifest)


# ---------------------------------------------------------------- loading and diff

def load_records(path: Path) -> list[dict]:
    """The full records of a release (records.jsonl), each with its split."""
    f = path / "records.jsonl"
    if not f.exists():
        raise ReleaseError(f"{path}: release has no records.jsonl")
    return _read_all(f)


@dataclass
class Diff:
    old: str
    new: str
    added: list[str]
    removed: list[str]
    changed: list[dict]          # {id, fields, old: {field: text}, new: {field: text}}
    cells: list[dict]            # {scene, style, old, new, delta}, only cells whose count changed
    totals: dict

    def to_json(self) -> dict:
        return {"old": self.old, "new": self.new, "added": self.added, "removed": self.removed,
                "changed": self.changed, "cells": self.cells, "totals": self.totals}


def diff_releases(old_ref: str, new_ref: str, root: str | Path = DEFAULT_ROOT) -> Diff:
    old_p, new_p = find_release(old_ref, root), find_release(new_ref, root)
    old = {r["id"]: r for r in load_records(old_p)}
    new = {r["id"]: r for r in load_records(new_p)}
    changed = []
    for i in sorted(old.keys() & new.keys()):
        fields = [k for k in ("instruction", "input", "output", "split") if old[i].get(k) != new[i].get(k)]
        if fields:
            changed.append({"id": i, "fields": fields, "old": {k: old[i].get(k) for k in fields},
                            "new": {k: new[i].get(k) for k in fields}})
    oc, nc = Counter(map(_cell, old.values())), Counter(map(_cell, new.values()))
    cells = [{"scene": s, "style": t, "old": oc[(s, t)], "new": nc[(s, t)], "delta": nc[(s, t)] - oc[(s, t)]}
             for s, t in sorted(oc.keys() | nc.keys()) if oc[(s, t)] != nc[(s, t)]]
    return Diff(old_p.name, new_p.name, sorted(new.keys() - old.keys()), sorted(old.keys() - new.keys()), changed,
                cells, {"old": len(old), "new": len(new)})


def print_diff(d: Diff, examples: int = 5) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
    con = Console()
    con.print(f"[bold]{d.old} → {d.new}[/]: {d.totals['old']} → {d.totals['new']} records; "
              f"[green]+{len(d.added)} added[/], [red]-{len(d.removed)} removed[/], "
              f"[yellow]{len(d.changed)} changed[/]")
    for c in d.changed[:examples]:
        for k in c["fields"]:
            con.print(f"  {escape(c['id'])} {k}: {escape(str(c['old'][k]))} [dim]→[/] {escape(str(c['new'][k]))}",
                      highlight=False, soft_wrap=True)
    if len(d.changed) > examples:
        con.print(f"  … and {len(d.changed) - examples} more changed (--json lists all)")
    if d.cells:
        t = Table(title="records per scene × style (changed cells)")
        for col, just in (("scene", "left"), ("style", "left"), (d.old, "right"), (d.new, "right"), ("Δ", "right")):
            t.add_column(col, justify=just)
        for c in d.cells:
            color = "green" if c["delta"] > 0 else "red"
            t.add_row(c["scene"], c["style"], str(c["old"]), str(c["new"]), f"[{color}]{c['delta']:+d}[/]")
        con.print(t)
    else:
        con.print("per scene × style counts: unchanged")


# ---------------------------------------------------------------- CLI

def add_parsers(sub) -> None:
    from argparse import RawDescriptionHelpFormatter
    kw = {"epilog": EXIT_CODES, "formatter_class": RawDescriptionHelpFormatter}
    r = sub.add_parser("release", **kw, help="approved records → an immutable release folder (train.json, eval.json, "
                                       "records.jsonl, manifest.json)")
    r.add_argument("srcs", nargs="+", metavar="SRC",
                   help="a curated folder (its approved.jsonl) or a .jsonl of curated records (verdict approved)")
    r.add_argument("--name", required=True, help="release name, e.g. v3; must not exist yet")
    r.add_argument("--root", default=DEFAULT_ROOT, help=f"releases folder (default {DEFAULT_ROOT})")
    r.add_argument("--eval-fraction", type=float, default=0.05, help="held-out share, by id hash (default 0.05)")
    r.add_argument("--parent", default="auto",
                   help="parent release name; auto = the newest under --root (default); none = no parent")
    d = sub.add_parser("diff", **kw,
                       help="added / removed / changed ids and per scene × style counts between releases")
    d.add_argument("old")
    d.add_argument("new")
    d.add_argument("--root", default=DEFAULT_ROOT)
    d.add_argument("--json", action="store_true", help="machine-readable output")


def cmd_release(a) -> int:
    built = build_release(a.srcs, a.name, a.root, a.eval_fraction, a.parent)
    m = built.manifest
    c = m["counts"]
    if c["duplicates_skipped"]:
        print(f"skipped {c['duplicates_skipped']} records whose id appeared in an earlier source "
              f"(first: {m['duplicate_ids_skipped'][0]})")
    rv = m["review"]
    parent = f"{m['parent']['name']} ({m['parent']['content_hash'][:12]})" if m["parent"] else "none"
    print(f"release {m['name']} → {built.path}: {c['train']} train + {c['eval']} eval = {c['total']} records; "
          f"review: {rv['human_approved']} approved, {rv['edited']} edited, {rv['rejected_by_review']} rejected; "
          f"content {m['content_hash'][:12]}; parent {parent}")
    return 0


def cmd_diff(a) -> int:
    d = diff_releases(a.old, a.new, a.root)
    if a.json:
        print(json.dumps(d.to_json(), ensure_ascii=False, indent=2))
    else:
        print_diff(d)
    return 0
