"""`python -m curate export v3 --format alpaca|sharegpt|llamafactory|hf [--out DIR]`: a release for other trainers.

- alpaca:       train.json / eval.json as they are (the reference format is alpaca without system/history).
- sharegpt:     {train,eval}.messages.jsonl  {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}
                {train,eval}.sharegpt.jsonl  {"conversations": [{"from": "human", ...}, {"from": "gpt", ...}]}
                The user turn is instruction + input with nothing between, exactly as the reference template does.
- llamafactory: the alpaca and messages files + dataset_info.json registering them (`--dataset distillery_v3`,
                `eval_dataset: distillery_v3_eval`). Note LLaMA-Factory's alpaca formatting joins instruction and input
                with "\\n"; the `distillery_v3_messages` entry keeps the reference's plain concatenation.
- hf:           datasets.DatasetDict({"train", "eval"}) saved with save_to_disk (dataset/) plus {train,eval}.parquet;
                columns instruction, input, output, id, scene, style, max_chars.

Default output: <release>/exports/<format>/, replaced as a whole (written beside it, then renamed).
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Callable

from distillery.io import write_json_atomic, write_jsonl_atomic
from distillery.record import reference_format

from curate.release import (DEFAULT_ROOT, EXIT_CODES, ReleaseError, content_hash, find_release, load_records,
                            read_manifest)

FORMATS = ("alpaca", "sharegpt", "llamafactory", "hf")
SPLITS = ("train", "eval")
MARKER = ".distillery-export"  # only a folder carrying it is ever replaced: --out never deletes a user's folder


def user_text(rec: dict) -> str:
    return rec["instruction"] + rec["input"]


def messages(rec: dict) -> dict:
    return {"messages": [{"role": "user", "content": user_text(rec)}, {"role": "assistant", "content": rec["output"]}]}


def conversations(rec: dict) -> dict:
    return {"conversations": [{"from": "human", "value": user_text(rec)}, {"from": "gpt", "value": rec["output"]}]}


def _sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def load_splits(release: Path) -> dict[str, list[dict]]:
    """Full records per split, checked against the manifest's content hash: an edited release is refused."""
    records = load_records(release)
    splits = {s: [r for r in records if r.get("split") == s] for s in SPLITS}
    want = read_manifest(release).get("content_hash")
    if want and content_hash(splits["train"], splits["eval"]) != want:
        raise ReleaseError(f"{release}: records.jsonl does not match manifest content_hash (release edited?)")
    return splits


def export_alpaca(release: Path, splits: dict, out: Path) -> None:
    for s in SPLITS:
        shutil.copyfile(release / f"{s}.json", out / f"{s}.json")


def export_sharegpt(release: Path, splits: dict, out: Path) -> None:
    for s in SPLITS:
        write_jsonl_atomic(out / f"{s}.messages.jsonl", map(messages, splits[s]))
        write_jsonl_atomic(out / f"{s}.sharegpt.jsonl", map(conversations, splits[s]))


def export_llamafactory(release: Path, splits: dict, out: Path) -> None:
    export_alpaca(release, splits, out)
    for s in SPLITS:
        write_jsonl_atomic(out / f"{s}.messages.jsonl", map(messages, splits[s]))
    name = f"distillery_{release.name}"
    alpaca_cols = {"prompt": "instruction", "query": "input", "response": "output"}
    openai_tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                   "system_tag": "system"}
    info = {}
    for s in SPLITS:
        suffix = "" if s == "train" else "_eval"
        info[f"{name}{suffix}"] = {"file_name": f"{s}.json", "file_sha1": _sha1(out / f"{s}.json"),
                                   "formatting": "alpaca", "columns": alpaca_cols}
        info[f"{name}_messages{suffix}"] = {"file_name": f"{s}.messages.jsonl",
                                            "file_sha1": _sha1(out / f"{s}.messages.jsonl"),
                                            "formatting": "sharegpt", "columns": {"messages": "messages"},
                                            "tags": openai_tags}
    write_json_atomic(out / "dataset_info.json", info)


def hf_rows(records: list[dict]) -> dict[str, list]:
    cols: dict[str, list] = {k: [] for k in ("instruction", "input", "output", "id", "scene", "style", "max_chars")}
    for r in records:
        meta = r.get("meta") or {}
        for k, v in reference_format(r).items():
            cols[k].append(v)
        cols["id"].append(r["id"])
        cols["scene"].append(meta.get("scene", ""))
        cols["style"].append(meta.get("style", ""))
        cols["max_chars"].append(meta.get("max_chars"))
    return cols


def export_hf(release: Path, splits: dict, out: Path) -> None:
    import datasets  # heavy: only for this format
    datasets.disable_progress_bars()  # the CLI prints one line per export
    features = datasets.Features({k: datasets.Value("string") for k in
                                  ("instruction", "input", "output", "id", "scene", "style")}
                                 | {"max_chars": datasets.Value("int32")})  # typed even for an empty eval split
    dd = datasets.DatasetDict({s: datasets.Dataset.from_dict(hf_rows(splits[s]), features=features) for s in SPLITS})
    dd.save_to_disk(str(out / "dataset"))
    for s in SPLITS:
        dd[s].to_parquet(str(out / f"{s}.parquet"))


EXPORTERS: dict[str, Callable[[Path, dict, Path], None]] = {
    "alpaca": export_alpaca, "sharegpt": export_sharegpt, "llamafactory": export_llamafactory, "hf": export_hf}


def export(ref: str, fmt: str, out: str | Path | None = None, root: str | Path = DEFAULT_ROOT) -> Path:
    if fmt not in EXPORTERS:
        raise ReleaseError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    release = find_release(ref, root)
    splits = load_splits(release)
    final = Path(out) if out else release / "exports" / fmt
    if final.exists() and not (final.is_dir() and ((final / MARKER).exists() or not any(final.iterdir()))):
        raise ReleaseError(f"{final}: exists and is not an earlier export; choose a new or empty --out")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        EXPORTERS[fmt](release, splits, tmp)
        (tmp / MARKER).write_text(f"{release.name} {fmt}\n", encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def add_parser(sub) -> None:
    from argparse import RawDescriptionHelpFormatter
    e = sub.add_parser("export", epilog=EXIT_CODES, formatter_class=RawDescriptionHelpFormatter,
                       help="a release as alpaca / sharegpt (messages) / llamafactory / hf files")
    e.add_argument("release", help="release name under --root, or a release folder")
    e.add_argument("--format", required=True, choices=FORMATS)
    e.add_argument("--out", help="output folder (default <release>/exports/<format>/; replaced if it exists)")
    e.add_argument("--root", default=DEFAULT_ROOT)


def cmd_export(a) -> int:
    out = export(a.release, a.format, a.out, a.root)
    print(f"exported {a.release} as {a.format} → {out}")
    return 0
