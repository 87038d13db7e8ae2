"""The one record schema every stage reads and writes (JSON Lines, one object per line).

    {"id": "p-3f2a9c1e0b7d4a61-0",
     "instruction": "你现在是一个送祝福大师，帮我针对不同人和事情、节日送对应的祝福",
     "input": "祝赵老师元宵节快乐,严肃风格",
     "output": "尊敬的赵老师，…",
     "meta": {...},                 # optional for plain imports; see META_FIELDS
     "curation": {...}}             # added by curate; see CURATION_FIELDS

`instruction` / `input` / `output` are exactly the reference tutorial's format, so a release's train.json is
just these three keys. Everything else (where a sample came from, how it was made, what happened to it) lives in
`meta`, and the curator's verdict in `curation`. Stages add keys; none removes or rewrites another stage's keys,
except that a reviewer's edit replaces `output` (the original kept in `meta.provenance.original_output`) and
`curation` (re-checked on the new text; the earlier one kept in `meta.provenance.original_curation`).
"""
from __future__ import annotations

import difflib
import hashlib
import json
from typing import Any, Iterable

SCHEMA_VERSION = 1

# Required top-level fields and their JSON types.
CORE_FIELDS: dict[str, type] = {"instruction": str, "input": str, "output": str}
TOP_FIELDS: dict[str, type] = {"id": str, **CORE_FIELDS, "meta": dict, "curation": dict}

# Keys of `meta`. All optional: a plain {instruction, input, output} import has none of them.
META_FIELDS: dict[str, str] = {
    "schema": "int: SCHEMA_VERSION of the writer",
    "recipe": "str: recipe name",
    "recipe_hash": "str: sha256 of the recipe's canonical form",
    "scene": "str: occasion, e.g. 生日",
    "style": "str: 小红书 | 正常 | 严肃",
    "recipient": "str: who the greeting is for, e.g. 赵老师",
    "relation": "str: relation group of the recipient: 长辈 平辈 晚辈 上级 同事 朋友 伴侣 师长 客户 …",
    "constraint": "str: the constraint sentence put in the prompt ('' for none)",
    "max_chars": "int: the length cap the prompt asked for (字数 < max_chars)",
    "prompt": "str: the rendered user prompt sent to the teacher",
    "examples": "list[str]: the style example sentences shown in the prompt",
    "prompt_id": "str: id of the planned prompt (several samples share it when n > 1)",
    "choice_index": "int: index of this sample among the n choices of one prompt",
    "teacher": "dict: model, temperature, top_p, max_tokens, n",
    "usage": "dict: prompt_tokens, completion_tokens (for the whole request)",
    "latency_s": "float: seconds from request to response of the successful attempt",
    "finish_reason": "str: stop | length | content_filter | …",
    "attempts": "int: HTTP attempts it took",
    "created_at": "str: ISO-8601 UTC time the record was written",
    "provenance": "dict: source ('teacher' | 'hand-written' | 'import'), author, run, review (decision, reviewer, "
                  "…), original_output and original_curation after a reviewer's edit",
}

# `curation`, written by curate.
CURATION_FIELDS: dict[str, str] = {
    "verdict": "approved | doubtful | rejected",
    "reasons": "list of {filter, detail, score}",
    "config_hash": "str: sha256 of the filter configuration that produced the verdict",
}
VERDICTS = ("approved", "doubtful", "rejected")


class RecordError(ValueError):
    """A record that does not follow the schema. `field` names the offending key."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


def _did_you_mean(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""


def validate(obj: Any, *, require_id: bool = False) -> dict:
    """Check one decoded JSON value against the schema and return it; raise RecordError on the first problem.

    Unknown top-level keys are an error only when they look like a misspelled field (`instrution`), since
    a silently ignored typo loses data; other extra keys are kept as they are.
    """
    if not isinstance(obj, dict):
        raise RecordError("", f"expected a JSON object, got {type(obj).__name__}")
    for key in obj:
        if key not in TOP_FIELDS:
            hint = _did_you_mean(key, TOP_FIELDS)
            if hint:
                raise RecordError(key, f"unknown field{hint}")
    for name, typ in CORE_FIELDS.items():
        if name not in obj:
            raise RecordError(name, "missing field")
        if not isinstance(obj[name], typ):
            raise RecordError(name, f"expected a string, got {type(obj[name]).__name__}")
    if not obj["output"].strip():
        raise RecordError("output", "empty output")
    if "id" in obj:
        if not isinstance(obj["id"], str) or not obj["id"]:
            raise RecordError("id", "expected a non-empty string")
    elif require_id:
        raise RecordError("id", "missing field")
    meta = obj.get("meta")
    if meta is not None:
        if not isinstance(meta, dict):
            raise RecordError("meta", f"expected an object, got {type(meta).__name__}")
        mc = meta.get("max_chars")
        if mc is not None and (not isinstance(mc, int) or isinstance(mc, bool) or mc <= 0):
            raise RecordError("meta.max_chars", f"expected a positive integer, got {mc!r}")
        for key in ("scene", "style", "recipient", "relation", "constraint"):
            if key in meta and not isinstance(meta[key], str):
                raise RecordError(f"meta.{key}", f"expected a string, got {type(meta[key]).__name__}")
    cur = obj.get("curation")
    if cur is not None:
        if not isinstance(cur, dict) or cur.get("verdict") not in VERDICTS:
            raise RecordError("curation.verdict", f"expected one of {', '.join(VERDICTS)}")
    return obj


def content_id(prefix: str, *parts: str, length: int = 16) -> str:
    """A stable id from content: the same parts give the same id on any machine, in any run."""
    h = hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()[:length]
    return f"{prefix}-{h}"


def ensure_id(rec: dict) -> str:
    """Records from plain imports have no id: derive one from their content (never from file position)."""
    if not rec.get("id"):
        rec["id"] = content_id("x", rec["instruction"], rec["input"], rec["output"])
    return rec["id"]


def provenance(rec: dict) -> dict:
    """meta.provenance: where a record came from (teacher run, import, release) and what review did to it."""
    return (rec.get("meta") or {}).get("provenance") or {}


def review_decision(rec: dict) -> str | None:
    """The reviewer's decision ("approve", "approve_edited", "reject", ...) if a human reviewed the record."""
    return (provenance(rec).get("review") or {}).get("decision")


def reference_format(rec: dict) -> dict:
    """The tutorial's training format: exactly {instruction, input, output}."""
    return {"instruction": rec["instruction"], "input": rec["input"], "output": rec["output"]}


def dumps(rec: dict) -> str:
    """One JSONL line (no newline). ensure_ascii=False keeps the Chinese readable in files and diffs."""
    return json.dumps(rec, ensure_ascii=False, separators=(",", ":"))


def canonical_hash(obj: Any) -> str:
    """sha256 of a JSON value in canonical form (sorted keys): for recipe, config and release hashes."""
    data = json.dumps(obj, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(data).hexdigest()
