"""push DIR: DIR/doubtful.jsonl → tasks in a Label Studio project, idempotent by sample id."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import httpx

from distillery.io import Located, read_records
from distillery.record import ensure_id

from curate.review import ReviewConfig, ReviewError
from curate.review.client import find_project
from curate.review.labeling import label_config, task_for, uncertainty

INSTRUCTIONS = ("<p>Review one teacher output. <b>approve</b>: keep as is. <b>approve-with-edit</b>: fix the text in "
                "the box, then choose it. <b>reject</b>: also pick a reason.</p>")


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


def push(ls, src_dir: Path, title: str, cfg: ReviewConfig, limit: Optional[int] = None) -> PushResult:
    from label_studio_sdk.core.api_error import ApiError

    path = Path(src_dir) / "doubtful.jsonl"
    records, problems = [], []
    for item in read_records(path):
        if isinstance(item, Located):
            ensure_id(item.record)
            records.append(item.record)
        else:
            problems.append(item)
    if not records and problems and problems[0].line == 0:
        raise ReviewError(str(problems[0]))
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
            # max_retries=0: the SDK re-POSTs on 5xx/timeouts, duplicating a batch the server already committed
            r = ls.projects.import_tasks(id=p.id, request=batch, return_task_ids=True,
                                         request_options={"max_retries": 0})
            created += r.task_count or 0
        except (httpx.HTTPError, ApiError) as e:
            # ambiguous: the server may have committed it. Check by id and import only what is really missing.
            now = existing_ids(ls, p.id)
            missing = [t for t in batch if t["data"]["sample_id"] not in now]
            created += len(batch) - len(missing)
            if missing:
                try:
                    r = ls.projects.import_tasks(id=p.id, request=missing, request_options={"max_retries": 0})
                except (httpx.HTTPError, ApiError):
                    raise ReviewError(f"import into project {title!r} failed twice ({type(e).__name__}); "
                                      f"run push again, it skips what is already there") from None
                created += r.task_count or 0
    return PushResult(p.id, created, len(records) - len([r for r in records if r["id"] not in have]), problems)
