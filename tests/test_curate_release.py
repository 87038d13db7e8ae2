"""curate release / diff / export: from a real `curate run` over the reference corpus and defect gallery."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from curate.cli import main
from curate.export import export
from curate.release import ReleaseError, build_release, content_hash, diff_releases, is_eval
from distillery.record import canonical_hash, dumps, ensure_id, reference_format

ROOT = Path(__file__).resolve().parents[1]
BLESSINGS = ROOT / "dataset/reference/blessings.jsonl"
DEFECTS = ROOT / "dataset/reference/defects.jsonl"
KEYS = ["instruction", "input", "output"]


def read_jsonl(p: Path) -> list[dict]:
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(p: Path, records: list[dict]) -> Path:
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return p


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "curate", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.fixture(scope="module")
def curated(tmp_path_factory) -> Path:
    """A real curate run over the good reference greetings mixed with the defect gallery."""
    out = tmp_path_factory.mktemp("curated") / "r1"
    assert main(["run", str(BLESSINGS), str(DEFECTS), "--out", str(out)]) == 0
    return out


@pytest.fixture()
def root(tmp_path) -> Path:
    return tmp_path / "releases"


def split_ids(release: Path) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {"train": set(), "eval": set()}
    for r in read_jsonl(release / "records.jsonl"):
        out[r["split"]].add(r["id"])
    return out


def test_release_is_reference_format_and_manifest_adds_up(curated, root):
    import datasets
    import pandas as pd

    built = build_release([str(curated)], "v1", root, eval_fraction=0.05)
    rel = built.path
    approved = read_jsonl(curated / "approved.jsonl")
    train = json.loads((rel / "train.json").read_text(encoding="utf-8"))
    evals = json.loads((rel / "eval.json").read_text(encoding="utf-8"))
    assert isinstance(train, list) and all(list(r) == KEYS for r in train + evals)
    assert (rel / "train.json").read_text(encoding="utf-8").startswith('[\n    {\n        "instruction": "你现在')
    # what the tutorial does: pd.read_json → Dataset.from_pandas
    ds = datasets.Dataset.from_pandas(pd.read_json(rel / "train.json"))
    assert ds.column_names == KEYS and len(ds) == len(train)

    m = json.loads((rel / "manifest.json").read_text(encoding="utf-8"))
    c = m["counts"]
    assert c["train"] == len(train) and c["eval"] == len(evals)
    assert c["total"] == len(approved) == len(train) + len(evals)
    assert 0 < c["eval"] < c["train"]
    assert sum(n for styles in m["cells"].values() for cell in styles.values() for n in cell.values()) == c["total"]
    assert m["cells"]["生日"]["小红书"]["train"] + m["cells"]["生日"]["小红书"]["eval"] == sum(
        1 for r in approved if r["meta"]["scene"] == "生日" and r["meta"]["style"] == "小红书")
    assert m["sources"][0]["sha256"] and m["sources"][0]["taken"] == len(approved)
    assert m["recipes"] == [{"name": "blessing"}]
    assert list(m["curation_config_hashes"].values()) == [len(approved)]
    assert m["parent"] is None and m["eval_rule"]["fraction"] == 0.05
    # the project's own trainer reads it: train.json for training, records.jsonl for eval with meta
    from train.data import load_release
    from train.eval import load_eval_records
    assert load_release(rel).records == train
    ev = load_eval_records(rel)
    assert [reference_format(r) for r in ev] == evals and all(r["meta"]["max_chars"] for r in ev)
    # the split is the id rule, and no defect made it in
    ids = split_ids(rel)
    assert ids["eval"] == {r["id"] for r in approved if is_eval(r["id"], 0.05)}
    assert not any(i.startswith("bad-") for i in ids["train"] | ids["eval"])


def test_eval_split_stable_and_content_hash_tracks_content(curated, root, tmp_path):
    approved = read_jsonl(curated / "approved.jsonl")
    v1 = build_release([str(curated)], "v1", root)
    extra = [{**r, "id": f"new-{i}", "output": r["output"] + "又一年"} for i, r in enumerate(approved[:200])]
    v2 = build_release([str(curated), str(write_jsonl(tmp_path / "more.jsonl", extra))], "v2", root)
    old, new = split_ids(v1.path), split_ids(v2.path)
    old_ids = old["train"] | old["eval"]
    assert new["eval"] & old_ids == old["eval"] and new["train"] & old_ids == old["train"]
    assert new["eval"] - old_ids  # some of the new records were held out too
    assert v2.manifest["content_hash"] != v1.manifest["content_hash"]
    assert v2.manifest["parent"] == {"name": "v1", "content_hash": v1.manifest["content_hash"]}  # --parent auto
    # the same content from a file in another order: same hash
    shuffled = write_jsonl(tmp_path / "shuffled.jsonl", list(reversed(approved)))
    v3 = build_release([str(shuffled)], "v3", root, parent="v1")
    assert v3.manifest["content_hash"] == v1.manifest["content_hash"]
    assert v3.manifest["parent"]["name"] == "v1"
    assert (v3.path / "train.json").read_bytes() == (v1.path / "train.json").read_bytes()  # a stable order
    # the hash is about text, not ids: other ids (no eval split, so none moves between splits) → same hash
    a = build_release([str(curated)], "a", root, eval_fraction=0.0)
    renamed = write_jsonl(tmp_path / "renamed.jsonl", [{**r, "id": f"z{len(approved) - i:05d}"}
                                                       for i, r in enumerate(approved)])
    b = build_release([str(renamed)], "b", root, eval_fraction=0.0)
    assert a.manifest["counts"]["eval"] == 0 and b.manifest["content_hash"] == a.manifest["content_hash"]


def test_duplicate_ids_across_sources_are_counted(curated, root, tmp_path):
    approved = read_jsonl(curated / "approved.jsonl")
    same_id = {**approved[0], "output": "另一个版本的祝福，新年快乐！"}
    again = write_jsonl(tmp_path / "again.jsonl", [same_id])
    p = cli("release", curated, again, "--name", "v1", "--root", root)
    assert p.returncode == 0, p.stderr
    assert "skipped 1 records" in p.stdout and approved[0]["id"] in p.stdout
    m = json.loads((root / "v1/manifest.json").read_text(encoding="utf-8"))
    assert m["counts"]["duplicates_skipped"] == 1 and m["duplicate_ids_skipped"] == [approved[0]["id"]]
    assert m["counts"]["total"] == len(approved)
    kept = {r["id"]: r for r in read_jsonl(root / "v1/records.jsonl")}
    assert kept[approved[0]["id"]]["output"] == approved[0]["output"]  # the first occurrence stays


def test_cli_immutability_and_one_line_errors(curated, root, tmp_path):
    assert cli("release", curated, "--name", "v1", "--root", root).returncode == 0
    before = {f.name: f.read_bytes() for f in (root / "v1").iterdir()}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "input": "b", "output": "生日快乐！"}\n{"instruction": "a", "input": \n',
                   encoding="utf-8")
    nofield = write_jsonl(tmp_path / "nofield.jsonl", [{"instruction": "a", "input": "b"}])
    cases = [
        (["release", curated, "--name", "v1", "--root", root], "already exists"),
        (["release", tmp_path / "nope", "--name", "v2", "--root", root], "no such file or folder"),
        (["release", bad, "--name", "v2", "--root", root], f"{bad}:2: invalid JSON"),
        (["release", nofield, "--name", "v2", "--root", root], f"{nofield}:1: output: missing field"),
        (["release", curated, "--name", "a/b", "--root", root], "invalid release name"),
        (["release", curated / "doubtful.jsonl", "--name", "v2", "--root", root], "no approved records"),
        (["release", ROOT / "dataset/reference/blessings.jsonl", "--name", "v2", "--root", root],
         "618 of 618 records have no curation verdict"),
        (["release", curated, "--name", "v2", "--root", root, "--parent", "v0"], "no such release: v0"),
        (["diff", "v1", "v9", "--root", root], "no such release: v9"),
        (["export", "v9", "--format", "hf", "--root", root], "no such release: v9"),
        (["export", "v1", "--format", "alpaca", "--root", root, "--out", tmp_path], "not an earlier export"),
    ]
    for args, msg in cases:
        p = cli(*args)
        assert p.returncode == 2, (args, p.stderr)
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and msg in lines[0] and "Traceback" not in p.stderr, (args, p.stderr)
    assert {f.name: f.read_bytes() for f in (root / "v1").iterdir()} == before
    assert sorted(os.listdir(root)) == ["v1"]  # no v2, no temp folder left behind
    assert any(tmp_path.iterdir())  # the foreign --out folder was not touched


def test_diff_added_removed_changed(curated, root, tmp_path):
    approved = read_jsonl(curated / "approved.jsonl")
    build_release([str(curated)], "v1", root)
    edited = [dict(r) for r in approved]
    edited[0]["output"] = "改过的祝福：生日快乐，天天开心！"
    removed = edited.pop(1)
    added = {**edited[2], "id": "new-1", "output": "新写的一条：节日快乐，万事如意！"}
    build_release([str(write_jsonl(tmp_path / "v2.jsonl", edited + [added]))], "v2", root)
    d = diff_releases("v1", "v2", root)
    assert d.added == ["new-1"] and d.removed == [removed["id"]]
    assert [c["id"] for c in d.changed] == [approved[0]["id"]] and d.changed[0]["fields"] == ["output"]
    assert d.changed[0]["new"]["output"] == "改过的祝福：生日快乐，天天开心！"
    cells = {(c["scene"], c["style"]): c["delta"] for c in d.cells}
    expect: dict = {}
    for r, delta in ((removed, -1), (added, +1)):
        k = (r["meta"]["scene"], r["meta"]["style"])
        expect[k] = expect.get(k, 0) + delta
    assert cells == {k: v for k, v in expect.items() if v}
    p = cli("diff", "v1", "v2", "--root", root, "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["added"] == ["new-1"]
    p = cli("diff", root / "v1", root / "v2")  # paths work too; the table for people
    assert p.returncode == 0 and "+1 added" in p.stdout and "改过的祝福" in p.stdout


def test_exports_load_back(curated, root):
    import datasets
    import pandas as pd

    v1 = build_release([str(curated)], "v1", root)
    n = v1.manifest["counts"]
    rel_train = json.loads((v1.path / "train.json").read_text(encoding="utf-8"))

    out = export("v1", "alpaca", root=root)
    assert out == v1.path / "exports/alpaca"
    assert (out / "train.json").read_bytes() == (v1.path / "train.json").read_bytes()

    out = export("v1", "sharegpt", root=root)
    msgs = read_jsonl(out / "train.messages.jsonl")
    assert len(msgs) == n["train"] and len(read_jsonl(out / "eval.messages.jsonl")) == n["eval"]
    assert msgs[0]["messages"] == [{"role": "user", "content": rel_train[0]["instruction"] + rel_train[0]["input"]},
                                   {"role": "assistant", "content": rel_train[0]["output"]}]
    conv = read_jsonl(out / "train.sharegpt.jsonl")[0]["conversations"]
    assert [t["from"] for t in conv] == ["human", "gpt"] and conv[1]["value"] == rel_train[0]["output"]

    out = export("v1", "llamafactory", root=root)
    info = json.loads((out / "dataset_info.json").read_text(encoding="utf-8"))
    assert set(info) == {"distillery_v1", "distillery_v1_eval", "distillery_v1_messages", "distillery_v1_messages_eval"}
    e = info["distillery_v1"]
    assert e["formatting"] == "alpaca" and e["columns"] == {"prompt": "instruction", "query": "input",
                                                           "response": "output"}
    for entry in info.values():  # every registered file exists, in a format LLaMA-Factory reads
        assert (out / entry["file_name"]).exists() and entry["formatting"] in ("alpaca", "sharegpt")
    assert info["distillery_v1_messages"]["tags"]["role_tag"] == "role"
    assert len(json.loads((out / "eval.json").read_text(encoding="utf-8"))) == n["eval"]

    out = export("v1", "hf", root=root)
    dd = datasets.load_from_disk(str(out / "dataset"))
    assert set(dd) == {"train", "eval"} and len(dd["train"]) == n["train"] and len(dd["eval"]) == n["eval"]
    assert dd["train"][0]["output"] == rel_train[0]["output"] and dd["train"][0]["scene"]
    pq = pd.read_parquet(out / "eval.parquet")
    assert len(pq) == n["eval"] and set(KEYS) <= set(pq.columns)
    assert export("v1", "hf", root=root) == out  # exporting again replaces its own earlier export


def test_export_refuses_an_edited_release(curated, root):
    v1 = build_release([str(curated)], "v1", root)
    rec = v1.path / "records.jsonl"
    rec.chmod(0o644)
    lines = rec.read_text(encoding="utf-8").splitlines()
    first = json.loads(lines[0])
    first["output"] = "偷偷改过的一条祝福语。"
    rec.write_text("\n".join([json.dumps(first, ensure_ascii=False)] + lines[1:]) + "\n", encoding="utf-8")
    with pytest.raises(ReleaseError, match="content_hash"):
        export("v1", "alpaca", root=root)


def test_release_counts_review_decisions_from_pull(curated, tmp_path, root):
    """A folder after `curate review pull`: records shaped exactly as curate/review/pull.py writes them."""
    folder = tmp_path / "r1"
    shutil.copytree(curated, folder)
    doubtful = read_jsonl(curated / "doubtful.jsonl")
    assert len(doubtful) >= 4
    approve, approve2, edit, reject = doubtful[:4]

    def reviewed(rec: dict, decision: str, verdict: str) -> dict:
        rec = json.loads(json.dumps(rec))
        prov = rec.setdefault("meta", {}).setdefault("provenance", {})
        prov["review"] = {"reviewer": "reviewer1", "time": "2026-11-28T10:00:00Z", "decision": decision,
                          "annotation_id": 7}
        rec["curation"] = {**rec["curation"], "verdict": verdict}
        return rec

    approve = reviewed(approve, "approve", "approved")
    approve2 = reviewed(approve2, "approve", "approved")
    edit = reviewed(edit, "approve-with-edit", "approved")
    edit["meta"]["provenance"]["original_output"] = edit["output"]
    edit["output"] = "审核员改好的祝福：节日快乐，万事顺意！"
    reject = reviewed(reject, "reject", "rejected")
    reject["meta"]["provenance"]["review"]["reason"] = "wrong tone"
    write_jsonl(folder / "approved.jsonl", read_jsonl(curated / "approved.jsonl") + [approve, approve2, edit])
    write_jsonl(folder / "rejected.jsonl", read_jsonl(curated / "rejected.jsonl") + [reject])
    write_jsonl(folder / "doubtful.jsonl", doubtful[4:])

    p = cli("release", folder, "--name", "v4", "--root", root)
    assert p.returncode == 0, p.stderr
    assert "2 approved, 1 edited, 1 rejected" in p.stdout
    m = json.loads((root / "v4/manifest.json").read_text(encoding="utf-8"))
    assert m["review"] == {"human_approved": 2, "edited": 1, "rejected_by_review": 1}
    records = {r["id"]: r for r in read_jsonl(root / "v4/records.jsonl")}
    assert records[edit["id"]]["output"] == "审核员改好的祝福：节日快乐，万事顺意！"
    assert records[edit["id"]]["meta"]["provenance"]["original_output"] == edit["meta"]["provenance"]["original_output"]
    assert approve["id"] in records and reject["id"] not in records
    texts = [r["output"] for r in json.loads((root / "v4/train.json").read_text(encoding="utf-8"))
             + json.loads((root / "v4/eval.json").read_text(encoding="utf-8"))]
    assert "审核员改好的祝福：节日快乐，万事顺意！" in texts


def _tricky(i: int) -> dict:
    """A curated record whose text exercises JSON escaping: quotes, backslashes, control and separator
    characters, characters beyond the BMP."""
    return {"id": f"t-{(i * 7919) % 1000:03d}", "instruction": f"你好\"{i}\"\\n\t", "input": f"祝{i}\u2028\x01é",
            "output": f"生日快乐🎂{i}</script>", "meta": {"scene": "生日", "n": i, "f": 0.1 * i},
            "curation": {"verdict": "approved"}}


@pytest.mark.parametrize("n, fraction", [(0, 0.5), (1, 0.0), (1, 0.99), (60, 0.3)])
def test_release_files_are_json_dumps_byte_for_byte(root, tmp_path, n, fraction):
    """The streamed arrays are exactly json.dumps(list, ensure_ascii=False, indent=4) + newline (0, 1 and many
    elements per split), records.jsonl the sorted records with their split; sources with a BOM, CRLF line ends,
    blank lines, an unterminated last line, a JSON array, records without id, an id twice."""
    recs = [_tricky(i) for i in range(n)]
    noid = {"instruction": "无id", "input": "", "output": "新年快乐！", "curation": {"verdict": "approved"}}
    other = {**_tricky(1000), "curation": {"verdict": "rejected"}}
    lines = [json.dumps(r, ensure_ascii=i % 2 == 0) for i, r in enumerate(recs + [noid, other])]
    a = tmp_path / "a.jsonl"
    a.write_bytes(("\ufeff" + "\r\n".join(lines[:len(lines) // 2]) + "\n\n  \n" + "\n".join(lines[len(lines) // 2:]))
                  .encode("utf-8"))
    later = [{**r, "output": "同一个id，后来的一条"} for r in recs[:3]]
    in_array = {**noid, "input": "数组里", "meta": {"big": 10 ** 30}}
    arr = tmp_path / "b.json"
    arr.write_text(json.dumps(later + [in_array], ensure_ascii=False), encoding="utf-8")
    built = build_release([str(a), str(arr)], "v1", root, eval_fraction=fraction)

    first: dict = {}
    for r in recs + [noid] + later + [in_array]:  # the first occurrence of an id wins
        r = json.loads(json.dumps(r))
        first.setdefault(ensure_id(r), r)
    expect = sorted(first.values(), key=lambda r: r["id"])
    for r in expect:
        r["split"] = "eval" if is_eval(r["id"], fraction) else "train"
    for split in ("train", "eval"):
        want = json.dumps([reference_format(r) for r in expect if r["split"] == split], ensure_ascii=False, indent=4)
        assert (built.path / f"{split}.json").read_bytes() == (want + "\n").encode("utf-8")
    assert (built.path / "records.jsonl").read_bytes() == "".join(dumps(r) + "\n" for r in expect).encode("utf-8")
    m = built.manifest
    assert m["counts"] == {"train": sum(r["split"] == "train" for r in expect),
                           "eval": sum(r["split"] == "eval" for r in expect), "total": len(expect),
                           "duplicates_skipped": len(later)}
    # content_hash keeps its definition: the canonical hash of each split's sorted reference-format lines
    texts = {s: sorted(dumps(reference_format(r)) for r in expect if r["split"] == s) for s in ("train", "eval")}
    assert m["content_hash"] == canonical_hash(texts)


def test_content_hash_is_the_canonical_hash_of_sorted_lines():
    """content_hash hashes its document in pieces: the same bytes as canonical_hash of the whole, past one piece."""
    recs = [{"instruction": "写", "input": f"第{i}条\"", "output": f"祝福{i * 37 % 10007}🎉"} for i in range(10_000)]
    for train, eval_ in ((recs, recs[:3]), (recs[:1], []), ([], [])):
        want = canonical_hash({"train": sorted(map(dumps, train)), "eval": sorted(map(dumps, eval_))})
        assert content_hash(train, eval_) == want


def test_source_changed_between_passes_is_refused(curated, root, tmp_path, monkeypatch):
    """Pass 2 reads the records back from the sources: a source edited meanwhile is refused, nothing is left."""
    import curate.release as release

    src = tmp_path / "a.jsonl"
    shutil.copyfile(curated / "approved.jsonl", src)
    original = release.read_sources

    def then_edit(*args, **kwargs):
        out = original(*args, **kwargs)
        data = src.read_bytes()
        src.write_bytes(data.replace("快乐".encode(), "快乐啊".encode(), 1))
        return out

    monkeypatch.setattr(release, "read_sources", then_edit)
    with pytest.raises(ReleaseError, match=f"{src}: changed while the release was built"):
        build_release([str(src)], "v1", root)
    assert not root.exists() or not any(root.iterdir())
