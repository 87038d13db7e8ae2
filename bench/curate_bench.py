"""Benchmark `python -m curate run` on N synthetic short Chinese records (default 1,000,000).

    .venv/bin/python bench/curate_bench.py [--records 1000000] [--workers 2] [--data FILE] [--json out.json]

The records are shaped like synth's: meta (prompt, examples, teacher, usage, …) from the blessing recipe's planned
prompts, and an output that is a reference blessing of the same scene × style within the prompt's cap, with 30% of
its Chinese characters replaced by others of the corpus so that dedup does not collapse everything (5% of the records
start from a defect of the gallery instead). Then ~3% repeat an earlier output exactly (up to punctuation) and ~4%
with one character changed (near duplicates). The whole chain runs as a subprocess; peak memory is the RSS summed over
its process tree (the workers included), sampled every 0.25 s; the share of CPU busy in the second before and the load
average are recorded, since the box may be shared. `--data FILE` reuses (or writes once) the records.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from curate.filters import PARTICLES, TRADITIONAL  # noqa: E402
from distillery.io import Located, read_records  # noqa: E402
from distillery.record import dumps  # noqa: E402
from distillery.text import char_count  # noqa: E402
from synth.plan import iter_plan  # noqa: E402
from synth.recipe import load_recipe  # noqa: E402

EXACT_SHARE, NEAR_SHARE, DEFECT_SHARE, MUTATE = 0.03, 0.04, 0.05, 0.3


def _load(path: Path) -> list[dict]:
    return [x.record for x in read_records(path) if isinstance(x, Located)]


def _synth_meta(prompt, i: int) -> dict:
    """meta as synth.run writes it for one sample of a planned prompt (teacher fields fixed: they are not read)."""
    return {**prompt.meta, "teacher": {"model": "bench-teacher", "temperature": 0.9, "top_p": 0.95, "max_tokens": 256,
                                       "n": 1},
            "usage": {"prompt_tokens": 180, "completion_tokens": 40}, "latency_s": 1.2345, "finish_reason": "stop",
            "attempts": 1, "created_at": "2026-11-28T10:00:00Z", "choice_index": 0,
            "provenance": {"source": "teacher", "run": "bench"}}


def generate(n: int, path: Path, seed: int = 7) -> Counter:
    """Write n records to path; return how many of each kind were made."""
    rnd = random.Random(seed)
    good = _load(ROOT / "dataset/reference/blessings.jsonl")
    bad = _load(ROOT / "dataset/reference/defects.jsonl")
    plan = list(iter_plan(load_recipe(ROOT / "dataset/recipes/blessing.toml"), seed))
    pool = sorted({ch for r in good for ch in r["output"]
                   if "\u4e00" <= ch <= "\u9fff" and ch not in TRADITIONAL and ch not in PARTICLES})
    by_cell: dict = {}
    for r in good:  # outputs written for the planned prompt's cell and within its cap, as a teacher's mostly are
        for cap in sorted({x["meta"]["max_chars"] for x in good}):
            if char_count(r["output"]) < cap:
                by_cell.setdefault((r["meta"]["scene"], r["meta"]["style"], cap), []).append(r["output"])
                by_cell.setdefault((r["meta"]["scene"], cap), []).append(r["output"])
    all_good = [r["output"] for r in good]
    kinds: Counter = Counter()
    outputs: list[str] = []

    def mutate(text: str, rate: float) -> str:
        chars = list(text)
        last = len(chars) - 1
        for i, ch in enumerate(chars):
            # Keep the final particle (小红书 checks it) and anything that is not a Chinese character.
            if "\u4e00" <= ch <= "\u9fff" and not (i == last and ch in PARTICLES) and rnd.random() < rate:
                chars[i] = rnd.choice(pool)
        return "".join(chars)

    with open(path, "w", encoding="utf-8", buffering=1 << 20) as f:
        for i in range(n):
            prompt = plan[i % len(plan)]
            m = prompt.meta
            cell = by_cell.get((m["scene"], m["style"], m["max_chars"])) or by_cell.get((m["scene"], m["max_chars"]))
            u = rnd.random()
            if outputs and u < EXACT_SHARE:
                kind, out = "exact-dup", outputs[rnd.randrange(len(outputs))].replace("！", "。")
            elif outputs and u < EXACT_SHARE + NEAR_SHARE:
                kind, out = "near-dup", outputs[rnd.randrange(len(outputs))]
                j = rnd.randrange(len(out))
                out = out[:j] + rnd.choice(pool) + out[j + 1:]
            elif u < EXACT_SHARE + NEAR_SHARE + DEFECT_SHARE:
                kind, out = "defect", mutate(rnd.choice(bad)["output"], MUTATE / 3)
            else:
                kind, out = "good", mutate(rnd.choice(cell or all_good), MUTATE)
            outputs.append(out)
            kinds[kind] += 1
            rec = {"id": f"{prompt.id}-b{i}", "instruction": prompt.instruction, "input": prompt.input,
                   "output": out, "meta": _synth_meta(prompt, i)}
            f.write(dumps(rec) + "\n")
    return kinds


def _tree_rss_kib(root: int) -> int:
    """Resident memory of a process and all its descendants (the curate process and its workers), KiB."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{d}/statm") as f:
                rss[int(d)] = int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total


def _cpu_busy(seconds: float = 1.0) -> float:
    """Share of all CPUs busy over the next `seconds` (from /proc/stat), before the chain starts."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait
    t0, i0 = sample()
    time.sleep(seconds)
    t1, i1 = sample()
    return round(1 - (i1 - i0) / max(t1 - t0, 1), 3)


def run_chain(data: Path, out: Path, workers: int | None) -> dict:
    cmd = [sys.executable, "-m", "curate", "run", str(data), "--out", str(out)]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    busy_before = _cpu_busy()  # the box may be shared: how busy it was just before, and the load average
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak_tree = 0
    while p.poll() is None:  # sample the whole process tree: ru_maxrss only knows the largest single process
        peak_tree = max(peak_tree, _tree_rss_kib(p.pid))
        time.sleep(0.25)
    wall = time.perf_counter() - t0
    err = p.stderr.read()
    if p.returncode != 0:
        sys.exit(f"curate run failed ({p.returncode}): {err[-2000:]}")
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)  # max over the children waited for so far
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    return {"command": " ".join(cmd[1:]), "wall_s": round(wall, 2), "cpu_busy_before": busy_before,
            "load_avg_1min_before": load_before, "load_avg_1min_after": os.getloadavg()[0],
            "peak_rss_tree_mib": round(peak_tree / 1024, 1), "peak_rss_largest_process_mib": round(ru.ru_maxrss / 1024, 1),
            "cpu_s": round(ru.ru_utime + ru.ru_stime, 1), "counts": report["counts"], "valid": report["valid"],
            "filters": report["filters"]}


def emit(res: dict, json_path: str | None) -> None:
    """The result on stdout, and into `json_path` when given (--json)."""
    text = json.dumps(res, ensure_ascii=False, indent=2)
    print(text)
    if json_path:
        Path(json_path).write_text(text + "\n", encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--workers", type=int, default=None, help="passed to curate run (default: its own default)")
    ap.add_argument("--data", help="reuse this generated file (made if missing)")
    ap.add_argument("--keep", help="write the curated output here instead of a temporary directory")
    ap.add_argument("--json", help="also write the result as JSON to this file")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else Path(tmp) / "bench.jsonl"
        t0 = time.perf_counter()
        kinds = generate(args.records, data) if not data.exists() else "reused"
        gen_s = time.perf_counter() - t0
        res = run_chain(data, Path(args.keep or Path(tmp) / "out"), args.workers)
    res.update({"records": args.records, "generated": kinds, "generate_s": round(gen_s, 1),
                "records_per_s": round(res["valid"] / res["wall_s"]), "cpus_usable": len(os.sched_getaffinity(0)),
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
    emit(res, args.json)


if __name__ == "__main__":
    main()
