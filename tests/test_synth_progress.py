"""The progress display of `python -m synth run`: a live panel on a real pseudo-terminal, plain lines in a pipe,
and the summary JSON beside the output — all against the loopback teacher."""
from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loopback_teacher import LoopbackTeacher  # noqa: E402

from synth.progress import Snapshot, plain_line  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "dataset" / "recipes" / "blessing.toml"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Za-z0-9]|\r")


def run_args(out: Path, limit: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "synth", "run", "--recipe", str(RECIPE), "--out", str(out), "--limit", str(limit),
            "--concurrency", "4", *extra]


def env_for(base_url: str) -> dict:
    return dict(os.environ, OPENAI_API_KEY="sk-progress-test", OPENAI_BASE_URL=base_url, PYTHONPATH=str(ROOT),
                COLUMNS="120", TERM="xterm-256color")


def test_live_display_on_a_terminal(tmp_path):
    faults = {"500": 0.15}  # some retries, so `retrying` is more than a label
    with LoopbackTeacher(latency=0.08, faults=faults) as t:
        master, slave = pty.openpty()
        p = subprocess.Popen(run_args(tmp_path, 60), env=env_for(t.base_url), cwd=ROOT, stdin=subprocess.DEVNULL,
                             stdout=slave, stderr=subprocess.PIPE)
        os.close(slave)
        chunks = []
        deadline = time.time() + 60
        while time.time() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif p.poll() is not None:
                break
        p.wait(30)
        os.close(master)
    screen = b"".join(chunks).decode("utf-8", errors="replace")
    assert p.returncode == 0, p.stderr.read()
    assert "\x1b[" in screen, "a terminal should get rich's live rendering, not plain lines"
    text = ANSI.sub("", screen)
    for label in ("done", "failed", "retrying", "req/s", "requests", "tokens", "spend", "ETA", "in flight"):
        assert label in text, label
    assert re.search(r"done\s+60 / 60", text), text[-800:]
    assert "[synth] done=" not in text  # the plain-line format is for pipes only
    assert text.count("req/s") >= 2, "the panel should have been refreshed while the run was going"


def test_plain_lines_when_not_a_terminal(tmp_path):
    with LoopbackTeacher(latency=0.05) as t:
        r = subprocess.run(run_args(tmp_path, 60, "--progress-every", "0.2"), env=env_for(t.base_url), cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stdout.splitlines() if x.startswith("[synth] ")]
    assert len(lines) >= 3, r.stdout  # ~0.75 s of work at one line per 0.2 s, plus the final line
    assert "\x1b[" not in r.stdout
    for field in ("done=", "failed=", "retrying=", "req/s=", "tokens=", "spend=", "eta="):
        assert all(field in x for x in lines), field
    assert lines[-1].startswith("[synth] done=60/60 ") and "failed=0" in lines[-1]

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["planned"] == 60 and summary["done"] == 60 and summary["failed"] == 0
    assert summary["exit_code"] == 0 and summary["stopped"] is None and summary["transport"] == "aiohttp"
    assert summary["requests"] == 60 and summary["tokens"]["completion"] == 60 * 20
    assert summary["elapsed_s"] > 0 and summary["req_per_s"] > 0
    assert "cost" in summary and summary["skipped_already_done"] == 0


def test_eta_counts_only_what_is_left():
    s = Snapshot(done=30, failed=10, skipped=100, retrying=2, requests=50, throttled=1, tokens=900, cost=0.01,
                 in_flight=4, limit=8, elapsed=20.0, total=200)
    assert s.eta_s == 30.0  # 60 left at 2 prompts/s (the 100 from an earlier run are not this run's pace)
    assert "eta=0:30" in plain_line(s) and "done=130/200" in plain_line(s)
    assert Snapshot(0, 0, 0, 0, 0, 0, 0, 0.0, 0, 8, 5.0, 200).eta_s is None
