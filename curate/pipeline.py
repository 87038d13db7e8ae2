"""Read inputs, run every filter, write approved/doubtful/rejected/quarantine and report.json."""
from __future__ import annotations

import glob
import json
import mmap
import multiprocessing
import os
import signal
import sys
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from distillery.io import Block, Located, Problem, parse_block, read_blocks, read_records, write_jsonl_atomic
from distillery.record import dumps, ensure_id

from curate.config import CurateConfig, resolve_path
from curate.dedup import DedupIndex, MinHasher, Prepared
from curate.filters import APPROVED, DOUBTFUL, RANK, REJECTED, Context, Skip, build_filters
from curate.report import ReportStats, build_report, write_report


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
    reject = c.near_dup_threshold
    others = min(c.near_dup_doubtful_others, reject)
    idx = DedupIndex(c.near_dup_ngram, c.minhash_perms, c.minhash_bands, reject=reject,
                     short_chars=c.near_dup_short_chars)
    if c.dedup_examples:
        idx.start_source(min(c.near_dup_doubtful, reject))  # strict: near-copies of the few-shot examples
        idx.add_many([(f"recipe-example-{i}", e) for i, e in enumerate(ctx.examples)])
    idx.start_source(others, short_bar=reject)  # reference corpus and earlier releases
    sources = ([c.dedup_reference] if c.dedup_reference else []) + list(c.dedup_releases)
    for src in map(str, map(resolve_path, sources)):
        if not os.path.exists(src):
            continue
        idx.add_many([(item.record.get("id") or f"{src}:{item.line}", item.record["output"])
                      for item in read_records(src) if isinstance(item, Located)])
    idx.start_source(others)  # the input itself: a short one-word variant of an earlier output is still doubtful
    return idx


@dataclass
class Judged:
    """A batch of records after the per-record filters, before dedup (what a worker sends back)."""

    ids: list = field(default_factory=list)
    worst: list = field(default_factory=list)          # verdict of the filters
    reasons: dict = field(default_factory=dict)        # position → [{filter, detail, score}], flagged records only
    by_filter: dict = field(default_factory=lambda: defaultdict(Counter))
    prepared: Optional[Prepared] = None                # dedup hashes of the outputs
    # From judge_lines only: where each record's JSON line up to its closing brace lies in the chunk's block (so the
    # output line is those input bytes plus the curation, and no copy of them crosses a pipe), the reasons as JSON,
    # the few fields the report needs (columns, and no per-record dict: what crosses a process boundary is
    # pickled), bad lines.
    head_start: list = field(default_factory=list)     # −1: the record is re-encoded, see `encoded`
    head_end: list = field(default_factory=list)
    head_extra: dict = field(default_factory=dict)     # position → bytes after the span (an id ensure_id added)
    encoded: dict = field(default_factory=dict)        # position → the record re-encoded up to its closing brace
    reasons_json: dict = field(default_factory=dict)
    outputs: list = field(default_factory=list)
    scenes: list = field(default_factory=list)
    styles: list = field(default_factory=list)
    caps: list = field(default_factory=list)
    chars: list = field(default_factory=list)          # 字数 of each output
    problems: list = field(default_factory=list)


class Judge:
    """The per-record half of curation: every filter, and the dedup hashes; runs in any process."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.filters = build_filters(ctx.config)
        c = ctx.config
        self.hasher = (MinHasher(c.near_dup_ngram, c.minhash_perms, c.minhash_bands)
                       if "duplicates" in c.filters else None)

    def judge(self, recs: list[dict], out: Judged) -> list[dict]:
        """Filter verdicts of recs, appended to out; returns each record's resolved meta."""
        ctx, by_filter = self.ctx, out.by_filter
        infos = []
        for rec in recs:
            ensure_id(rec)
            info = ctx.resolve(rec)
            reasons, worst = [], APPROVED
            for f in self.filters:
                try:
                    v = f.check(rec, info, ctx)
                except Skip:
                    by_filter[f.name]["skipped"] += 1
                    continue
                if v is not None:
                    reasons.append({"filter": f.name, "detail": v.detail, "score": round(float(v.score), 4)})
                    by_filter[f.name][v.verdict] += 1
                    if RANK[v.verdict] > RANK[worst]:
                        worst = v.verdict
            if reasons:
                out.reasons[len(out.ids)] = reasons
            out.ids.append(rec["id"])
            out.worst.append(worst)
            infos.append(info)
        if self.hasher is not None:
            out.prepared = self.hasher.prepare([r["output"] for r in recs])
        return infos

    def judge_lines(self, path: str, entries: list) -> Judged:
        """A chunk of one input file: one read_blocks Block (its bytes, or where to read them), or already-read
        items (a JSON array's records, problems)."""
        out = Judged()
        recs, spans = [], []
        for e in entries:
            parsed = parse_block(e.bytes_of(path), path, e.line) if isinstance(e, Block) else ((0, None, e),)
            for at, raw, item in parsed:
                if isinstance(item, Problem):
                    out.problems.append(item)
                    continue
                rec = item.record
                had_id = bool(rec.get("id"))  # judge() adds a missing one
                recs.append(rec)
                span = _head_span(raw) if raw is not None and "curation" not in rec else None
                spans.append(span and (at + span[0], at + span[1], had_id))
        infos = self.judge(recs, out)
        intern = _intern
        for i, (rec, info, span) in enumerate(zip(recs, infos, spans)):
            if span is None:  # re-encoded, without a curation from an earlier run (the new one follows)
                out.encoded[i] = dumps({k: v for k, v in rec.items() if k != "curation"})[:-1].encode("utf-8")
                out.head_start.append(-1)
                out.head_end.append(-1)
            else:
                out.head_start.append(span[0])
                out.head_end.append(span[1])
                if not span[2]:  # ensure_id appended the id, as dumps(rec) would
                    out.head_extra[i] = b',"id":' + dumps(rec["id"]).encode("utf-8")
            out.outputs.append(rec["output"])
            out.scenes.append(intern(info["scene"]))  # one pickled copy of each name, not one a record
            out.styles.append(intern(info["style"]))
            out.caps.append(info["max_chars"])
            out.chars.append(info["chars"])
        out.reasons_json = {i: dumps(r).encode("utf-8") for i, r in out.reasons.items()}
        return out


def _intern(x):
    return sys.intern(x) if type(x) is str else x


_WS = b" \t\n\r\x0b\x0c"  # what bytes.strip() strips


def _head_span(raw: bytes) -> Optional[tuple[int, int]]:
    """Where in a raw input line the record's JSON lies up to its closing brace (without whitespace and BOM), so
    the output need not re-encode the record (the curation object is appended after it); None if not an object."""
    a, b = 0, len(raw)
    while a < b and raw[a] in _WS:
        a += 1
    if raw.startswith(b"\xef\xbb\xbf", a):
        a += 3
        while a < b and raw[a] in _WS:
            a += 1
    while b > a and raw[b - 1] in _WS:
        b -= 1
    if b - a < 2 or raw[a] != 0x7B or raw[b - 1] != 0x7D:  # { … }
        return None
    return a, b - 1


def settle(j: Judged, ctx: Context, summary: Summary, index: Optional[DedupIndex]) -> Iterator[tuple]:
    """Dedup a judged batch in input order and count verdicts: yields (position, verdict, reasons, changed), where
    changed says the reasons grew (a duplicate) since the filters judged."""
    hits = None
    if index is not None and j.prepared is not None:
        # Only keep clean-ish texts in the index: a rejected first copy should not block a later good one.
        hits = index.check_batch(j.ids, j.prepared, np.fromiter((w != REJECTED for w in j.worst), bool, len(j.ids)))
    thr = ctx.config.near_dup_threshold
    for i, worst in enumerate(j.worst):
        reasons, changed = j.reasons.get(i) or [], False
        hit = hits[i] if hits is not None else None
        if hit and hit[0] != j.ids[i]:
            kind = "exact" if hit[1] >= 1.0 else "near"
            v = REJECTED if hit[1] >= thr else DOUBTFUL
            reasons.append({"filter": "duplicates", "detail": f"{kind} duplicate of {hit[0]}"
                            + ("" if kind == "exact" else f" (similarity ≈ {hit[1]:.2f})"), "score": round(hit[1], 4)})
            summary.by_filter["duplicates"][v] += 1
            changed = True
            if RANK[v] > RANK[worst]:
                worst = v
        summary.counts[worst] += 1
        yield i, worst, reasons, changed


def _merge_counts(summary: Summary, j: Judged) -> None:
    for name, c in j.by_filter.items():
        summary.by_filter[name].update(c)


def curate_records(records: Iterable[dict], ctx: Context, summary: Summary, index: DedupIndex | None) -> Iterator[dict]:
    """Yield each record with its `curation` added; deterministic for a given input order and config."""
    judge = Judge(ctx)
    chash = summary.config_hash = ctx.config.config_hash()
    it = iter(records)
    while True:
        batch = list(islice(it, CHUNK))  # batches let dedup hash all n-grams in one numpy pass
        if not batch:
            return
        j = Judged()
        judge.judge(batch, j)
        _merge_counts(summary, j)
        for i, worst, reasons, _ in settle(j, ctx, summary, index if judge.hasher else None):
            batch[i]["curation"] = {"verdict": worst, "reasons": reasons, "config_hash": chash}
            yield batch[i]


CHUNK = 2048            # records a batch (curate_records, JSON arrays)
BLOCK_BYTES = 1 << 20   # JSON Lines bytes a chunk: one message to a worker, a few hundred to thousands of records
SERIAL_BELOW = 1 << 20  # input bytes under which worker processes cost more than they save


def _worker(conn, ctx: Context) -> None:
    """A worker process: judge each (path, entries) that comes in, send the Judged back (or the exception)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle (it ends the workers)
    judge = Judge(ctx)
    while True:
        try:
            task = conn.recv()
        except EOFError:  # the main process is gone
            return
        if task is None:
            return
        try:
            conn.send((True, judge.judge_lines(*task)))
        except BaseException as e:  # noqa: BLE001  (re-raised in the main process)
            conn.send((False, e))


def _chunks(paths: list[str]) -> Iterator[tuple[str, list]]:
    """Input files as chunks: a block of raw lines each (read here, parsed where the chunk is judged), or up to
    CHUNK already-read items (JSON arrays, problems)."""
    for path in paths:
        items = []
        for e in read_blocks(path, block_bytes=BLOCK_BYTES):
            if isinstance(e, Block):
                if items:
                    yield path, items
                    items = []
                yield path, [e]
                continue
            items.append(e)
            if len(items) == CHUNK:
                yield path, items
                items = []
        if items:
            yield path, items


def _judged(paths: list[str], ctx: Context, workers: int) -> Iterator[tuple[Judged, Optional[bytes]]]:
    """Judged chunks in input order, each with its block's bytes (None for read items), from `workers` processes
    (0: in this one)."""
    if workers <= 0:
        judge = Judge(ctx)
        for path, entries in _chunks(paths):
            yield judge.judge_lines(path, entries), _block_data(entries)
        return
    # Chunk k goes to worker k mod W, and each worker answers in the order it was asked, so reading the answers
    # round-robin gives them in input order. Plain pipes, not a Pool: its helper threads cost this (the serial)
    # process more CPU than the answers' unpickling itself.
    mp = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    conns, procs, pending, finished = [], [], deque(), False
    try:
        for _ in range(workers):
            ours, theirs = mp.Pipe()
            procs.append(mp.Process(target=_worker, args=(theirs, ctx), daemon=True))
            procs[-1].start()
            theirs.close()
            conns.append(ours)

        for k, (path, entries) in enumerate(_chunks(paths)):
            # A block goes as (offset, size): the worker reads it from the file, and its answer points into it, so
            # the input's bytes cross no pipe (they were a third of this process's CPU time).
            sent = [e._replace(data=None) if isinstance(e, Block) else e for e in entries]
            conns[k % workers].send((path, sent))
            pending.append((conns[k % workers], _block_data(entries)))
            if len(pending) > 2 * workers:  # bounded read-ahead: memory stays flat however large the input
                yield _answer(pending)
        while pending:
            yield _answer(pending)
        for conn in conns:
            conn.send(None)
        finished = True
    finally:
        for proc in procs:
            if not finished and proc.is_alive():  # stopped early (an error): their work is moot
                proc.terminate()
            proc.join()


def _answer(pending: deque) -> tuple[Judged, Optional[bytes]]:
    """The oldest chunk's Judged (from the worker it went to) and its block's bytes."""
    conn, data = pending.popleft()
    try:
        ok, judged = conn.recv()
    except EOFError:
        raise RuntimeError("a curate worker process died") from None
    if not ok:
        raise judged
    return judged, data


def _block_data(entries: list) -> Optional[bytes]:
    return entries[0].data if entries and isinstance(entries[0], Block) else None


def default_workers(paths: list[str]) -> int:
    """Worker processes for the per-record filters: none for small inputs, else up to 4 (beyond that the main
    process, which dedups and writes in input order, is the limit)."""
    size = sum(os.path.getsize(p) for p in paths if os.path.isfile(p))
    return 0 if size < SERIAL_BELOW else min(4, os.cpu_count() or 1)


REVIEW_MARKER = "review.json"                  # written by `curate review pull` (curate/review/pull.py)
REVIEW_KEY = b'"review":{"reviewer":'         # the provenance pull adds; a key, so never inside an escaped text


class ReviewedOutput(Exception):
    """The output folder holds decisions merged by `curate review pull`; a run would overwrite them."""


def reviewed_decisions(out: Path) -> int:
    """How many records in out carry reviewers' decisions (0: none). O(1) through pull's marker file; a folder
    pulled before the marker existed is found by a byte search (no JSON parsing), counted only on a hit."""
    marker = out / REVIEW_MARKER
    if marker.exists():
        try:
            return int(json.loads(marker.read_text(encoding="utf-8")).get("reviewed", 1)) or 1
        except (ValueError, AttributeError, OSError):
            return 1   # a damaged marker still means a pull happened
    n = 0
    for name in ("approved", "rejected", "doubtful"):
        path = out / f"{name}.jsonl"
        if not path.is_file() or path.stat().st_size == 0:
            continue
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            if m.find(REVIEW_KEY) >= 0:
                n += m[:].count(REVIEW_KEY)
    return n


def run(inputs: list[str], out_dir: str | Path, config: CurateConfig, ctx: Context | None = None,
        workers: Optional[int] = None, force: bool = False) -> Summary:
    out = Path(out_dir)
    if not force and (n := reviewed_decisions(out)):
        raise ReviewedOutput(f"{out} holds reviewed decisions ({n} records from `curate review pull`); "
                             "use another --out, or --force to overwrite")
    ctx = ctx or Context(config)
    summary = Summary()
    chash = summary.config_hash = config.config_hash()
    out.mkdir(parents=True, exist_ok=True)
    index = build_index(ctx) if "duplicates" in config.filters else None
    paths = expand(inputs)
    workers = default_workers(paths) if workers is None else workers

    names = ("approved", "doubtful", "rejected")
    tmp = {n: out / f".{n}.jsonl.tmp" for n in names}
    files = {n: open(tmp[n], "wb", buffering=1 << 20) for n in names}
    stats = ReportStats(ctx.resolve)  # report.json / report.html aggregates, O(cells) memory
    # Each output line: the input line up to its closing brace, then the curation object, as dumps would write it.
    writers = {n: (files[n].write, b',"curation":{"verdict":"' + n.encode() + b'","reasons":') for n in names}
    tail = f',"config_hash":"{chash}"}}}}\n'.encode()
    try:
        for j, data in _judged(paths, ctx, workers):
            summary.problems.extend(j.problems)
            _merge_counts(summary, j)
            view = memoryview(data) if data is not None else None
            starts, ends, extra, encoded, reasons_json = j.head_start, j.head_end, j.head_extra, j.encoded, j.reasons_json
            for i, worst, reasons, changed in settle(j, ctx, summary, index):
                rj = dumps(reasons).encode("utf-8") if changed else reasons_json.get(i, b"[]")
                write, verdict = writers[worst]
                head = view[starts[i]:ends[i]] if starts[i] >= 0 else encoded[i]
                write(b"".join((head, extra.get(i, b""), verdict, rj, tail)))
                stats.count(j.ids[i], j.outputs[i], j.scenes[i], j.styles[i], j.caps[i], worst, j.chars[i], reasons)
    finally:
        for f in files.values():
            f.close()
    for n in names:  # atomic: a crash never leaves half a result behind
        os.replace(tmp[n], out / f"{n}.jsonl")
    write_jsonl_atomic(out / "quarantine.jsonl", (p.to_quarantine() for p in summary.problems))
    (out / REVIEW_MARKER).unlink(missing_ok=True)   # --force: the reviewed decisions are gone now
    write_report(out, build_report(summary, stats, paths, ctx))
    return summary
