"""curate report: report.json aggregates add up to the written files, report.html is self-contained and escaped."""
from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest

from curate import CurateConfig
from curate.filters import Context
from curate.pipeline import run
from curate.report import (MAX_REASON_KINDS, TOP_REASONS, UNKNOWN, ReportStats, reason_kind, rebuild_report,
                           render_html, write_report)
from distillery.record import VERDICTS
from distillery.text import char_count

ROOT = Path(__file__).resolve().parents[1]
REF = ROOT / "dataset/reference"
EVIL = "<script>alert(1)</script>祝你生日快乐！"


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    plain = tmp / "plain.json"  # the reference format: a JSON array without meta
    plain.write_text(json.dumps([
        {"instruction": "送祝福", "input": "祝妈妈生日快乐,正常风格", "output": "妈妈，生日快乐！愿您身体健康，天天开心。"},
        {"instruction": "送祝福", "input": "随便写点什么", "output": EVIL},
        {"instruction": "送祝福", "input": "随便写点什么", "output": "<b>" + "很长的祝福" * 60},
    ], ensure_ascii=False), encoding="utf-8")
    bad = tmp / "bad.jsonl"
    bad.write_text('{"instrution": "x", "input": "y", "output": "z"}\n', encoding="utf-8")
    config = CurateConfig(recipe=str(ROOT / "dataset/recipes/blessing.toml"),
                          dedup_reference=str(REF / "blessings.jsonl"))
    out = tmp / "out"
    # plain.json first, so its records are the first examples of their reasons in the report.
    summary = run([str(plain), str(REF / "defects.jsonl"), str(REF / "blessings.jsonl"), str(bad)], out, config,
                  Context(config))
    written = [json.loads(x) for v in VERDICTS for x in (out / f"{v}.jsonl").read_text(encoding="utf-8").splitlines()]
    return out, summary, json.loads((out / "report.json").read_text(encoding="utf-8")), written


def test_html_is_self_contained_and_escaped(curated):
    out, _, rep, _ = curated
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    # No external resource of any kind: the only URL is the SVG namespace, which is a name, not a fetch.
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", page)
    assert not re.search(r"url\((?!#)|@import|<link|<img|<iframe", page)  # url(#id): a gradient in the page
    assert set(re.findall(r"https?://[^\s\"'<>]+", page)) <= {"http://www.w3.org/2000/svg"}
    # User data never becomes markup.
    assert "<script" not in page and "<b>很长" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    # Every plot is there: verdict bar, filters, heat map, one histogram per cap (and one for records without a cap).
    assert page.count("<svg") == 3 + len(rep["lengths"])
    assert {h["cap"] for h in rep["lengths"]} == {20, 35, 50, 80, None}
    for label in ("verdicts by filter", "approval heat map", "cap 20 字", "no cap in meta"):
        assert f'aria-label="{label}' in page
    heat = page[page.index('aria-label="approval heat map"'):]
    heat = heat[:heat.index("</svg>")]
    for scene in ("生日", "春节", "比赛取得好成绩", UNKNOWN):
        assert f">{scene}</text>" in heat
    assert ">小红书</text>" in heat and ">严肃</text>" in heat
    # Headline numbers and the bad line.
    assert f">{rep['counts']['approved']:,}</div>" in page and "did you mean instruction?" in page


def test_html_renders_from_report_json_alone(curated):
    out, _, rep, _ = curated
    assert render_html(rep) == (out / "report.html").read_text(encoding="utf-8")


def test_aggregates_match_the_written_files(curated):
    out, summary, rep, written = curated
    assert rep["counts"] == {v: summary.counts[v] for v in VERDICTS} and rep["valid"] == len(written)
    assert rep["bad_lines"] == 1 and "bad.jsonl:1" in rep["bad_line_examples"][0]

    # scene × style × verdict, recounted from the files (plain records: scene from `input`, else unknown).
    cells = Counter()
    for r in written:
        m = r.get("meta") or {}
        scene, style = m.get("scene"), m.get("style")
        if not m:
            scene, style = ("生日", "正常") if r["input"].startswith("祝妈妈") else (UNKNOWN, UNKNOWN)
        cells[(scene, style, r["curation"]["verdict"])] += 1
    got = Counter({(c["scene"], c["style"], v): c[v] for c in rep["scene_style"]["cells"] for v in VERDICTS if c[v]})
    assert got == cells
    assert rep["scene_style"]["scenes"][:3] == ["生日", "春节", "元宵节"]  # the recipe's order
    assert rep["scene_style"]["scenes"][-1] == UNKNOWN and rep["scene_style"]["styles"][-1] == UNKNOWN

    # 字数 histogram per cap, recounted with the length filter's own char_count.
    hist = Counter()
    for r in written:
        cap = (r.get("meta") or {}).get("max_chars")
        hist[(cap, r["curation"]["verdict"], min(char_count(r["output"]), 2 * cap if cap else 200))] += 1
    assert all(h["bin_width"] == 1 for h in rep["lengths"])  # small caps: one bar per 字
    got = Counter({(h["cap"], v, k): n for h in rep["lengths"] for v in VERDICTS for k, n in enumerate(h[v]) if n})
    assert got == hist
    no_cap = next(h for h in rep["lengths"] if h["cap"] is None)
    assert sum(no_cap[v][200] for v in VERDICTS) == 1  # the 300-字 plain record, in the "≥ 200" bin

    # Top reasons: every reason of every record is counted once, and examples point at real records.
    assert len(rep["top_reasons"]) < TOP_REASONS  # so all kinds are listed and the sums below are complete
    per_filter = Counter()
    for t in rep["top_reasons"]:
        per_filter[t["filter"]] += t["count"]
    flagged = {f: c.get("rejected", 0) + c.get("doubtful", 0) for f, c in rep["filters"].items()}
    assert per_filter == Counter({f: n for f, n in flagged.items() if n})
    by_id = {r["id"]: r for r in written}
    for t in rep["top_reasons"]:
        assert 1 <= len(t["examples"]) <= 3
        for ex in t["examples"]:
            r = by_id[ex["id"]]
            assert r["output"].startswith(ex["output"].rstrip("…"))
            assert any(x["filter"] == t["filter"] and x["detail"] == ex["detail"] for x in r["curation"]["reasons"])
    kinds = {(t["filter"], t["reason"]) for t in rep["top_reasons"]}
    assert ("length", "fragment") in kinds and ("duplicates", "exact duplicate of …") in kinds


def test_report_records_the_config(curated):
    _, _, rep, _ = curated
    assert CurateConfig(**rep["config"]).config_hash() == rep["config_hash"]


def test_rebuild_recounts_the_files_and_keeps_the_run_fields(curated, tmp_path):
    """What `curate review pull` does after moving records: counts come from the files, run facts stay."""
    out, _, rep, _ = curated
    d = tmp_path / "folder"
    shutil.copytree(out, d)
    doubtful = (d / "doubtful.jsonl").read_text(encoding="utf-8").splitlines()
    moved, kept = doubtful[:2], doubtful[2:]
    (d / "doubtful.jsonl").write_text("".join(x + "\n" for x in kept), encoding="utf-8")
    with open(d / "approved.jsonl", "a", encoding="utf-8") as f:
        f.write("".join(x + "\n" for x in moved))
    files = {v: [json.loads(x) for x in (d / f"{v}.jsonl").read_text(encoding="utf-8").splitlines()]
             for v in VERDICTS}
    new = rebuild_report(files, rep, {"review": {"approved": 2}})
    write_report(d, new)
    lines = {v: len((d / f"{v}.jsonl").read_text(encoding="utf-8").splitlines()) for v in VERDICTS}
    assert new["counts"] == lines and lines["approved"] == rep["counts"]["approved"] + 2
    assert new["valid"] == rep["valid"]
    assert sum(c[v] for c in new["scene_style"]["cells"] for v in VERDICTS) == new["valid"]
    assert sum(sum(h[v]) for h in new["lengths"] for v in VERDICTS) == new["valid"]
    for key in ("inputs", "config_hash", "config", "bad_lines", "bad_line_examples", "filters"):
        assert new[key] == rep[key]
    assert json.loads((d / "report.json").read_text(encoding="utf-8"))["review"] == {"approved": 2}
    assert "after review" in (d / "report.html").read_text(encoding="utf-8")


def test_reason_kind_folds_the_variable_parts():
    assert reason_kind("17 字, the prompt asked for fewer than 20") == "N 字, the prompt asked for fewer than N"
    assert reason_kind("ends mid-clause: …工作顺") == "ends mid-clause"
    assert reason_kind("near duplicate of p-1a2b-0 (similarity ≈ 0.81)") == "near duplicate of …"
    assert reason_kind("'宝贝' is too intimate for 上级") == "… is too intimate for …"
    assert reason_kind("names another occasion (中秋 → 中秋节) than 春节") == "names another occasion than …"
    assert reason_kind("contains 愿你/祝你, which the constraint forbids") == \
        "contains 愿你/祝你, which the constraint forbids"
    assert reason_kind("严肃 style with emoji 🎂🎉") == reason_kind("严肃 style with emoji ☺️") == "严肃 style with emoji"
    assert reason_kind("小红书 style should end on a modal particle, ends …快乐") == \
        "小红书 style should end on a modal particle, ends"


def test_reason_kinds_stay_bounded():
    """Free-form details must not grow memory with the record count: past the limit they fold into one row."""
    stats = ReportStats()
    n = MAX_REASON_KINDS + 500
    for i in range(n):
        stats.add({"id": f"r{i}", "output": "生日快乐呀", "meta": {"scene": "生日", "style": "正常", "max_chars": 20},
                   "curation": {"verdict": "doubtful",
                                "reasons": [{"filter": "custom", "detail": f"kind{chr(0x4e00 + i)}", "score": 1}]}})
    assert len(stats.reasons) == MAX_REASON_KINDS + 1
    rep = stats.to_json()
    assert rep["top_reasons"][0] == {**rep["top_reasons"][0], "filter": "custom", "reason": "(other details)",
                                     "count": 500}
    assert rep["scene_style"]["cells"] == [{"scene": "生日", "style": "正常", "approved": 0, "doubtful": n,
                                            "rejected": 0}]
    assert rep["lengths"][0]["doubtful"][5] == n


def test_huge_or_many_caps_stay_drawable():
    stats = ReportStats()
    caps = [5000] * 30 + list(range(10, 40))
    for i, cap in enumerate(caps):
        stats.add({"id": str(i), "output": "好" * (i * 397 % 12000 + 1), "meta": {"max_chars": cap},
                   "curation": {"verdict": "approved", "reasons": []}})
    rep = stats.to_json()
    huge = next(h for h in rep["lengths"] if h["cap"] == 5000)
    assert huge["bin_width"] > 1 and len(huge["approved"]) <= 256 and sum(huge["approved"]) == 30
    assert rep["scene_style"]["cells"] == [{"scene": UNKNOWN, "style": UNKNOWN, "approved": 60, "doubtful": 0,
                                            "rejected": 0}]
    page = render_html({"counts": {"approved": 60}, "valid": 60, **rep})
    assert page.count('aria-label="cap ') == 12 and "19 rarer caps not drawn" in page
