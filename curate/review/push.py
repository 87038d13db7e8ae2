"""push DIR: DIR/doubtful.jsonl → tasks in a Label Studio project, idempotent by sample id.

Resumable: the sample id rides in the task data, ids already in the project are skipped, and a batch whose POST
failed ambiguously (the server may have committed it before the error) is checked by id before anything is re-sent.
If the server is gone for good, push stops with PushInterrupted; running it again after a restart finishes the job.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import httpx

from distillery.io import Located, read_records
from distillery.record import ensure_id

from curate.review import PushInterrupted, ReviewConfig, ReviewError
from curate.review.client import find_project
from curate.review.labeling import label_config, task_for, uncertainty

INSTRUCTIONS = ("<p>Review one teacher output. <b>approve</b>: keep as is. <b>approve-with-edit</b>: fix the text in "
                "the box, then choose it. <b>reject</b>: also pick a reason.</p>")
CHECK_WAITS_S = (0.5, 1.0, 2.0)   # a server that is restarting gets ~3.5 s to answer the check by id


@dataclass
class PushResult:
    project_id: int
    created: int
    already_present: int
    problems: list


def existing_ids(ls, project_id: int) -> dict[str, int]:
    out = {}
    # include=id,data: the server serializes 2 fields instead of ~25 (much faster listing)
    for t in ls.tasks.list(project=project_id, fields="task_only", include="id,data", page_size=1000):
        sid = (t.data or {}).get("sample_id")
        if sid is not None:
            out[sid] = t.id
    return out


def ensure_project(ls, title: str, cfg: ReviewConfig):
    p = find_project(ls, title)
    if p is None:
        p = ls.projects.create(title=title, label_config=label_config(cfg.reject_reasons),
                               expert_instruction=INSTRUCTIONS, show_instruction=True)
    return p


def _read_doubtful(src_dir: Path) -> tuple[list[dict], list]:
    records, problems = [], []
    for item in read_records(Path(src_dir) / "doubtful.jsonl"):
        if isinstance(item, Located):
            ensure_id(item.record)
            records.append(item.record)
        else:
            problems.append(item)
    if not records and problems and problems[0].line == 0:
        raise ReviewError(str(problems[0]))
    return records, problems


def _ids_after_failure(ls, project_id: int) -> Optional[dict[str, int]]:
    """The ids in the project, or None if the server does not answer within a few bounded retries."""
    from label_studio_sdk.core.api_error import ApiError

    for wait in CHECK_WAITS_S:
        time.sleep(wait)
        try:
            return existing_ids(ls, project_id)
        except (httpx.HTTPError, ApiError):
            continue
    return None


def _import(ls, project_id: int, tasks: list[dict]) -> int:
    # max_retries=0: the SDK re-POSTs on 5xx/409/429/connection errors, duplicating a batch the server already committed
    r = ls.projects.import_tasks(id=project_id, request=tasks, return_task_ids=True, request_options={"max_retries": 0})
    return r.task_count or 0


def push(ls, src_dir: Path, title: str, cfg: ReviewConfig, limit: Optional[int] = None,
         progress: Optional[Callable[[int, int], None]] = None) -> PushResult:
    """Push the doubtful records not yet in project `title`, most uncertain first, cfg.batch_size per POST.

    progress(done, total) is called after every batch. Raises PushInterrupted if the server goes away mid-way.
    """
    from label_studio_sdk.core.api_error import ApiError

    records, problems = _read_doubtful(src_dir)
    records.sort(key=lambda r: (tuple(-x for x in uncertainty(r)), r["id"]))   # most uncertain first
    p = ensure_project(ls, title, cfg)
    have = existing_ids(ls, p.id)
    new = [r for r in records if r["id"] not in have]
    if limit is not None:
        new = new[:limit]
    created = 0
    for i in range(0, len(new), cfg.batch_size):
        batch = [task_for(r) for r in new[i:i + cfg.batch_size]]
        try:
            created += _import(ls, p.id, batch)
        except (httpx.HTTPError, ApiError) as e:
            # Ambiguous: the server may have committed the batch before failing. Check by id, re-send only the missing.
            why = f"HTTP {e.status_code}" if isinstance(e, ApiError) else type(e).__name__
            now = _ids_after_failure(ls, p.id)
            if now is None:
                raise PushInterrupted(
                    f"Label Studio stopped answering during push into {title!r} ({why}) after {created} of "
                    f"{len(new)} new tasks; start it again and re-run push: it skips what is already there") from None
            missing = [t for t in batch if t["data"]["sample_id"] not in now]
            created += len(batch) - len(missing)
            if missing:
                try:
                    created += _import(ls, p.id, missing)
                except (httpx.HTTPError, ApiError):
                    raise PushInterrupted(
                        f"import into {title!r} failed twice ({why}) after {created} of {len(new)} new tasks; "
                        f"re-run push: it skips what is already there") from None
        if progress:
            progress(i + len(batch), len(new))
    return PushResult(p.id, created, len(records) - len([r for r in records if r["id"] not in have]), problems)
