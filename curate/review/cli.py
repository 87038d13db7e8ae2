"""`python -m curate.review {serve,stop,push,pull,status}`.

Exit codes: 0 ok; 1 push interrupted mid-way (the server went away: restart it, run push again, it resumes);
2 a ReviewError or a lost connection (one line, no traceback).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from curate.review import ReviewConfig, ReviewError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=".labelstudio", help="server data, pid file and credentials.json")


def add_arguments(sub) -> None:
    """Add the review sub-commands to an argparse subparsers object."""
    p = sub.add_parser("serve", help="install (own venv) and start a local Label Studio; idempotent")
    _common(p)
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--venv", default=None, help="Label Studio's venv (default <data-dir>/venv)")
    p.add_argument("--show-token", action="store_true", help="print the API key (otherwise see credentials.json)")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("stop", help="stop the server of --data-dir (SIGTERM, wait)")
    _common(p)
    p.set_defaults(func=cmd_stop)
    p = sub.add_parser("push", help="DIR/doubtful.jsonl → tasks, most uncertain first; skips ids already there")
    _common(p)
    p.add_argument("dir")
    p.add_argument("--project", required=True)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=ReviewConfig.batch_size, help="tasks per import POST")
    p.set_defaults(func=cmd_push)
    p = sub.add_parser("pull", help="annotations → DIR/{approved,rejected,doubtful}.jsonl; idempotent")
    _common(p)
    p.add_argument("--project", required=True)
    p.add_argument("--into", required=True)
    p.set_defaults(func=cmd_pull)
    p = sub.add_parser("status", help="reviewed / pending / conflicts, per reviewer")
    _common(p)
    p.add_argument("--project", required=True)
    p.set_defaults(func=cmd_status)


def add_review_parser(subparsers) -> None:
    """For curate/cli.py: `curate review <cmd> ...`."""
    p = subparsers.add_parser("review", help="human review of doubtful samples in Label Studio")
    add_arguments(p.add_subparsers(dest="review_cmd", required=True))


def _cfg(a) -> ReviewConfig:
    cfg = ReviewConfig(data_dir=Path(a.data_dir))
    if getattr(a, "port", None):
        cfg.port = a.port
    if getattr(a, "venv", None):
        cfg.venv = Path(a.venv)
    if getattr(a, "batch_size", None) is not None:
        cfg.batch_size = a.batch_size
    return cfg


def cmd_serve(a) -> int:
    from curate.review.server import serve
    info = serve(_cfg(a))
    print(f"Label Studio {'started' if info.started else 'already running'} at {info.url} (pid {info.pid})")
    print(f"login: {info.email} (password in {info.credentials})")
    if a.show_token:
        from curate.review.server import load_credentials
        print(f"export LABEL_STUDIO_URL={info.url} LABEL_STUDIO_API_KEY={load_credentials(info.credentials.parent)['pat']}")
    else:
        print(f"export LABEL_STUDIO_URL={info.url}")
        print(f"export LABEL_STUDIO_API_KEY=\"$(python -c 'import json;print(json.load(open(\"{info.credentials}\"))[\"pat\"])')\"")
    return 0


def cmd_stop(a) -> int:
    from curate.review.server import stop
    print("stopped" if stop(Path(a.data_dir)) else "not running")
    return 0


def cmd_push(a) -> int:
    from curate.review.client import connect
    from curate.review.push import push
    cfg = _cfg(a)
    if cfg.batch_size < 1:
        raise ReviewError("--batch-size must be at least 1")

    def report(done: int, total: int) -> None:
        print(f"pushed {done}/{total}", file=sys.stderr, flush=True)

    r = push(connect(cfg), Path(a.dir), a.project, cfg, a.limit, progress=report)
    for pr in r.problems:
        print(f"skipped bad line: {pr}", file=sys.stderr)
    print(f"project {a.project!r} (id {r.project_id}): {r.created} tasks created, {r.already_present} already there")
    return 0


def cmd_pull(a) -> int:
    from curate.review.client import connect, get_project
    from curate.review.pull import pull
    ls = connect(_cfg(a))
    o = pull(ls, get_project(ls, a.project), Path(a.into))
    print(f"approved {o.approved}, approved with edit {o.edited}, rejected {o.rejected}, edit failed re-check "
          f"{o.edit_failed}, conflicts {len(o.conflicts)}, pending {o.pending}; edits re-checked with "
          f"{o.config_source}")
    for sid, who in o.conflicts:
        print(f"conflict {sid}: {' '.join(who)}")
    return 0


def cmd_status(a) -> int:
    from curate.review.client import connect, get_project
    from curate.review.pull import status
    ls = connect(_cfg(a))
    st = status(ls, get_project(ls, a.project))
    print(f"tasks {st.tasks}: reviewed {st.reviewed}, pending {st.pending}, conflicts {len(st.conflicts)}")
    for who, n in sorted(st.per_reviewer.items()):
        ds = ", ".join(f"{d} {c}" for d, c in sorted(st.decisions[who].items(), key=lambda x: str(x[0])))
        print(f"  {who}: {n} annotations ({ds})")
    for sid, who in st.conflicts:
        print(f"  conflict {sid}: {' '.join(who)}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m curate.review", description=__doc__)
    add_arguments(ap.add_subparsers(dest="cmd", required=True))
    return run_parsed(ap.parse_args(argv))


def run_parsed(a) -> int:
    """Run a parsed `review` command (also used by `python -m curate review`)."""
    try:
        return a.func(a)
    except ReviewError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except Exception as e:   # noqa: BLE001 - only the two client failures below become one line
        import httpx   # imported here: `serve`/`stop` should not pay for the SDK import
        from label_studio_sdk.core.api_error import ApiError
        if isinstance(e, httpx.HTTPError):   # the server went away between two calls
            print(f"error: lost the connection to Label Studio ({type(e).__name__}); is the server still running?",
                  file=sys.stderr)
            return 2
        if isinstance(e, ApiError):
            body = e.body if isinstance(e.body, dict) else {}
            why = body.get("validation_errors") or body.get("detail")
            print(f"error: Label Studio answered HTTP {e.status_code}" + (f": {json.dumps(why, ensure_ascii=False)}"
                                                                         if why else ""), file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        return 130
