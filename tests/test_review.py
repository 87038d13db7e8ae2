"""Real Label Studio round trip: serve (own venv, cached at ~/.cache/distillery/ls-venv) → push → annotate via the
SDK as reviewers → pull → status; push resumed after the server is killed mid-way; the labeling page in headless
Chromium. The first run on a fresh machine pays the install (~1-2 min) and migrations (~30 s).

The tests share the session's server (tests/conftest.py, also used by test_e2e.py); test_push_survives_server_kill
kills it and serves it again before it ends.
The browser test needs Debian's chromium + chromium-driver (the README set-up installs them); it fails without them
unless DISTILLERY_NO_BROWSER=1. DISTILLERY_UPDATE_SCREENSHOT=1 makes it refresh docs/review-labeling.png."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from distillery.record import dumps
from curate.review import ReviewConfig
from curate.review.client import connect, get_project
from curate.review.labeling import result_for
from curate.review.pull import _context, _recheck, _why_rejected, folder_config, pull, status
from curate.review.push import existing_ids, push
from curate.review.server import alive, running, serve

ROOT = Path(__file__).resolve().parents[1]
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


def _write_doubtful(d: Path, n: int) -> list[str]:
    d.mkdir(parents=True, exist_ok=True)
    recs = [_rec(i, 1 + i % 3) for i in range(n)]
    (d / "doubtful.jsonl").write_text("".join(dumps(r) + "\n" for r in recs), encoding="utf-8")
    return [r["id"] for r in recs]


def _sample_ids(ls, title: str) -> Counter:
    """How many tasks of project `title` carry each sample id."""
    project = get_project(ls, title)
    return Counter(t.data["sample_id"] for t in ls.tasks.list(project=project.id, fields="task_only",
                                                              include="id,data", page_size=1000))


def _cli(*args, env=None):
    e = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "curate.review", *args], cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=120)


def test_serve_is_idempotent_and_keeps_token_private(server):
    cfg, info = server
    creds = cfg.data_dir / "credentials.json"
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    pat = json.loads(creds.read_text())["pat"]
    r = _cli("serve", "--data-dir", str(cfg.data_dir), "--port", str(cfg.port), "--venv", str(cfg.venv))
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
    assert "re-checked with CurateConfig defaults (no report.json)" in r.stdout

    read = lambda name: [json.loads(x) for x in (d / name).read_text(encoding="utf-8").splitlines()]  # noqa: E731
    approved, rejected, doubtful = read("approved.jsonl"), read("rejected.jsonl"), read("doubtful.jsonl")
    assert sorted(x["id"] for x in approved) == ["d0", "d1"]
    a1 = next(x for x in approved if x["id"] == "d1")
    assert a1["output"] == GOOD and a1["meta"]["provenance"]["original_output"] == recs[1]["output"]
    assert a1["meta"]["provenance"]["review"]["decision"] == "approve-with-edit"
    # the edit's curation is the re-check of the edited text (the old reasons were about the old text), kept apart
    cfg_defaults, _ = folder_config({})
    [fresh] = _recheck([{**recs[1], "output": GOOD}], _context(cfg_defaults))
    assert a1["curation"] == {**fresh, "verdict": "approved"}
    assert not any(x["detail"].startswith("doubt") for x in a1["curation"]["reasons"])
    assert a1["meta"]["provenance"]["original_curation"] == recs[1]["curation"]
    a0 = next(x for x in approved if x["id"] == "d0")
    assert a0["output"] == recs[0]["output"] and a0["meta"]["provenance"]["review"]["reviewer"]
    assert a0["curation"]["verdict"] == "approved"
    assert [x["id"] for x in rejected] == ["d3"]
    assert rejected[0]["meta"]["provenance"]["review"]["reason"] == "wrong style or tone"
    assert sorted(x["id"] for x in doubtful) == ["d2", "d4", "d5"]
    d2 = next(x for x in doubtful if x["id"] == "d2")
    assert d2["curation"]["reasons"][-1]["filter"] == "review" and "length" in d2["curation"]["reasons"][-1]["detail"]
    assert d2["meta"]["provenance"]["original_output"] == recs[2]["output"]
    assert d2["meta"]["provenance"]["original_curation"] == recs[2]["curation"]
    assert "length" in [x["filter"] for x in d2["curation"]["reasons"][:-1]]   # the re-check of the edited text
    assert not any(x["detail"].startswith("doubt") for x in d2["curation"]["reasons"])
    assert "conflict d4:" in r.stdout
    # report.json/html recounted from the files, with the review block
    report = json.loads((d / "report.json").read_text(encoding="utf-8"))
    assert report["counts"] == {"approved": len(approved), "doubtful": len(doubtful), "rejected": len(rejected)}
    assert {k: v for k, v in report["review"].items() if k not in ("pulled_at", "config")} == \
        {"approved": 1, "edited": 1, "rejected": 1, "edit_failed": 1, "pending": 1, "conflicts": 1}
    assert report["review"]["pulled_at"] and "after review" in (d / "report.html").read_text(encoding="utf-8")

    before = {n: (d / n).read_bytes() for n in ("approved.jsonl", "rejected.jsonl", "doubtful.jsonl")}
    again = pull(ls, project, d)
    assert (again.approved, again.edited, again.rejected, again.edit_failed) == (0, 0, 0, 0)
    assert {n: (d / n).read_bytes() for n in before} == before

    st = status(ls, project)
    assert (st.tasks, st.reviewed, st.pending, len(st.conflicts)) == (6, 4, 1, 1)
    assert len(st.per_reviewer) == 2


def test_edit_recheck_uses_the_folders_config(tmp_path):
    """No server needed: a folder curated with fragment_min_chars = 40 (--config TOML) flags an edit of 33 字 that
    the defaults pass."""
    from curate.config import load_config
    from curate.pipeline import run
    toml = tmp_path / "curate.toml"
    toml.write_text("fragment_min_chars = 40\n", encoding="utf-8")
    src = tmp_path / "in.jsonl"
    rec = {k: v for k, v in _rec(0, 0).items() if k != "curation"}
    src.write_text(dumps(rec) + "\n", encoding="utf-8")
    run([str(src)], tmp_path / "out", load_config(toml), workers=0)
    report = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    assert report["config"]["fragment_min_chars"] == 40

    edited = {**rec, "output": GOOD}
    cfg, source = folder_config(report)
    assert source == "the folder's config (report.json)" and cfg.fragment_min_chars == 40
    [cur] = _recheck([edited], _context(cfg))
    why = _why_rejected(cur)
    assert why and why.startswith("length: fragment")
    assert cur["config_hash"] == cfg.config_hash()
    defaults, source = folder_config({}, "no report.json")
    assert source == "CurateConfig defaults (no report.json)"
    [cur] = _recheck([edited], _context(defaults))
    assert _why_rejected(cur) is None and cur["config_hash"] == defaults.config_hash()


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
    _write_doubtful(tmp_path / "short", 1)
    r = _cli("push", str(tmp_path / "short"), "--project", "ab", "--data-dir", str(cfg.data_dir))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert r.stderr.startswith("error: Label Studio answered HTTP 400") and "at least 3 characters" in r.stderr


def _chromium(profile: Path):
    """A headless Chromium driven by selenium through Debian's chromedriver (no selenium-manager download)."""
    if os.environ.get("DISTILLERY_NO_BROWSER") == "1":
        pytest.skip("DISTILLERY_NO_BROWSER=1")
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (browser and driver):
        pytest.fail("chromium and chromedriver are needed for the browser check: run the README set-up command "
                    "(it apt-installs chromium chromium-driver), or set DISTILLERY_NO_BROWSER=1 to skip it")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    # without the background-networking flags Chromium's own connections are refused in a closed network
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1000", f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=opts)


def test_labeling_page_in_a_real_browser(server, ls, tmp_path):
    """The teacher output is pre-filled and visible on first view, editable, and the edit comes back through pull."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    cfg, info = server
    d = tmp_path / "browser"
    d.mkdir()
    rec = _rec(0, 2)
    (d / "doubtful.jsonl").write_text(dumps(rec) + "\n", encoding="utf-8")
    pushed = push(ls, d, "browser check", cfg)
    task_id = existing_ids(ls, pushed.project_id)[rec["id"]]
    creds = json.loads((cfg.data_dir / "credentials.json").read_text())

    drv = _chromium(tmp_path / "chromium-profile")
    try:
        wait = WebDriverWait(drv, 90)
        drv.get(info.url + "/user/login/")
        drv.find_element(By.NAME, "email").send_keys(creds["email"])
        drv.find_element(By.NAME, "password").send_keys(creds["password"] + Keys.ENTER)
        wait.until(lambda b: "/user/login" not in b.current_url)
        drv.get(f"{info.url}/projects/{pushed.project_id}/data?task={task_id}")
        box = wait.until(EC.visibility_of_element_located((By.CSS_SELECTOR, "[data-testid=htx-textbox-content]")))
        assert box.text == rec["output"]   # pre-filled, no click needed
        shot = tmp_path / "review-labeling.png"
        drv.save_screenshot(str(shot))
        assert 20_000 < shot.stat().st_size < 400_000
        if os.environ.get("DISTILLERY_UPDATE_SCREENSHOT") == "1":
            shutil.copy(shot, ROOT / "docs" / "review-labeling.png")

        drv.find_element(By.CSS_SELECTOR, "[data-testid=htx-textbox-edit-button]").click()
        area = wait.until(EC.visibility_of_element_located((By.CSS_SELECTOR, "[data-testid=htx-textbox-input]")))
        area.send_keys(Keys.CONTROL, "a")
        area.send_keys(GOOD)
        assert area.get_attribute("value") == GOOD
        drv.find_element(By.CSS_SELECTOR, "[data-testid=htx-textbox-save]").click()
        wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "[data-testid=htx-textbox-content]").text == GOOD)
        drv.find_element(By.XPATH, "//input[@name='approve-with-edit']/ancestor::label").click()
        drv.find_element(By.XPATH, "//button[normalize-space()='Submit']").click()
        wait.until(lambda b: ls.annotations.list(id=task_id))
    finally:
        drv.quit()

    o = pull(ls, get_project(ls, "browser check"), d)
    assert (o.edited, o.pending) == (1, 0)
    approved = json.loads((d / "approved.jsonl").read_text(encoding="utf-8"))
    assert approved["output"] == GOOD and approved["meta"]["provenance"]["original_output"] == rec["output"]

class DropOneImportResponse(BaseHTTPRequestHandler):
    """Reverse proxy to the real server that forwards the n-th task import, lets the server commit it, then hangs up
    without answering: the client sees a failure although the tasks are in (the ambiguous case push must handle)."""

    upstream = ""
    drop_import_no = 2
    imports: list = []   # (number, dropped) per import POST

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection", "content-length")}
        r = httpx.request(self.command, self.upstream + self.path, headers=headers, content=body, timeout=120)
        if self.command == "POST" and "/import" in self.path:
            no = len(self.imports) + 1
            self.imports.append((no, no == self.drop_import_no))
            if no == self.drop_import_no:
                self.close_connection = True
                return
        self.send_response(r.status_code)
        for k, v in r.headers.items():
            if k.lower() not in ("transfer-encoding", "content-encoding", "content-length", "connection"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(r.content)))
        self.end_headers()
        self.wfile.write(r.content)

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _forward

    def log_message(self, *args) -> None:
        pass


def test_push_checks_by_id_after_an_ambiguous_failure(server, ls, tmp_path, monkeypatch):
    cfg, info = server
    DropOneImportResponse.upstream, DropOneImportResponse.imports = info.url, []
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), DropOneImportResponse)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("LABEL_STUDIO_URL", f"http://127.0.0.1:{proxy.server_port}")
        ids = _write_doubtful(tmp_path / "amb", 30)
        via_proxy = connect(ReviewConfig(data_dir=cfg.data_dir, batch_size=10))
        r = push(via_proxy, tmp_path / "amb", "ambiguous import", ReviewConfig(data_dir=cfg.data_dir, batch_size=10))
    finally:
        proxy.shutdown()
        proxy.server_close()
    # batch 2 was committed but its answer lost: found by id, counted, and not sent again
    assert DropOneImportResponse.imports == [(1, False), (2, True), (3, False)]
    assert r.created == 30
    assert _sample_ids(ls, "ambiguous import") == Counter({i: 1 for i in ids})


def test_push_survives_server_kill(server, ls, tmp_path):
    """SIGKILL the server's process group mid-push: push fails in one line, exit 1. serve again, push again: every
    id exactly once."""
    cfg, info = server
    ids = _write_doubtful(tmp_path / "kill", 400)
    title = "killed mid-push"
    proc = subprocess.Popen([sys.executable, "-m", "curate.review", "push", str(tmp_path / "kill"), "--project", title,
                             "--batch-size", "10", "--data-dir", str(cfg.data_dir)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith("pushed 100/400"):
            pid = running(cfg.data_dir)[0]
            os.killpg(pid, signal.SIGKILL)   # serve starts it in its own session: pgid == pid
            try:
                os.waitpid(pid, 0)           # our child when serve ran in this process: reap it
            except ChildProcessError:
                pass
            for _ in range(100):
                if not alive(pid):
                    break
                time.sleep(0.05)
            break
    rest = proc.stderr.read()
    proc.wait(timeout=60)
    err = "".join(seen) + rest
    assert proc.returncode == 1, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: Label Studio stopped answering during push into 'killed mid-push'"), err
    assert "re-run push" in last

    restarted = serve(cfg)
    assert restarted.started and restarted.url == info.url
    before = _sample_ids(ls, title)
    assert 100 <= sum(before.values()) < 400 and max(before.values()) == 1

    r = _cli("push", str(tmp_path / "kill"), "--project", title, "--batch-size", "10", "--data-dir", str(cfg.data_dir))
    assert r.returncode == 0, r.stderr
    assert f"{400 - len(before)} tasks created, {len(before)} already there" in r.stdout
    assert _sample_ids(ls, title) == Counter({i: 1 for i in ids})   # no duplicate, no loss
