"""Benchmark `python -m curate release` on N curated synthetic records (default 200,000): wall time and peak RSS.

    .venv/bin/python bench/release_bench.py [--records 200000] [--data FILE] [--json out.json]

The records are curate_bench.py's (synth-shaped, ~1.5 KB a line), each given an approved curation verdict directly
(so all N are released, whatever the filters say); `--data FILE` reuses (or writes once) them. The release runs as a
subprocess into a temporary --root; its peak RSS is sampled every 0.1 s from /proc and also read from ru_maxrss.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import orjson  # noqa: E402
from curate_bench import _tree_rss_kib, emit, generate  # noqa: E402

from distillery.record import dumps  # noqa: E402


def write_curated(n: int, path: Path) -> None:
    """curate_bench's n records, each approved (config_hash varies so the manifest counts more than one)."""
    raw = path.with_name(path.name + ".raw")
    generate(n, raw)
    with open(raw, "rb") as f, open(path, "w", encoding="utf-8") as out:
        for i, line in enumerate(f):
            rec = orjson.loads(line)
            rec["curation"] = {"verdict": "approved", "reasons": [], "config_hash": f"bench-{i % 3}"}
            out.write(dumps(rec) + "\n")
    raw.unlink()


def run_release(data: Path, root: Path) -> dict:
    cmd = [sys.executable, "-m", "curate", "release", str(data), "--name", "bench", "--root", str(root)]
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    while p.poll() is None:
        peak = max(peak, _tree_rss_kib(p.pid))
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    out, err = p.communicate()
    if p.returncode != 0:
        sys.exit(f"curate release failed ({p.returncode}): {err[-2000:]}")
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"command": " ".join(cmd[1:]), "wall_s": round(wall, 2), "peak_rss_sampled_mib": round(peak / 1024, 1),
            "peak_rss_mib": round(ru.ru_maxrss / 1024, 1), "cpu_s": round(ru.ru_utime + ru.ru_stime, 1),
            "load_avg_1min_before": load_before, "output": out.strip()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--data", help="reuse this curated file (made if missing)")
    ap.add_argument("--json", help="also write the result as JSON to this file")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else Path(tmp) / "curated.jsonl"
        if not data.exists():
            write_curated(args.records, data)
        res = run_release(data, Path(tmp) / "releases")
        res.update({"records": args.records, "data_mib": round(data.stat().st_size / 2**20, 1),
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
    emit(res, args.json)


if __name__ == "__main__":
    main()
