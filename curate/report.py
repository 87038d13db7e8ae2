"""report.json aggregates and report.html, collected while records stream past.

Memory is O(cells), not O(records): counts per scene × style × verdict, a 字数 histogram per length cap, and per
reason kind a count plus the first few examples. report.html is rendered from report.json alone (render_html), as
one self-contained file: hand-written SVG and inline CSS, no scripts, no external URLs. Hand-written SVG rather than
matplotlib because the axes are Chinese scene names and the browser has CJK fonts where matplotlib may not.

report.json keys:
    inputs, config_hash, config {CurateConfig field: value}, counts {verdict: n}, valid, bad_lines,
    bad_line_examples [first "file:line: what"],
    filters {filter: {rejected, doubtful, skipped}}  (a sample flagged by two filters counts under both),
    scene_style {scenes, styles, cells: [{scene, style, approved, doubtful, rejected}]}  (scene/style from meta,
        else parsed from `input` with the recipe, else "(unknown)"),
    lengths [{cap, bin_width, approved: [...], doubtful: [...], rejected: [...]}]  (bin k: 字数 in
        [k·bin_width, (k+1)·bin_width), the last bin open-ended from 2·cap; cap null: records without max_chars),
    top_reasons [{filter, reason, count, examples: [{id, detail, output}]}]  (reason: the detail with its
        numbers, quotes and names folded, see reason_kind).
    review {approved, edited, rejected, edit_failed, pending, conflicts, pulled_at, config}  (only after
        `curate review pull`, which recounts the rest from the files: see rebuild_report).
The cells of scene_style and each histogram add up to counts.
"""
from __future__ import annotations

import dataclasses
import functools
import html
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

import regex

from distillery.io import write_json_atomic, write_text_atomic
from distillery.record import VERDICTS, provenance
from distillery.text import char_count

UNKNOWN = "(unknown)"
EXAMPLES_PER_REASON = 3
EXAMPLE_CHARS = 160          # an example output is cut to this many characters in the report
MAX_REASON_KINDS = 2000      # beyond this many distinct kinds, further ones fold into "(other details)"
TOP_REASONS = 40             # kept in report.json; the page shows them all
NO_CAP_CLAMP = 200           # 字数 histogram without a cap ends in a "≥ 200" bin (with a cap: "≥ 2·cap")
MAX_LENGTH_PLOTS = 12       # the most common caps get a histogram each on the page
MAX_BINS = 256               # a huge cap gets wider bins rather than thousands of bars
_VI = {v: i for i, v in enumerate(VERDICTS)}


# ---------------------------------------------------------------- collecting

_HEAD_END = regex.compile(r": |：|…")
_QUOTED = regex.compile(r"'[^']*'|\"[^\"]*\"|“[^”]*”")
_PARENS = regex.compile(r"\s*\([^)]*\)")
_DIGITS = regex.compile(r"\d+(?:\.\d+)?")
_TRAILING_NAME = regex.compile(r"(?<=\s)\p{Han}+$")   # "… too intimate for 上级": one row, not one per relation
_EMOJI_RESIDUE = regex.compile(r"[\p{Extended_Pictographic}\p{Emoji_Modifier}\uFE0F\u200D]")
_DUP_OF = " duplicate of "


def reason_kind(detail: str) -> str:
    """The stable part of a filter's detail, so one kind of problem is one row however its numbers or quotes vary:
    "17 字, the prompt asked for fewer than 20" → "N 字, the prompt asked for fewer than N";
    "ends mid-clause: …工作顺" → "ends mid-clause"; "exact duplicate of ref-1a2b" → "exact duplicate of …";
    "'宝贝' is too intimate for 上级" → "… is too intimate for …"."""
    # Cut the unique tails (quoted text after ":", duplicate ids) with cheap string operations first, so the
    # cache below sees few distinct keys: most details are unique, their heads are not.
    m = _HEAD_END.search(detail)
    head = detail[:m.start()] if m else detail
    at = head.find(_DUP_OF)
    if at >= 0:
        head = head[:at + len(_DUP_OF)] + "…"
    return _normalise_head(head) or detail[:40]


@functools.lru_cache(maxsize=4096)
def _normalise_head(head: str) -> str:
    kind = _QUOTED.sub("…", _PARENS.sub("", head))
    kind = _EMOJI_RESIDUE.sub("", _DIGITS.sub("N", kind)).strip()
    return " ".join(_TRAILING_NAME.sub("…", kind).split())


class ReportStats:
    """Per-record aggregates for the report; `add` is a few dict increments per record.

    Counters are flat dicts keyed by tuples (cheaper per record than nested Counters); to_json reshapes them."""

    def __init__(self, resolve: Optional[Callable[[dict], dict]] = None):
        self._resolve = resolve  # recovers scene/style from `input` when a record has no meta (plain imports)
        self.cells: dict[tuple[str, str, str], int] = {}             # (scene, style, verdict) → n
        self.lengths: dict[tuple[Optional[int], str, int], int] = {}  # (cap, verdict, 字数 clamped) → n
        self.reasons: dict[tuple[str, str], list] = {}                # (filter, kind) → [count, examples]

    def add(self, rec: dict, chars: Optional[int] = None) -> None:
        """Count one curated record. `chars`: its 字数 if the caller already has it (char_count is the costly part)."""
        cur = rec["curation"]
        verdict, reasons = cur["verdict"], cur["reasons"]
        meta = rec.get("meta") or _NO_META
        scene, style, cap = meta.get("scene"), meta.get("style"), meta.get("max_chars")
        if not (scene and style) and self._resolve is not None:
            info = self._resolve(rec)
            scene, style = scene or info.get("scene"), style or info.get("style")
        if chars is None:
            chars = _chars_from_reasons(reasons, cap) if reasons else None
            if chars is None:
                chars = char_count(rec["output"])
        self.count(rec["id"], rec["output"], scene, style, cap, verdict, chars, reasons)

    def count(self, rid: str, output: str, scene: Optional[str], style: Optional[str], cap: Optional[int],
              verdict: str, chars: int, reasons: list) -> None:
        """add() for a caller that has every field at hand (the pipeline, which keeps no record dict per record)."""
        key = (scene or UNKNOWN, style or UNKNOWN, verdict)
        self.cells[key] = self.cells.get(key, 0) + 1
        key = (cap, verdict, min(chars, _clamp(cap)))
        self.lengths[key] = self.lengths.get(key, 0) + 1
        for r in reasons:
            rkey = (r["filter"], reason_kind(r["detail"]))
            entry = self.reasons.get(rkey)
            if entry is None:
                if len(self.reasons) >= MAX_REASON_KINDS:
                    rkey = (r["filter"], "(other details)")
                    entry = self.reasons.setdefault(rkey, [0, []])
                else:
                    entry = self.reasons[rkey] = [0, []]
            entry[0] += 1
            if len(entry[1]) < EXAMPLES_PER_REASON:
                entry[1].append({"id": rid, "detail": r["detail"],
                                 "output": output if len(output) <= EXAMPLE_CHARS else output[:EXAMPLE_CHARS] + "…"})

    def to_json(self, scene_order: list[str] = (), style_order: list[str] = ()) -> dict:
        """The aggregates as report.json carries them; axes follow the recipe's order, unknown names after."""
        def order(names, preferred):
            rank = {n: i for i, n in enumerate(preferred)}
            return sorted(names, key=lambda n: (n == UNKNOWN, rank.get(n, len(rank)), n))
        scenes = order({k[0] for k in self.cells}, scene_order)
        styles = order({k[1] for k in self.cells}, style_order)
        pairs = {k[:2] for k in self.cells}
        cells = [{"scene": s, "style": t, **{v: self.cells.get((s, t, v), 0) for v in VERDICTS}}
                 for s in scenes for t in styles if (s, t) in pairs]
        hists: dict = {}
        for (cap, v, n), count in self.lengths.items():
            if cap not in hists:
                width = -(-(_clamp(cap) + 1) // MAX_BINS)  # ceil
                hists[cap] = {"cap": cap, "bin_width": width,
                              **{x: [0] * (_clamp(cap) // width + 1) for x in VERDICTS}}
            h = hists[cap]
            h[v][n // h["bin_width"]] += count
        lengths = [hists[c] for c in sorted(hists, key=lambda c: (c is None, c or 0))]
        top = sorted(self.reasons.items(), key=lambda kv: (-kv[1][0], kv[0]))[:TOP_REASONS]
        reasons = [{"filter": f, "reason": k, "count": c, "examples": ex} for (f, k), (c, ex) in top]
        return {"scene_style": {"scenes": scenes, "styles": styles, "cells": cells},
                "lengths": lengths, "top_reasons": reasons}


_NO_META: dict = {}


def _clamp(cap: Optional[int]) -> int:
    """The 字数 where the histogram's last, open-ended bin starts."""
    return 2 * cap if cap else NO_CAP_CLAMP


def _chars_from_reasons(reasons: list, cap: Optional[int]) -> Optional[int]:
    """The length filter already counted 字数 when it fired (score = 字数 / cap): reuse it instead of recounting."""
    if cap and cap <= 1000:  # the score is rounded to 4 places: exact back to 字数 only for sane caps
        for r in reasons:
            if r["filter"] == "length":
                return round(r["score"] * cap)
    return None


# ---------------------------------------------------------------- rendering

COLORS = {"approved": "#2e9e5b", "doubtful": "#e8a33d", "rejected": "#d64545", "skipped": "#b8bec7"}
FONT = ('-apple-system, "PingFang SC", "Hiragino Sans GB", "Noto Sans CJK SC", "Source Han Sans SC", '
        '"Microsoft YaHei", "WenQuanYi Micro Hei", sans-serif')
e = functools.partial(html.escape, quote=True)


def _pct(a: int, b: int) -> str:
    return f"{100 * a / b:.0f}%" if b else "–"


def _svg(width: int, height: int, body: list[str], label: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{e(label)}">' + "".join(body) + "</svg>")


def _text(x: float, y: float, s: str, anchor: str = "start", size: int = 12, fill: str = "#333",
          weight: str = "normal") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" font-size="{size}" fill="{fill}" '
            f'font-weight="{weight}">{e(s)}</text>')


def _rect(x: float, y: float, w: float, h: float, fill: str, title: str = "") -> str:
    tip = f"<title>{e(title)}</title>" if title else ""
    return f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(w, 0):.1f}" height="{h:.1f}" fill="{fill}">{tip}</rect>'


def svg_verdict_bar(counts: dict, bad_lines: int) -> str:
    """One bar split into approved / doubtful / rejected / quarantined."""
    parts = [(v, counts.get(v, 0)) for v in VERDICTS] + [("quarantined", bad_lines)]
    total = sum(n for _, n in parts) or 1
    width, x, body = 1000, 0.0, []
    for name, n in parts:
        w = width * n / total
        body.append(_rect(x, 0, w, 28, COLORS.get(name, "#7a7f87"), f"{name}: {n} ({_pct(n, total)})"))
        if w > 70:
            body.append(_text(x + w / 2, 19, f"{name} {_pct(n, total)}", "middle", 12, "#fff", "bold"))
        x += w
    return _svg(width, 28, body, "verdict shares")


def svg_filters(filters: dict) -> str:
    """Stacked horizontal bars: rejected and doubtful samples per filter; skipped as a note on the right."""
    rows = sorted(filters.items(), key=lambda kv: (-(kv[1].get("rejected", 0) + kv[1].get("doubtful", 0)), kv[0]))
    if not rows:
        return "<p class=muted>No filter flagged or skipped anything.</p>"
    top = max(c.get("rejected", 0) + c.get("doubtful", 0) for _, c in rows) or 1
    label_w, bar_w, row_h = 110, 560, 26
    body = []
    for i, (name, c) in enumerate(rows):
        y = i * row_h + 4
        body.append(_text(label_w - 8, y + 14, name, "end", 13))
        x = label_w
        for v in ("rejected", "doubtful"):
            n = c.get(v, 0)
            w = bar_w * n / top
            body.append(_rect(x, y, w, row_h - 8, COLORS[v], f"{name}: {n} {v}"))
            x += w
        note = f"{c.get('rejected', 0)} rejected · {c.get('doubtful', 0)} doubtful"
        if c.get("skipped"):
            note += f" · {c['skipped']} skipped"
        body.append(_text(x + 6, y + 14, note, "start", 11, "#555"))
    return _svg(label_w + bar_w + 230, len(rows) * row_h + 8, body, "verdicts by filter")


HEAT_STOPS = [(0.0, (214, 69, 69)), (0.5, (240, 200, 90)), (1.0, (46, 158, 91))]  # red → amber → green
ALL_STYLES, ALL_SCENES = "all styles", "all scenes"


def _heat_color(rate: float) -> tuple[str, str]:
    """Cell fill for an approval rate, and a text colour that stays readable on it."""
    for (a, ca), (b, cb) in zip(HEAT_STOPS, HEAT_STOPS[1:]):
        if rate <= b:
            t = (rate - a) / (b - a)
            rgb = [round(x + (y - x) * t) for x, y in zip(ca, cb)]
            break
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return "#%02x%02x%02x" % tuple(rgb), "#fff" if luminance < 150 else "#222"


def svg_heatmap(scene_style: dict) -> str:
    """Approval rate per scene × style with the counts in each cell, plus "all styles" / "all scenes" margins."""
    scenes, styles = scene_style["scenes"], scene_style["styles"]
    if not scenes:
        return "<p class=muted>No records.</p>"
    cells: dict[tuple[str, str], Counter] = {}
    for c in scene_style["cells"]:
        counts = Counter({v: c[v] for v in VERDICTS})
        for key in ((c["scene"], c["style"]), (c["scene"], ALL_STYLES), (ALL_SCENES, c["style"]),
                    (ALL_SCENES, ALL_STYLES)):
            cells.setdefault(key, Counter()).update(counts)
    rows, cols = scenes + [ALL_SCENES], styles + [ALL_STYLES]
    label_w, cw, ch, head, gap = 130, 110, 30, 26, 8   # the margins sit a gap apart from the grid

    def x_of(i: int) -> float:
        return label_w + i * cw + (gap if i == len(styles) else 0)

    def y_of(r: int) -> float:
        return head + r * ch + (gap if r == len(scenes) else 0)

    body = [_text(x_of(i) + cw / 2, 17, s, "middle", 13, "#333", "bold") for i, s in enumerate(cols)]
    for r, scene in enumerate(rows):
        y = y_of(r)
        body.append(_text(label_w - 8, y + ch / 2 + 5, scene, "end", 13, "#333",
                          "bold" if scene == ALL_SCENES else "normal"))
        for i, style in enumerate(cols):
            x, c = x_of(i), cells.get((scene, style))
            n = sum(c.values()) if c else 0
            if not n:
                body.append(_rect(x + 1, y + 1, cw - 2, ch - 2, "#eef0f3", f"{scene} × {style}: no records"))
                body.append(_text(x + cw / 2, y + ch / 2 + 5, "–", "middle", 12, "#999"))
                continue
            rate = c["approved"] / n
            fill, ink = _heat_color(rate)
            tip = (f"{scene} × {style}: {c['approved']} approved, {c['doubtful']} doubtful, "
                   f"{c['rejected']} rejected")
            body.append(_rect(x + 1, y + 1, cw - 2, ch - 2, fill, tip))
            body.append(_text(x + cw / 2, y + ch / 2 + 5, f"{rate:.0%} of {n}", "middle", 12, ink, "bold"))
    # Colour scale under the grid.
    y = y_of(len(rows)) + 14
    stops = "".join(f'<stop offset="{a:.0%}" stop-color="{_heat_color(a)[0]}"/>' for a, _ in HEAT_STOPS)
    body += [f'<defs><linearGradient id="heat-scale">{stops}</linearGradient></defs>',
             f'<rect x="{label_w + 60}" y="{y}" width="200" height="10" fill="url(#heat-scale)"/>',
             _text(label_w + 54, y + 9, "0%", "end", 11, "#555"),
             _text(label_w + 266, y + 9, "100% approved", "start", 11, "#555")]
    return _svg(int(x_of(len(cols))) + 4, int(y + 16), body, "approval heat map")


def _nice_step(span: float) -> int:
    """A tick step of 1, 2 or 5 × 10^k giving about ten ticks over span."""
    step = 1
    while step * 10 < span:
        step = step * 5 // 2 if str(step)[0] == "2" else step * 2
    return step


def svg_length(h: dict) -> str:
    """字数 histogram for one cap, stacked by verdict, with the cap as a dashed line.

    Bin k holds 字数 in [k·bin_width, (k+1)·bin_width); the last bin is open-ended."""
    cap, width = h["cap"], h["bin_width"]
    nbins = len(h["approved"])
    last = nbins - 1
    totals = [sum(h[v][k] for v in VERDICTS) for k in range(nbins)]
    hi = max(totals) or 1
    left, plot_w, plot_h, top, bottom = 40, 400, 120, 22, 24
    bw = plot_w / nbins
    title = f"cap {cap} 字 · {sum(totals)} records" if cap else f"no cap in meta · {sum(totals)} records"
    body = [_text(left, 14, title, "start", 13, "#222", "bold"),
            f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#999"/>',
            _text(left - 6, top + 8, str(hi), "end", 10, "#777"), _text(left - 6, top + plot_h, "0", "end", 10, "#777")]
    for k in range(nbins):
        y = top + plot_h
        lo = k * width
        label = f"≥ {lo}" if k == last else str(lo) if width == 1 else f"{lo}–{lo + width - 1}"
        for v in reversed(VERDICTS):  # rejected at the bottom: the failures sit where the eye starts
            n = h[v][k]
            if n:
                hh = plot_h * n / hi
                y -= hh
                body.append(_rect(left + k * bw, y, max(bw - 0.6, 0.8), hh, COLORS[v], f"{label} 字: {n} {v}"))
    for t in range(0, last * width + 1, _nice_step(last * width)):
        k = t // width
        body.append(_text(left + (k + 0.5) * bw, top + plot_h + 14, f"≥{t}" if k == last else str(t),
                          "middle", 10, "#777"))
    if cap:
        x = left + cap / width * bw
        body.append(f'<line x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" y2="{top + plot_h}" stroke="#222" '
                    f'stroke-dasharray="4 3" stroke-width="1.5"/>')
        body.append(_text(x + 4, top + 6, f"cap {cap}", "start", 11, "#222"))
    return _svg(left + plot_w + 10, top + plot_h + bottom, body, title)


def _reasons_table(reasons: list) -> str:
    if not reasons:
        return "<p class=muted>No sample was flagged.</p>"
    rows = []
    for r in reasons:
        ex = "".join(f'<li><code>{e(x["id"])}</code> <span class=out>{e(x["output"])}</span>'
                     f'<br><span class=muted>{e(x["detail"])}</span></li>' for x in r["examples"])
        rows.append(f'<tr><td><b>{e(r["filter"])}</b></td><td>{e(r["reason"])}</td>'
                    f'<td class=num>{r["count"]}</td><td><ul>{ex}</ul></td></tr>')
    return ("<table class=reasons><thead><tr><th>filter</th><th>reason</th><th>count</th><th>examples</th></tr>"
            "</thead><tbody>" + "".join(rows) + "</tbody></table>")


CSS = f"""
body {{ font-family: {FONT}; color: #222; margin: 0; background: #f6f7f9; }}
main {{ max-width: 1080px; margin: 0 auto; padding: 24px 28px 48px; }}
h1 {{ font-size: 22px; margin: 0 0 4px; }} h2 {{ font-size: 17px; margin: 4px 0 8px; }}
section {{ background: #fff; border-radius: 10px; padding: 16px 20px; margin-top: 16px;
           box-shadow: 0 1px 3px rgba(0,0,0,.08); overflow-x: auto; }}
.cards {{ display: flex; gap: 12px; flex-wrap: wrap; margin: 14px 0; }}
.card {{ background: #fff; border-radius: 10px; padding: 10px 16px; min-width: 120px;
         box-shadow: 0 1px 3px rgba(0,0,0,.08); border-top: 4px solid var(--c); }}
.card .n {{ font-size: 26px; font-weight: 700; }} .card .l {{ font-size: 12px; color: #666; }}
.muted {{ color: #777; font-size: 12px; }} code {{ font-size: 11px; color: #555; }}
table {{ border-collapse: collapse; width: 100%; font-size: 13px; }}
th, td {{ text-align: left; vertical-align: top; padding: 6px 8px; border-bottom: 1px solid #eee; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
ul {{ margin: 0; padding-left: 16px; }} li {{ margin-bottom: 4px; }}
.out {{ background: #f3f4f6; padding: 0 3px; border-radius: 3px; }}
.legend span {{ display: inline-block; margin-right: 14px; font-size: 12px; }}
.legend i {{ display: inline-block; width: 10px; height: 10px; margin-right: 4px; border-radius: 2px; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 8px 24px; }}
"""


def _legend(names: tuple[str, ...]) -> str:
    return "<div class=legend>" + "".join(f'<span><i style="background:{COLORS[n]}"></i>{n}</span>'
                                          for n in names) + "</div>"


def _review_line(review: Optional[dict]) -> str:
    if not review:
        return ""
    return (f'<div class=muted>after review ({e(str(review.get("pulled_at", "")))}): '
            f'{review.get("approved", 0)} approved, '
            f'{review.get("edited", 0)} approved with edit, {review.get("rejected", 0)} rejected, '
            f'{review.get("edit_failed", 0)} edits failed re-check, {review.get("pending", 0)} pending, '
            f'{review.get("conflicts", 0)} conflicts</div>')


def render_html(report: dict) -> str:
    """report.html from report.json alone: one file, inline SVG and CSS, every piece of user data escaped."""
    counts, bad = report["counts"], report.get("bad_lines", 0)
    total = report["valid"] + bad
    cards = [("records read", total, "#4a6fa5")] + [(v, counts.get(v, 0), COLORS[v]) for v in VERDICTS] + \
            [("quarantined (bad lines)", bad, "#7a7f87")]
    cards_html = "".join(
        f'<div class=card style="--c:{c}"><div class=n>{n:,}</div><div class=l>{e(label)}'
        f'{"" if label in ("records read", "quarantined (bad lines)") else " · " + _pct(n, report["valid"])}</div></div>'
        for label, n, c in cards)
    skipped = {f: c["skipped"] for f, c in report.get("filters", {}).items() if c.get("skipped")}
    skipped_html = (", ".join(f"{e(f)}: {n:,}" for f, n in sorted(skipped.items())) if skipped
                    else "none")
    inputs = "".join(f"<li><code>{e(p)}</code></li>" for p in report.get("inputs", []))
    problems = "".join(f"<li><code>{e(p)}</code></li>" for p in report.get("bad_line_examples", []))
    hists = report.get("lengths", [])
    shown = sorted(hists, key=lambda h: -sum(sum(h[v]) for v in VERDICTS))[:MAX_LENGTH_PLOTS]
    lengths = "".join(svg_length(h) for h in hists if h in shown)
    if len(hists) > len(shown):
        lengths += f"<p class=muted>{len(hists) - len(shown)} rarer caps not drawn (all in report.json).</p>"
    s = report.get("scene_style", {"scenes": [], "styles": [], "cells": []})
    return f"""<!DOCTYPE html>
<html lang="zh-CN"><head><meta charset="utf-8"><title>curate report</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>
<body><main>
<h1>curate report</h1>
<div class=muted>config <code title="{e(report.get("config_hash", ""))}">{e(report.get("config_hash", "")[:12])}</code>
 · {len(report.get("inputs", []))} input file(s) · filters skipped for missing meta: {skipped_html}</div>
{_review_line(report.get("review"))}
<div class=cards>{cards_html}</div>
<section>{svg_verdict_bar(counts, bad)}</section>
<section><h2>Verdicts by filter</h2>
<p class=muted>Samples each filter flagged; one sample can be flagged by several filters, and its verdict is the
worst of them. Skipped: the filter needed a meta field the record lacks.</p>
{_legend(("rejected", "doubtful"))}{svg_filters(report.get("filters", {}))}</section>
<section><h2>Approval by scene × style</h2>
<p class=muted>Share approved in each cell, of how many samples. Hover a cell for the full split.
Records whose scene or style cannot be told go under {e(UNKNOWN)}.</p>
{svg_heatmap(s)}</section>
<section><h2>Length against the cap</h2>
<p class=muted>字数 as the length filter counts it (every visible character, emoji and punctuation included, one
each). The prompt asks for fewer than the cap: bars at or right of the dashed line are over.</p>
{_legend(VERDICTS)}<div class=grid>{lengths}</div></section>
<section><h2>Top reasons</h2>
<p class=muted>Reasons grouped by kind (numbers and quoted text folded); the first examples seen of each.</p>
{_reasons_table(report.get("top_reasons", []))}</section>
<section><h2>Inputs</h2><ul>{inputs}</ul>
{"<h2>Bad lines (first ones; all in quarantine.jsonl)</h2><ul>" + problems + "</ul>" if problems else ""}
</section>
</main></body></html>
"""


# ---------------------------------------------------------------- writing

BAD_LINE_EXAMPLES = 10


def build_report(summary, stats: ReportStats, inputs: list[str], ctx=None) -> dict:
    """report.json: the run's counts (summary: curate.pipeline.Summary) plus the aggregates `stats` collected."""
    report = {
        "inputs": inputs, "config_hash": summary.config_hash,
        "counts": {n: summary.counts.get(n, 0) for n in VERDICTS}, "valid": summary.valid,
        "bad_lines": len(summary.problems),
        "bad_line_examples": [str(p) for p in summary.problems[:BAD_LINE_EXAMPLES]],
        "filters": {k: dict(sorted(v.items())) for k, v in sorted(summary.by_filter.items())},
    }
    if ctx is not None:   # the resolved config, so `curate review pull` can re-check edits by the same rules
        report["config"] = dataclasses.asdict(ctx.config)
    report.update(stats.to_json(*_axis_orders(ctx)))
    return report


def _axis_orders(ctx) -> tuple[list[str], list[str]]:
    """The recipe's scene and style names, in its order (ctx: curate.filters.Context, or None for no recipe)."""
    recipe = ctx.recipe if ctx is not None else {}
    return [s["name"] for s in recipe.get("scenes", [])], [s["name"] for s in recipe.get("styles", [])]


def rebuild_report(by_verdict: dict[str, list[dict]], old: dict, extra: dict, ctx=None) -> dict:
    """report.json recounted from the records each verdict file now holds (after `curate review pull` moved
    records; the caller has them in memory, having just written them). From `old` (the run's report) it keeps what
    the files cannot tell: inputs, config, bad lines and the per-filter counts (the curator's verdicts, skipped
    included). `extra` (e.g. the review block) is added on top. ctx: as for build_report."""
    stats = ReportStats(ctx.resolve if ctx is not None else None)
    for verdict, records in by_verdict.items():
        for rec in records:
            # the file decides the verdict; a copy, so the caller's records are left as written
            rec = {**rec, "curation": {"reasons": [], **(rec.get("curation") or {}), "verdict": verdict}}
            edited = provenance(rec).get("original_output") is not None
            # 字数 of an edited text from the text: folders pulled before edits were re-curated keep reasons
            # (and their 字数) about the old text
            stats.add(rec, char_count(rec["output"]) if edited else None)
    report = {k: old[k] for k in ("inputs", "config_hash", "config", "bad_lines", "bad_line_examples", "filters")
              if k in old}
    report.setdefault("inputs", [])
    report.setdefault("config_hash", "")
    report.update({"counts": {v: len(by_verdict.get(v, ())) for v in VERDICTS},
                   "valid": sum(len(by_verdict.get(v, ())) for v in VERDICTS)})
    report.update(stats.to_json(*_axis_orders(ctx)))
    report.update(extra)
    return report


def write_report(out_dir: Path, report: dict) -> None:
    """report.json and report.html, each written atomically so a crash leaves no half file."""
    write_json_atomic(out_dir / "report.json", report, indent=2, sort_keys=True)
    write_text_atomic(out_dir / "report.html", render_html(report))
