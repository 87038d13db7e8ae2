"""curate on the held-out quality set: lines written apart from the reference corpus the filters were tuned on.

Issue #4's bar for a held-out labelled set: defective samples caught (rejected or doubtful) ≥ 95%, good samples
rejected ≤ 3% and sent to review (doubtful) ≤ 10%. Both halves go through the real CLI in one run, good first, so
that a duplicate in the bad half finds its original (first occurrence wins) as it would in a teacher run.
"""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from curate.cli import main

ROOT = Path(__file__).resolve().parents[1]
GOOD = ROOT / "dataset/reference/heldout-good.jsonl"
BAD = ROOT / "dataset/reference/heldout-bad.jsonl"


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("heldout")
    assert main(["run", str(GOOD), str(BAD), "--out", str(out)]) == 0
    return {r["id"]: r["curation"] for v in ("approved", "doubtful", "rejected") for r in read(out / f"{v}.jsonl")}


def _show(records: list[dict], verdicts: dict) -> str:
    return "\n".join(f"{r['meta'].get('defect', 'good')}: {r['output']} → {verdicts[r['id']]['verdict']} "
                     f"{[x['detail'] for x in verdicts[r['id']]['reasons']]}" for r in records)


def test_heldout_built_from_sources():
    out = subprocess.run([sys.executable, "dataset/tools/build_reference.py", "--check"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    good, bad = read(GOOD), read(BAD)
    assert len(good) >= 300 and len(bad) >= 150
    assert {r["meta"]["provenance"]["source"] for r in good} == {"hand-written-heldout"}
    assert len({r["meta"]["defect"] for r in bad}) >= 15


def test_every_record_gets_one_verdict(verdicts):
    assert len(verdicts) == len(read(GOOD)) + len(read(BAD))


def test_defects_caught(verdicts):
    bad = read(BAD)
    missed = [r for r in bad if verdicts[r["id"]]["verdict"] == "approved"]
    assert len(missed) <= 0.05 * len(bad), _show(missed, verdicts)
    # No defect kind slips through wholesale.
    kinds, caught = Counter(r["meta"]["defect"] for r in bad), Counter(r["meta"]["defect"] for r in bad if r not in missed)
    assert all(caught[k] >= 0.8 * n for k, n in kinds.items()), {k: f"{caught[k]}/{n}" for k, n in kinds.items()}


def test_good_rarely_rejected(verdicts):
    good = read(GOOD)
    rejected = [r for r in good if verdicts[r["id"]]["verdict"] == "rejected"]
    assert len(rejected) <= 0.03 * len(good), _show(rejected, verdicts)


def test_good_rarely_sent_to_review(verdicts):
    good = read(GOOD)
    doubtful = [r for r in good if verdicts[r["id"]]["verdict"] == "doubtful"]
    assert len(doubtful) <= 0.10 * len(good), _show(doubtful, verdicts)
