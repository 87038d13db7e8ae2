"""Install, start and stop a local Label Studio (its own venv: label-studio pins its own dependencies)."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from curate.review import LS_VERSION, ReviewConfig, ReviewError, ServerDown

CREDENTIALS = "credentials.json"
PIDFILE = "ls.pid"
# Started as `python -c` so a venv that was moved into place (shebangs point at the old path) still works.
LAUNCH = "import sys; from label_studio.server import main; sys.argv[0] = 'label-studio'; sys.exit(main())"
# label-studio's get_env(X) falls back to the bare name X: stray HOST/PORT/... in the caller's env change the server.
UNSET = ("HOST", "PORT", "USERNAME", "PASSWORD", "USER_TOKEN", "DEBUG", "DJANGO_DB", "DATABASE_NAME")


@dataclass
class ServerInfo:
    url: str
    pid: int
    email: str
    credentials: Path
    started: bool   # False: an already running server was found


def install(venv: Path) -> Path:
    """pip install label-studio into `venv` if missing; built in a temp dir and renamed, so a crash leaves nothing half-made."""
    py = venv / "bin" / "python"
    if py.exists() and (venv / ".distillery-ok").exists():
        return py
    tmp = venv.with_name(venv.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    print(f"installing label-studio=={LS_VERSION} into {venv} (1-2 min, ~1 GB)", file=sys.stderr)
    log = tmp.parent / (venv.name + "-pip.log")
    with open(log, "w") as f:
        ok = subprocess.run([sys.executable, "-m", "venv", str(tmp)], stdout=f, stderr=f).returncode == 0 and \
            subprocess.run([str(tmp / "bin" / "python"), "-m", "pip", "install", f"label-studio=={LS_VERSION}"],
                           stdout=f, stderr=f).returncode == 0
    if not ok:
        raise ReviewError(f"pip install label-studio=={LS_VERSION} failed; see {log}")
    (tmp / ".distillery-ok").write_text(LS_VERSION)
    shutil.rmtree(venv, ignore_errors=True)
    os.replace(tmp, venv)
    return py


def health(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=timeout) as r:
            return r.status == 200
    except (OSError, urllib.error.URLError):
        return False


def alive(pid: int) -> bool:
    """Some thread not a zombie (the main thread turns Z first while others still hold the port)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for t in tasks:
        try:
            for line in open(f"/proc/{pid}/task/{t}/status"):
                if line.startswith("State:") and line.split()[1] != "Z":
                    return True
        except OSError:
            continue
    return False


def _is_ours(pid: int) -> bool:
    try:
        return b"label_studio.server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def load_credentials(data_dir: Path) -> dict:
    p = Path(data_dir) / CREDENTIALS
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {}


def _save_credentials(data_dir: Path, creds: dict) -> Path:
    p = Path(data_dir) / CREDENTIALS
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(creds, f, indent=1)
    os.chmod(p, 0o600)
    return p


def running(data_dir: Path) -> tuple[int, str] | None:
    """(pid, url) of the healthy server of this data dir, if any."""
    data_dir = Path(data_dir)
    try:
        pid = int((data_dir / PIDFILE).read_text())
    except (OSError, ValueError):
        return None
    url = load_credentials(data_dir).get("url", "")
    if alive(pid) and _is_ours(pid) and url and health(url):
        return pid, url
    return None


def _call(url: str, method: str, path: str, token: str) -> tuple[int, dict]:
    req = urllib.request.Request(url + path, method=method, headers={"Authorization": f"Token {token}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def serve(cfg: ReviewConfig) -> ServerInfo:
    """Start (or find) the server of cfg.data_dir; idempotent."""
    data = Path(cfg.data_dir).resolve()
    data.mkdir(parents=True, exist_ok=True)
    creds = load_credentials(data)
    found = running(data)
    if found:
        return ServerInfo(found[1], found[0], creds.get("email", ""), data / CREDENTIALS, False)
    py = install(Path(cfg.venv_dir).resolve())
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", cfg.port)) == 0:   # label-studio would silently move to port+1
            raise ReviewError(f"port {cfg.port} is already in use (pick another with --port)")
    # The user and legacy token exist only from the first start of a data dir; later starts reuse them.
    creds.setdefault("email", cfg.email)
    creds.setdefault("password", secrets.token_urlsafe(18))
    creds.setdefault("legacy_token", secrets.token_hex(20))
    url = f"http://127.0.0.1:{cfg.port}"
    creds["url"] = url
    _save_credentials(data, creds)
    env = {k: v for k, v in os.environ.items() if k not in UNSET and not k.startswith("LABEL_STUDIO_")}
    env.update(LABEL_STUDIO_BASE_DATA_DIR=str(data), DJANGO_DB="sqlite",
               LABEL_STUDIO_USERNAME=creds["email"], LABEL_STUDIO_PASSWORD=creds["password"],
               LABEL_STUDIO_USER_TOKEN=creds["legacy_token"], LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN="true",
               LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK="true", LABEL_STUDIO_DEBUG="false",
               SENTRY_DSN="", FRONTEND_SENTRY_DSN="", LATEST_VERSION_CHECK="false", COLLECT_ANALYTICS="false")
    log = open(data / "server.log", "ab")
    proc = subprocess.Popen([str(py), "-c", LAUNCH, "start", "--no-browser", "--internal-host", "127.0.0.1",
                             "--port", str(cfg.port), "--data-dir", str(data)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)   # not killed by the caller's ^C; stopped by `stop`
    (data / PIDFILE).write_text(str(proc.pid))
    try:
        t0 = time.time()
        while not health(url):
            if proc.poll() is not None:
                raise ServerDown(f"label-studio exited during start-up (code {proc.returncode}); see {data / 'server.log'}")
            if time.time() - t0 > cfg.start_timeout_s:
                raise ServerDown(f"label-studio not healthy after {cfg.start_timeout_s:.0f} s; see {data / 'server.log'}")
            time.sleep(0.25)
        if b"is in use" in (data / "server.log").read_bytes()[-4000:]:
            raise ReviewError(f"label-studio moved off port {cfg.port}; see {data / 'server.log'}")
        if not creds.get("pat"):
            st, body = _call(url, "POST", "/api/token/", creds["legacy_token"])
            if st != 201:
                raise ReviewError(f"could not create a personal access token (HTTP {st})")
            creds["pat"] = body["token"]   # only one PAT per user and it can't be read back: save it now
            _save_credentials(data, creds)
    except BaseException:
        stop(data)
        raise
    return ServerInfo(url, proc.pid, creds["email"], data / CREDENTIALS, True)


def stop(data_dir: Path, timeout: float = 10.0) -> bool:
    """SIGTERM the server of this data dir and wait; True if one was stopped."""
    data = Path(data_dir)
    try:
        pid = int((data / PIDFILE).read_text())
    except (OSError, ValueError):
        return False
    stopped = False
    if alive(pid) and _is_ours(pid):   # PIDs get recycled: only kill our own label-studio
        os.kill(pid, signal.SIGTERM)
        t0 = time.time()
        while alive(pid) and time.time() - t0 < timeout:
            time.sleep(0.1)
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
        try:
            os.waitpid(pid, os.WNOHANG)   # reap it when we are its parent (tests)
        except ChildProcessError:
            pass
        stopped = True
    (data / PIDFILE).unlink(missing_ok=True)
    return stopped
