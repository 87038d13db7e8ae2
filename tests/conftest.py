import os
import socket
import sys
from pathlib import Path

import pytest

# Tests import the packages from the checkout (also when the project is not installed in editable mode).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LS_VENV = Path(os.environ.get("DISTILLERY_LS_VENV", Path.home() / ".cache" / "distillery" / "ls-venv"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """One real Label Studio for the whole session (starting one costs ~35 s): (ReviewConfig, ServerInfo).
    Shared by test_review.py and test_e2e.py. A test that kills it must `serve(cfg)` again before it ends (same data
    dir and port, so the url, the credentials and the projects stay valid for later tests)."""
    from curate.review import ReviewConfig
    from curate.review.server import serve, stop
    data = tmp_path_factory.mktemp("ls")
    cfg = ReviewConfig(data_dir=data, port=_free_port(), venv=LS_VENV)
    info = serve(cfg)
    try:
        yield cfg, info
    finally:
        stop(data)


@pytest.fixture(scope="session")
def ls(server):
    """An SDK client logged in to the session server (LABEL_STUDIO_* from the environment would point elsewhere)."""
    from curate.review.client import connect
    cfg, _ = server
    os.environ.pop("LABEL_STUDIO_URL", None)
    os.environ.pop("LABEL_STUDIO_API_KEY", None)
    return connect(cfg)
