"""The reference corpus and defect gallery stay valid: schema, coverage, caps, uniqueness, datasheet counts."""
import json
import subprocess
import sys
import tomllib
from collections import Counter
from pathlib import Path

import pytest

from distillery.record import validate
from distillery.text import char_count

ROOT = Path(__file__).resolve().parents[1]
REF = ROOT / "dataset/reference"
RECIPE = tomllib.loads((ROOT / "dataset/recipes/blessing.toml").read_text(encoding="utf-8"))


def load(name):
    return [json.loads(line) for line in (REF / name).read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def good():
    return load("blessings.jsonl")


@pytest.fixture(scope="module")
def bad():
    return load("defects.jsonl")


def test_built_files_match_sources():
    # The .jsonl files are generated from src/*.tsv; the builder's checks (caps, emoji, constraints, exclusions) pass.
    # --check builds in memory and compares with the files on disk (no write, no git needed).
    out = subprocess.run([sys.executable, "dataset/tools/build_reference.py", "--check"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, (out.stdout + out.stderr
                                 + "\nthe .jsonl files differ from what src/*.tsv builds: run dataset/tools/build_reference.py")


def test_schema_and_provenance(good, bad):
    for rec in good + bad:
        validate(rec, require_id=True)
        m = rec["meta"]
        for key in ("scene", "style", "recipient", "relation", "constraint", "max_chars", "provenance"):
            assert key in m, (rec["id"], key)
        assert rec["instruction"] == RECIPE["recipe"]["system"]
    assert {r["meta"]["provenance"]["source"] for r in good} == {"hand-written"}
    assert {r["meta"]["provenance"]["source"] for r in bad} == {"hand-written-defect"}


def test_every_cell_covered(good):
    assert len(good) >= 540
    cells = Counter((r["meta"]["scene"], r["meta"]["style"]) for r in good)
    for scene in RECIPE["scenes"]:
        for style in RECIPE["styles"]:
            assert cells[(scene["name"], style["name"])] >= 10, (scene["name"], style["name"])


def test_spread_over_recipe_values(good):
    assert len({r["meta"]["recipient"] for r in good}) >= 25
    assert {r["meta"]["constraint_index"] for r in good} == {0, 1, 2, 3}
    assert {r["meta"]["max_chars"] for r in good} == {l["max_chars"] for l in RECIPE["lengths"]}


def test_lengths_under_caps(good):
    over = [(r["id"], char_count(r["output"]), r["meta"]["max_chars"]) for r in good
            if char_count(r["output"]) >= r["meta"]["max_chars"]]
    assert not over


def test_unique_ids_and_no_near_duplicates(good, bad):
    ids = [r["id"] for r in good + bad]
    assert len(ids) == len(set(ids))

    def grams(text):
        t = "".join(ch for ch in text if ch.isalnum())
        return {t[i:i + 3] for i in range(len(t) - 2)}

    sets = [(r["id"], grams(r["output"])) for r in good]
    near = []
    for i, (a, ga) in enumerate(sets):
        for b, gb in sets[i + 1:]:
            if ga and gb and len(ga & gb) / len(ga | gb) >= 0.7:
                near.append((a, b))
    assert not near, near[:5]


def test_defect_kinds(bad):
    kinds = Counter(r["meta"]["defect"] for r in bad)
    assert len(bad) >= 150
    for kind in ("fragment", "particle_artifact", "over_length", "truncated", "title_markdown", "meta_talk",
                 "emoji_spam", "emoji_in_serious", "wrong_occasion", "wrong_tone", "forbidden_phrase",
                 "english_leak", "traditional_leak", "exact_duplicate", "near_duplicate"):
        assert kinds[kind] >= 5, kind


def test_over_length_defects_are_over(bad):
    for r in bad:
        if r["meta"]["defect"] == "over_length":
            assert char_count(r["output"]) >= r["meta"]["max_chars"], r["output"]


def test_datasheet_counts_match_files():
    out = subprocess.run([sys.executable, "dataset/tools/datasheet.py", "--check"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
