"""Releases: immutable, versioned folders of approved records that trainers read unchanged; and `diff` between two.

    python -m curate release SRC [SRC ...] --name v3 [--root dataset/releases] [--eval-fraction 0.05] [--parent auto]
    python -m curate diff v2 v3 [--root dataset/releases] [--json]

A release folder holds
    train.json      the reference tutorial's format, exactly: a JSON array of {instruction, input, output}
    eval.json       the held-out split, same format
    records.jsonl   the full records (meta, curation, provenance) of both splits, each with "split"
    manifest.json   counts (total and per scene × style), sources, recipes, filter configs, review decisions,
                    content hash, parent release, eval rule

Built in two passes, so that memory holds no full record (~1.2 GB → ~140 MB at 200k, docs/benchmarks.md): the first
reads the sources and keeps per taken record its id, where its line is and its reference-format text for
content_hash, plus the manifest's counts (a JSON-array source, read whole anyway, is kept as text); the second reads
the records back in id order and streams the files.

The eval split is a pure function of the id (sha256(id) mod 10 000 < fraction·10 000), so a sample stays on the same
side in every release of a growing corpus: a refresh never leaks an earlier eval sample into training.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from array import array
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import orjson

from distillery.io import Block, Located, ReadError, parse_block, read_all, read_blocks, write_json_atomic
from distillery.record import dumps, ensure_id, provenance, reference_format, review_decision

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


# ---------------------------------------------------------------- reading sources (pass 1)

@dataclass
class Tally:
    """The manifest's aggregates over the taken records, added one record at a time: no record is kept."""

    eval_fraction: float
    cells: Counter = field(default_factory=Counter)          # (scene, style, split) → n
    runs: set = field(default_factory=set)
    recipes: set = field(default_factory=set)                # (recipe, recipe_hash) tuples
    config_hashes: Counter = field(default_factory=Counter)
    decisions: Counter = field(default_factory=Counter)      # review_decision → n
    # per split, UTF-8 dumps of the reference format, for content_hash (bytes: smaller than str once there is an emoji)
    texts: dict = field(default_factory=lambda: {"train": [], "eval": []})

    def add(self, rec: dict) -> None:
        split = "eval" if is_eval(rec["id"], self.eval_fraction) else "train"
        self.cells[(*_cell(rec), split)] += 1
        run = provenance(rec).get("run")
        if run:
            self.runs.add(str(run))
        meta = rec.get("meta") or {}
        recipe = (meta.get("recipe"), meta.get("recipe_hash"))
        if any(x is not None for x in recipe):
            self.recipes.add(recipe)
        self.config_hashes[(rec.get("curation") or {}).get("config_hash") or "(none)"] += 1
        self.decisions[review_decision(rec)] += 1
        self.texts[split].append(dumps(reference_format(rec)).encode("utf-8"))


@dataclass
class Sources:
    """Pass 1's result: where each taken record is (approved, first occurrence of its id), not the record itself."""

    tally: Tally
    infos: list[dict] = field(default_factory=list)          # one per SRC: path, file, sha256, counts
    files: list[tuple[str, int, int]] = field(default_factory=list)  # per SRC: file read, its size and mtime_ns
    ids: list[str] = field(default_factory=list)             # per taken record, in read order
    source: array = field(default_factory=lambda: array("I"))  # its SRC's index in files
    offset: array = field(default_factory=lambda: array("q"))  # its line's byte offset; -1: its text is in held
    size: array = field(default_factory=lambda: array("q"))    # its line's length in bytes, or its index in held
    held: list[str] = field(default_factory=list)            # dumps of records from JSON arrays: no line to seek to
    duplicates: int = 0                                      # later occurrences of an id, skipped
    duplicate_ids: list[str] = field(default_factory=list)   # the first 100 of them
    rejected_by_review: int = 0                              # reviewers' rejections seen in the sources


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _scan(path: Path) -> Iterator[tuple[dict, int, int]]:
    """Every record of a file with its line's (offset, size) ((-1, -1) in a JSON array), then ReleaseError naming the
    first bad line as read_all words it: a release is never cut from a partial read."""
    p, first, bad = str(path), None, 0
    for x in read_blocks(p):
        if isinstance(x, Block):
            items = ((x.offset + at, len(raw), item) for at, raw, item in parse_block(x.data, p, x.line))
        else:
            items = ((-1, -1, x),)
        for offset, size, item in items:
            if isinstance(item, Located):
                ensure_id(item.record)
                yield item.record, offset, size
            elif not (item.line == 0 and item.message == "empty file"):
                first, bad = first or item, bad + 1
    if first:
        more = f" (and {bad - 1} more bad lines)" if bad > 1 else ""
        raise ReleaseError(f"{first}{more}")


def _verdict(rec: dict) -> str | None:
    return (rec.get("curation") or {}).get("verdict")


def read_sources(srcs: list[str], eval_fraction: float) -> Sources:
    """A folder contributes its approved.jsonl (what `curate run` and `review pull` write); a file contributes the
    records whose curation.verdict is approved."""
    out = Sources(Tally(eval_fraction))
    seen: set[str] = set()
    for k, src in enumerate(srcs):
        p = Path(src)
        if p.is_dir():
            path = p / "approved.jsonl"
            if not path.exists():
                raise ReleaseError(f"{p}: no approved.jsonl (expected a `curate run --out` folder)")
            rejected_file = p / "rejected.jsonl"
            curated_from = _curated_from(p)
        elif p.exists():
            path, rejected_file, curated_from = p, None, []
        else:
            raise ReleaseError(f"{p}: no such file or folder")
        st = path.stat()
        out.files.append((str(path), st.st_size, st.st_mtime_ns))
        approved = kept = uncurated = total = 0
        for r, offset, size in _scan(path):
            total += 1
            verdict = "approved" if rejected_file else _verdict(r)  # a folder's approved.jsonl: by construction
            if verdict == "rejected":
                out.rejected_by_review += int(review_decision(r) == "reject")
            uncurated += verdict is None
            if verdict != "approved":
                continue
            approved += 1
            if r["id"] in seen:
                out.duplicates += 1
                if len(out.duplicate_ids) < 100:
                    out.duplicate_ids.append(r["id"])
                continue
            seen.add(r["id"])
            out.tally.add(r)
            out.ids.append(r["id"])
            out.source.append(k)
            if offset < 0:
                size = len(out.held)
                out.held.append(dumps(r))
            out.offset.append(offset)
            out.size.append(size)
            kept += 1
        if uncurated:  # never drop them silently: they were simply not judged yet
            raise ReleaseError(f"{p}: {uncurated} of {total} records have no curation verdict; "
                               f"run `python -m curate run {p} --out DIR` and release DIR")
        if rejected_file and rejected_file.exists():
            out.rejected_by_review += sum(review_decision(r) == "reject" for r, _, _ in _scan(rejected_file))
        info = {"path": str(p), "file": str(path), "sha256": _sha256_file(path), "approved": approved, "taken": kept}
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
        return [dumps(reference_format(r)).encode("utf-8") for r in rs]
    return _texts_hash(norm(train), norm(eval_))


def _texts_hash(train: list[bytes], eval_: list[bytes]) -> str:
    """canonical_hash({"train": sorted texts, "eval": sorted texts}) without building that document whole; sorts the
    lists in place. UTF-8 bytes sort as their strings do (code point order)."""
    h = hashlib.sha256()
    enc = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode  # canonical_hash's form
    for i, (key, texts) in enumerate((("eval", eval_), ("train", train))):  # sort_keys: eval first
        texts.sort()
        h.update(f'{"{" if i == 0 else ","}{enc(key)}:['.encode("utf-8"))
        step = 4096  # strings decoded at a time
        for j in range(0, len(texts), step):
            chunk = enc([t.decode("utf-8") for t in texts[j:j + step]])[1:-1]
            h.update((("," if j else "") + chunk).encode("utf-8"))
        h.update(b"]")
    h.update(b"}")
    return h.hexdigest()


def _cell(rec: dict) -> tuple[str, str]:
    meta = rec.get("meta") or {}
    return meta.get("scene") or NONE_CELL, meta.get("style") or NONE_CELL


def _cells(tally: Tally) -> dict[str, dict[str, dict[str, int]]]:
    """{scene: {style: {"train": n, "eval": m}}}, sorted for stable manifests."""
    out: dict = {}
    for (scene, style, split), n in sorted(tally.cells.items()):
        out.setdefault(scene, {}).setdefault(style, {"train": 0, "eval": 0})[split] = n
    return out


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


# ---------------------------------------------------------------- building (pass 2)

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
    src = read_sources(srcs, eval_fraction)
    if not src.ids:
        raise ReleaseError(f"no approved records in {', '.join(srcs)}: nothing to release")
    par = _parent(parent, root)

    t = src.tally
    n_train, n_eval = len(t.texts["train"]), len(t.texts["eval"])
    manifest = {
        "name": name,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
        "format": "train.json / eval.json: JSON array of {instruction, input, output}",
        "counts": {"train": n_train, "eval": n_eval, "total": len(src.ids), "duplicates_skipped": src.duplicates},
        "cells": _cells(t),
        "sources": src.infos,
        "duplicate_ids_skipped": src.duplicate_ids,
        "runs": sorted(t.runs),
        "recipes": [{"name": n, **({"hash": h} if h else {})}
                    for n, h in sorted(t.recipes, key=lambda v: tuple(str(x) for x in v))],
        "curation_config_hashes": dict(sorted(t.config_hashes.items())),
        "review": {"human_approved": t.decisions["approve"], "edited": t.decisions["approve-with-edit"],
                   "rejected_by_review": src.rejected_by_review},
        "content_hash": _texts_hash(t.texts["train"], t.texts["eval"]),
        "parent": par,
        "eval_rule": {"fraction": eval_fraction, "method": EVAL_METHOD},
    }
    t.texts.clear()  # the largest thing pass 1 kept: not needed to write the files
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_files(src, tmp)
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


def _records_by_id(src: Sources) -> Iterator[dict]:
    """The taken records, read back one at a time in id order (a stable order: small diffs between releases)."""
    fds: dict[int, int] = {}
    try:
        for i in sorted(range(len(src.ids)), key=src.ids.__getitem__):
            offset, size = src.offset[i], src.size[i]
            if offset < 0:
                rec = json.loads(src.held[size])  # json, as read_blocks parsed the array: integers of any size
            else:
                k = src.source[i]
                path, st_size, mtime_ns = src.files[k]
                if k not in fds:
                    fds[k] = os.open(path, os.O_RDONLY)
                    st = os.fstat(fds[k])
                    if (st.st_size, st.st_mtime_ns) != (st_size, mtime_ns):
                        raise ReleaseError(f"{path}: changed while the release was built; run it again")
                raw = os.pread(fds[k], size, offset)
                if offset == 0 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]  # the BOM parse_line dropped from line 1
                rec = orjson.loads(raw)  # as parse_line read it: the same bytes give the same record
                ensure_id(rec)
            if rec["id"] != src.ids[i]:
                raise ReleaseError(f"{src.files[src.source[i]][0]}: changed while the release was built; run it again")
            yield rec
    finally:
        for fd in fds.values():
            os.close(fd)


_ENC = json.JSONEncoder(ensure_ascii=False).encode  # a str → its JSON string, as json.dumps(ensure_ascii=False)


def _element(rec: dict) -> str:
    """One reference-format record as json.dumps(list, ensure_ascii=False, indent=4) writes an element of the list."""
    return (f'{{\n        "instruction": {_ENC(rec["instruction"])},\n        "input": {_ENC(rec["input"])},'
            f'\n        "output": {_ENC(rec["output"])}\n    }}')


def _write_files(src: Sources, folder: Path) -> None:
    """train.json, eval.json (indent=4: the tutorial's huanhuan.json layout, Chinese kept readable) and records.jsonl,
    streamed: json.dumps(list, ensure_ascii=False, indent=4) + "\n" byte for byte, without holding the list."""
    names = {"train": "train.json", "eval": "eval.json", "records": "records.jsonl"}
    files = {k: open(folder / v, "w", encoding="utf-8") for k, v in names.items()}
    try:
        first = {"train": True, "eval": True}
        for rec in _records_by_id(src):
            split = rec["split"] = "eval" if is_eval(rec["id"], src.tally.eval_fraction) else "train"
            files[split].write(("[\n    " if first[split] else ",\n    ") + _element(rec))
            first[split] = False
            files["records"].write(dumps(rec) + "\n")
        for split in ("train", "eval"):
            files[split].write("[]\n" if first[split] else "\n]\n")
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
    finally:
        for f in files.values():
            f.close()


# ---------------------------------------------------------------- loading and diff

def load_records(path: Path) -> list[dict]:
    """The full records of a release (records.jsonl), each with its split."""
    f = path / "records.jsonl"
    if not f.exists():
        raise ReleaseError(f"{path}: release has no records.jsonl")
    try:
        records = read_all(f)
    except ReadError as e:
        raise ReleaseError(str(e)) from None
    for r in records:
        ensure_id(r)
    return records


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
