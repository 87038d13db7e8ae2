"""Benchmark the Label Studio review loop (issue #5): serve start-up, push and pull of N doubtful samples.

    .venv/bin/python bench/review_bench.py --n 10000 --out review_bench.json

Steps, each timed on its own (wall seconds):
  install      pip install of label-studio into --venv, only when that venv is missing (not part of "first start")
  first start  `serve` on an empty data dir: migrations, user, token, PAT, until /health answers
  restart      stop (SIGTERM) and `serve` again on the same data dir
  push         N doubtful records → a new project (default batch size), and the same push again (all N skipped)
  pull         N tasks with annotations → approved / rejected / doubtful files. The annotations are made through the
               API, in bulk: the same N tasks are imported into a second project with one annotation each (50 %
               approve, 20 % approve-with-edit, 20 % reject, 10 % none); pull reads that project.
Also: the server's peak RSS (VmHWM) at the end. The server and this script share the machine's cores.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import label_studio_sdk  # noqa: E402,F401  (its import takes seconds and must not count as push time)
from curate.review import ReviewConfig  # noqa: E402
from curate.review.client import connect, get_project  # noqa: E402
from curate.review.labeling import result_for, task_for  # noqa: E402
from curate.review.pull import pull  # noqa: E402
from curate.review.push import push  # noqa: E402
from curate.review.server import install, serve, stop  # noqa: E402
from distillery.record import dumps  # noqa: E402

DEFAULT_VENV = Path(os.environ.get("DISTILLERY_LS_VENV", Path.home() / ".cache" / "distillery" / "ls-venv"))
SCENES = ["元宵节", "春节", "生日", "中秋节", "升学", "乔迁"]
STYLES = ["严肃", "幽默", "小红书", "文艺"]
EDIT = "尊敬的赵老师，元宵佳节之际，恭祝您身体健康，阖家幸福，万事顺意！"


def doubtful_record(i: int) -> dict:
    scene, style = SCENES[i % len(SCENES)], STYLES[i % len(STYLES)]
    return {"id": f"b{i:06d}", "instruction": "你现在是一个送祝福大师，帮我针对不同人和事情、节日送对应的祝福",
            "input": f"祝赵老师{scene}快乐,{style}风格",
            "output": f"赵老师，{scene}快乐！愿您阖家团圆，身体安康。（{i}）",
            "meta": {"scene": scene, "style": style, "recipient": "赵老师", "constraint": "", "max_chars": 60},
            "curation": {"verdict": "doubtful", "reasons": [
                {"filter": "style", "detail": f"style score low ({i % 7})", "score": round(0.3 + (i % 7) / 10, 2)}]}}


def annotation_for(i: int) -> list[dict] | None:
    k = i % 10
    if k < 5:
        return result_for("approve")
    if k < 7:
        return result_for("approve-with-edit", EDIT)
    if k < 9:
        return result_for("reject", reasons=["wrong style or tone"])
    return None


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - t0, 2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10000, help="doubtful samples to push and pull")
    ap.add_argument("--port", type=int, default=18765)
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="Label Studio's venv (installed if missing)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here too")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="review-bench-"))
    data = work / "ls"
    res: dict = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "n": args.n,
                 "machine": f"{platform.node()} {os.cpu_count()} cores, {platform.python_version()}",
                 "load_avg_start": os.getloadavg()}
    cfg = ReviewConfig(data_dir=data, port=args.port, venv=args.venv)
    try:
        if not (args.venv / ".distillery-ok").exists():
            _, res["install_s"] = timed(lambda: install(args.venv.resolve()))
        _, res["first_start_s"] = timed(lambda: serve(cfg))
        stop(data)
        info, res["restart_s"] = timed(lambda: serve(cfg))
        print(f"first start {res['first_start_s']} s, restart {res['restart_s']} s", file=sys.stderr)

        src = work / "curated"
        src.mkdir()
        (src / "doubtful.jsonl").write_text("".join(dumps(doubtful_record(i)) + "\n" for i in range(args.n)),
                                            encoding="utf-8")
        ls = connect(cfg)
        r, res["push_s"] = timed(lambda: push(ls, src, "bench push", cfg))
        assert r.created == args.n, r
        r, res["push_again_s"] = timed(lambda: push(ls, src, "bench push", cfg))
        assert (r.created, r.already_present) == (0, args.n), r
        print(f"push {res['push_s']} s, again {res['push_again_s']} s", file=sys.stderr)

        # the reviewers' work, made in bulk through the import API (one annotation per task on 90 % of them)
        annotated = ls.projects.create(title="bench pull", label_config=ls.projects.get(id=r.project_id).label_config)
        tasks = []
        for i in range(args.n):
            t = task_for(doubtful_record(i))
            ann = annotation_for(i)
            if ann:
                t["annotations"] = [{"result": ann}]
            tasks.append(t)
        _, res["annotate_import_s"] = timed(lambda: [
            ls.projects.import_tasks(id=annotated.id, request=tasks[k:k + 1000], request_options={"max_retries": 0})
            for k in range(0, len(tasks), 1000)])
        o, res["pull_s"] = timed(lambda: pull(ls, get_project(ls, "bench pull"), src))
        res["pull_outcome"] = {"approved": o.approved, "edited": o.edited, "rejected": o.rejected,
                               "edit_failed": o.edit_failed, "pending": o.pending, "conflicts": len(o.conflicts)}
        print(f"pull {res['pull_s']} s: {res['pull_outcome']}", file=sys.stderr)
        res["server_peak_rss_mb"] = peak_rss_mb(info.pid)
        res["load_avg_end"] = os.getloadavg()
    finally:
        stop(data)
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(res, ensure_ascii=False, indent=1))
    if args.out:
        args.out.write_text(json.dumps(res, ensure_ascii=False, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
