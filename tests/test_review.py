"""Real Label Studio round trip: serve (own venv, cached at ~/.cache/distillery/ls-venv) → push → annotate via the
SDK as reviewers → pull → status. The first run on a fresh machine pays the install (~1-2 min) and migrations (~30 s)."""
from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from distillery.record import dumps
from curate.review import AuthError, ReviewConfig
from curate.review.client import connect, get_project
from curate.review.labeling import result_for
from curate.review.pull import pull, status
from curate.review.push import push
from curate.review.server import running, serve, stop

ROOT = Path(__file__).resolve().parents[1]
LS_VENV = Path(os.environ.get("DISTILLERY_LS_VENV", Path.home() / ".cache" / "distillery" / "ls-venv"))
PROJECT = "review test"
GOOD = "尊敬的赵老师，元宵佳节之际，恭祝您身体健康，阖家幸福，万事顺意！"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rec(i: int, n_reasons: int) -> dict:
    return {"id": f"d{i}", "instruction": "你现在是一个送祝福大师，帮我针对不同人和事情、节日送对应的祝福",
            "input": "祝赵老师元宵节快乐,严肃风格", "output": f"赵老师，元宵节快乐！愿您阖家团圆，身体安康。{i}",
            "meta": {"scene": "元宵节", "style": "严肃", "recipient": "赵老师", "constraint": "", "max_chars": 50},
            "curation": {"verdict": "doubtful", "reasons": [
                {"filter": "style", "detail": f"doubt {k}", "score": 0.5} for k in range(n_reasons)]}}


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("ls")
    cfg = ReviewConfig(data_dir=data, port=_free_port(), venv=LS_VENV)
    info = serve(cfg)
    try:
        yield cfg, info
    finally:
        stop(data)


@pytest.fixture(scope="session")
def ls(server):
    cfg, _ = server
    os.environ.pop("LABEL_STUDIO_URL", None)
    os.environ.pop("LABEL_STUDIO_API_KEY", None)
    return connect(cfg)


def _cli(*args, env=None):
    e = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "curate.review", *args], cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=120)


def test_serve_is_idempotent_and_keeps_token_private(server):
    cfg, info = server
    creds = cfg.data_dir / "credentials.json"
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    pat = json.loads(creds.read_text())["pat"]
    r = _cli("serve", "--data-dir", str(cfg.data_dir), "--port", str(cfg.port), "--venv", str(LS_VENV))
    assert r.returncode == 0, r.stderr
    assert "already running" in r.stdout and info.url in r.stdout
    assert pat not in r.stdout + r.stderr
    assert running(cfg.data_dir)[0] == info.pid


def test_round_trip(server, ls, tmp_path):
    cfg, _ = server
    d = tmp_path / "run"
    d.mkdir()
    recs = [_rec(i, n) for i, n in enumerate([1, 3, 2, 1, 2, 0])]
    (d / "doubtful.jsonl").write_text("".join(dumps(r) + "\n" for r in recs), encoding="utf-8")

    r1 = push(ls, d, PROJECT, cfg)
    assert (r1.created, r1.already_present) == (6, 0)
    r2 = _cli("push", str(d), "--project", PROJECT, "--data-dir", str(cfg.data_dir))
    assert r2.returncode == 0 and "0 tasks created, 6 already there" in r2.stdout, r2.stdout + r2.stderr

    project = get_project(ls, PROJECT)
    tasks = list(ls.tasks.list(project=project.id, fields="all"))
    assert len(tasks) == 6
    by_sid = {t.data["sample_id"]: t for t in tasks}
    # most uncertain first: d1 (3 reasons) got the first task id, d5 (0 reasons) the last
    order = [t.data["sample_id"] for t in sorted(tasks, key=lambda t: t.id)]
    assert order[0] == "d1" and order[-1] == "d5"
    # the teacher output is pre-filled in the editable box through a prediction
    pred = by_sid["d0"].predictions[0]
    pred = pred if isinstance(pred, dict) else pred.model_dump(mode="json")
    assert pred["result"][0]["value"]["text"] == [recs[0]["output"]]

    other = ls.users.create(username="second", email="second@example.com", password="second-pass-123")
    ls.annotations.create(id=by_sid["d0"].id, result=result_for("approve"))
    ls.annotations.create(id=by_sid["d1"].id, result=result_for("approve-with-edit", GOOD))
    ls.annotations.create(id=by_sid["d2"].id, result=result_for("approve-with-edit", GOOD * 4))   # breaks max_chars
    ls.annotations.create(id=by_sid["d3"].id, result=result_for("reject", reasons=["wrong style or tone"]))
    ls.annotations.create(id=by_sid["d4"].id, result=result_for("approve"))
    ls.annotations.create(id=by_sid["d4"].id, result=result_for("reject", reasons=["other"]), completed_by=other.id)

    r = _cli("pull", "--project", PROJECT, "--into", str(d), "--data-dir", str(cfg.data_dir))
    assert r.returncode == 0, r.stderr
    assert "approved 1, approved with edit 1, rejected 1, edit failed re-check 1, conflicts 1, pending 1" in r.stdout

    read = lambda name: [json.loads(x) for x in (d / name).read_text(encoding="utf-8").splitlines()]  # noqa: E731
    approved, rejected, doubtful = read("approved.jsonl"), read("rejected.jsonl"), read("doubtful.jsonl")
    assert sorted(x["id"] for x in approved) == ["d0", "d1"]
    a1 = next(x for x in approved if x["id"] == "d1")
    assert a1["output"] == GOOD and a1["meta"]["provenance"]["original_output"] == recs[1]["output"]
    assert a1["meta"]["provenance"]["review"]["decision"] == "approve-with-edit"
    a0 = next(x for x in approved if x["id"] == "d0")
    assert a0["output"] == recs[0]["output"] and a0["meta"]["provenance"]["review"]["reviewer"]
    assert a0["curation"]["verdict"] == "approved"
    assert [x["id"] for x in rejected] == ["d3"]
    assert rejected[0]["meta"]["provenance"]["review"]["reason"] == "wrong style or tone"
    assert sorted(x["id"] for x in doubtful) == ["d2", "d4", "d5"]
    d2 = next(x for x in doubtful if x["id"] == "d2")
    assert d2["curation"]["reasons"][-1]["filter"] == "review" and "length" in d2["curation"]["reasons"][-1]["detail"]
    assert d2["meta"]["provenance"]["original_output"] == recs[2]["output"]
    assert "conflict d4:" in r.stdout

    before = {n: (d / n).read_bytes() for n in ("approved.jsonl", "rejected.jsonl", "doubtful.jsonl")}
    again = pull(ls, project, d)
    assert (again.approved, again.edited, again.rejected, again.edit_failed) == (0, 0, 0, 0)
    assert {n: (d / n).read_bytes() for n in before} == before

    st = status(ls, project)
    assert (st.tasks, st.reviewed, st.pending, len(st.conflicts)) == (6, 4, 1, 1)
    assert len(st.per_reviewer) == 2


def test_bad_token_is_one_line(server):
    cfg, info = server
    r = _cli("status", "--project", PROJECT, "--data-dir", str(cfg.data_dir),
             env={"LABEL_STUDIO_URL": info.url, "LABEL_STUDIO_API_KEY": "not-a-valid-token-123"})
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "rejected the API key" in r.stderr
    assert "not-a-valid-token-123" not in r.stdout + r.stderr


def test_unknown_project_and_server_down(server, tmp_path):
    cfg, _ = server
    r = _cli("status", "--project", "no such project", "--data-dir", str(cfg.data_dir))
    assert r.returncode == 2 and r.stderr.strip() == "error: no Label Studio project titled 'no such project'"
    r = _cli("status", "--project", PROJECT, "--data-dir", str(tmp_path),
             env={"LABEL_STUDIO_URL": f"http://127.0.0.1:{_free_port()}", "LABEL_STUDIO_API_KEY": "x" * 20})
    assert r.returncode == 2 and "not reachable" in r.stderr and r.stderr.strip().count("\n") == 0
