"""A checked Label Studio client: URL + key from env or credentials.json, bounded retries, one-line errors."""
from __future__ import annotations

import os
import time
from pathlib import Path

import httpx

from curate.review import AuthError, ProjectNotFound, ReviewConfig, ReviewError, ServerDown
from curate.review.server import health, load_credentials


def connect(cfg: ReviewConfig):
    """LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY win over <data_dir>/credentials.json. Never prints the key."""
    from label_studio_sdk import LabelStudio
    from label_studio_sdk.core.api_error import ApiError

    creds = load_credentials(Path(cfg.data_dir))
    url = os.environ.get("LABEL_STUDIO_URL") or creds.get("url")
    key = os.environ.get("LABEL_STUDIO_API_KEY") or creds.get("pat") or creds.get("legacy_token")
    if not url or not key:
        raise AuthError(f"no Label Studio URL/key: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY or run "
                        f"`serve` (writes {Path(cfg.data_dir) / 'credentials.json'})")
    url = url.rstrip("/")
    for i in range(cfg.connect_retries):
        if health(url):
            break
        if i + 1 < cfg.connect_retries:
            time.sleep(min(0.5 * 2 ** i, 2))
    else:
        raise ServerDown(f"Label Studio is not reachable at {url} (after {cfg.connect_retries} tries); start it with "
                         f"`python -m curate.review serve`")
    ls = LabelStudio(base_url=url, api_key=key, timeout=120)
    try:
        ls.users.whoami()
    except ApiError as e:
        if e.status_code in (401, 403):
            raise AuthError(f"Label Studio at {url} rejected the API key (HTTP {e.status_code})") from None
        raise ReviewError(f"Label Studio at {url}: HTTP {e.status_code}") from None
    except (httpx.HTTPError, ValueError, KeyError) as e:
        # a malformed PAT fails in the token refresh before any request
        raise AuthError(f"Label Studio at {url} rejected the API key ({type(e).__name__})") from None
    return ls


def find_project(ls, title: str):
    for p in ls.projects.list(title=title):
        if p.title == title:
            return p
    for p in ls.projects.list():   # older servers ignore the title filter
        if p.title == title:
            return p
    return None


def get_project(ls, title: str):
    p = find_project(ls, title)
    if p is None:
        raise ProjectNotFound(f"no Label Studio project titled {title!r}")
    return p


def tasks_with_annotations(ls, project_id: int):
    """Every task with its full annotations (fields=all)."""
    return list(ls.tasks.list(project=project_id, fields="all", page_size=1000))
