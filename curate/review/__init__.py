"""Human review of doubtful samples in Label Studio: serve, push, pull, status.

Exit codes of `python -m curate.review`: 0 ok, 1 some work failed (a push interrupted mid-way: run it again),
2 a ReviewError (server down, bad token, unknown project, bad input).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

LS_VERSION = "1.23.2"


@dataclass
class ReviewConfig:
    """Every knob of the review round trip."""

    data_dir: Path = Path(".labelstudio")      # sqlite, logs, pid file, credentials.json
    port: int = 8080
    venv: Optional[Path] = None                # default: <data_dir>/venv
    email: str = "reviewer@distillery.local"
    start_timeout_s: float = 240.0
    batch_size: int = 500
    connect_retries: int = 3                   # bounded retries before "server down"
    reject_reasons: list = field(default_factory=lambda: [
        "too long / too short", "wrong style or tone", "wrong occasion or recipient", "breaks the constraint",
        "unnatural or garbled", "other"])

    @property
    def venv_dir(self) -> Path:
        return Path(self.venv) if self.venv else Path(self.data_dir) / "venv"


class ReviewError(Exception):
    """Anything the user must fix; printed as one line, exit 2."""

    exit_code = 2


class ServerDown(ReviewError):
    pass


class AuthError(ReviewError):
    pass


class ProjectNotFound(ReviewError):
    pass


class PushInterrupted(ReviewError):
    """The server went away in the middle of a push: part of it is in; re-running push finishes it."""

    exit_code = 1
