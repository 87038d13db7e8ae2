"""The README's "Use" loop, start to finish, as a user runs it: every stage through `python -m …` in a subprocess,
all offline. Teacher: tests/loopback_teacher.py answering with held-out greetings, gallery defects and HTTP faults.
Review: the session's Label Studio (tests/conftest.py). Student: the tiny model of tests/tiny_model.py.

synth plan → synth run → curate run → review push / annotate / pull → curate release v1 → export hf, llamafactory →
a second run curated against v1 → release v2 → curate diff → train run / generate / eval / merge.
Checked on the way: exit codes, files, counts that add up, the provenance chain (teacher sample → curation → review
→ release → adapter → merged model), and that the API key appears in no output and no file."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loopback_teacher import LoopbackTeacher  # noqa: E402
from tiny_model import build_tiny  # noqa: E402

from curate.review.client import get_project  # noqa: E402
from curate.review.labeling import result_for  # noqa: E402
from distillery.record import canonical_hash  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "dataset" / "recipes" / "blessing.toml"
KEY = "sk-e2e-NEVER-WRITE-ME-51c0ffee"
FAULTS = {"429": 0.05, "500": 0.04, "drop": 0.03, "malformed": 0.03}
VERDICTS = ("approved", "doubtful", "rejected")
EDIT = "感谢一路相伴，接下来的日子也要顺顺利利、平安喜乐"   # 24 字, fits any scene; the style's ending is added


class Cli:
    """Runs `python -m <module> <args>` from the repo root with the teacher's env, expecting exit 0 and no traceback;
    keeps every output for the key check."""

    def __init__(self, env: dict):
        self.env = env
        self.outputs: list[str] = []
        self.seconds: list[tuple[str, float]] = []   # printed at the end (pytest -s or -rP): where the time goes

    def __call__(self, module: str, *args) -> subprocess.CompletedProcess:
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=self.env,
                           capture_output=True, text=True, timeout=180)
        self.seconds.append((f"{module} {args[0]}", time.perf_counter() - t0))
        self.outputs += [r.stdout, r.stderr]
        assert r.returncode == 0, f"{module} {' '.join(map(str, args))} → {r.returncode}\n{r.stdout}\n{r.stderr}"
        assert "Traceback" not in r.stderr, r.stderr
        return r


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def verdict_files(cur: Path) -> dict[str, list[dict]]:
    return {v: lines(cur / f"{v}.jsonl") for v in (*VERDICTS, "quarantine")}


def curated_counts(cur: Path, n_samples: int) -> dict[str, list[dict]]:
    """Every sample sits in exactly one verdict file, with that verdict; report.json counts the same."""
    files = verdict_files(cur)
    assert not files["quarantine"]
    assert sum(len(files[v]) for v in VERDICTS) == n_samples
    assert len({r["id"] for v in VERDICTS for r in files[v]}) == n_samples
    for v in VERDICTS:
        assert {r["curation"]["verdict"] for r in files[v]} <= {v}
    assert all(r["curation"]["reasons"] for r in files["rejected"] + files["doubtful"])
    assert json.loads((cur / "report.json").read_text())["counts"] == {v: len(files[v]) for v in VERDICTS if files[v]}
    assert (cur / "report.html").stat().st_size > 10_000
    return files


def test_readme_loop(tmp_path, server, ls):
    cfg, _ = server
    rel = tmp_path / "releases"
    # faults on the HTTP side; defects (a fifth of the answers) on the content side
    with LoopbackTeacher(faults=FAULTS, retry_after=0.05, greetings=True, defect_rate=0.2) as teacher:
        cli = Cli(dict(os.environ, OPENAI_BASE_URL=teacher.base_url, OPENAI_API_KEY=KEY, PYTHONPATH=str(ROOT)))

        # ── synthesize and curate (run 1)
        plan = json.loads(cli("synth", "plan", "--recipe", RECIPE, "--limit", 60, "--json").stdout)
        assert plan["prompts"] == plan["samples"] == 60
        run1_dir, cur = tmp_path / "runs" / "r1", tmp_path / "curated" / "r1"
        cli("synth", "run", "--recipe", RECIPE, "--out", run1_dir, "--limit", 60, "--timeout", 5)
        summary = json.loads((run1_dir / "summary.json").read_text())
        assert (summary["planned"], summary["done"], summary["failed"]) == (60, 60, 0)
        assert summary["retries"] > 0 and sum(teacher.outcomes[f] for f in FAULTS) > 0   # faults met, retried away
        run1 = {s["id"]: s for s in lines(run1_dir / "samples.jsonl")}
        assert len(run1) == 60 and {s["meta"]["recipe_hash"] for s in run1.values()} == {plan["recipe_hash"]}
        cli("curate", "run", run1_dir / "samples.jsonl", "--out", cur)
        files = curated_counts(cur, 60)
        assert all(files[v] for v in VERDICTS)   # realistic answers: some of each verdict

        # ── review: push the doubtful ones, one reviewer approves one and rewrites another, pull
        project_name = "祝福 review e2e"
        r = cli("curate", "review", "push", cur, "--project", project_name, "--data-dir", cfg.data_dir)
        assert f"{len(files['doubtful'])} tasks created" in r.stdout
        project = get_project(ls, project_name)
        tasks = {t.data["sample_id"]: t for t in ls.tasks.list(project=project.id, fields="all")}
        assert set(tasks) == {x["id"] for x in files["doubtful"]}
        to_edit = max(files["doubtful"], key=lambda x: x["meta"]["max_chars"])   # room for the 24 字 rewrite
        assert to_edit["meta"]["max_chars"] > 30
        edit = EDIT + ("呀🎉" if to_edit["meta"]["style"] == "小红书" else "。")
        to_approve = next(x for x in files["doubtful"] if x["id"] != to_edit["id"])
        ls.annotations.create(id=tasks[to_approve["id"]].id, result=result_for("approve"))
        ls.annotations.create(id=tasks[to_edit["id"]].id, result=result_for("approve-with-edit", edit))
        r = cli("curate", "review", "pull", "--project", project_name, "--into", cur, "--data-dir", cfg.data_dir)
        assert "approved 1, approved with edit 1, rejected 0, edit failed re-check 0" in r.stdout, r.stdout
        after = verdict_files(cur)
        assert len(after["approved"]) == len(files["approved"]) + 2
        assert len(after["doubtful"]) == len(files["doubtful"]) - 2
        assert len(after["rejected"]) == len(files["rejected"])

        # ── release v1, exports
        cli("curate", "release", cur, "--name", "v1", "--root", rel)
        v1 = rel / "v1"
        manifest = json.loads((v1 / "manifest.json").read_text())
        n1 = len(after["approved"])
        assert manifest["counts"]["total"] == n1 == manifest["counts"]["train"] + manifest["counts"]["eval"]
        assert manifest["review"]["human_approved"] == 1 and manifest["review"]["edited"] == 1
        records = {x["id"]: x for x in lines(v1 / "records.jsonl")}
        assert set(records) == {x["id"] for x in after["approved"]}
        assert len(json.loads((v1 / "train.json").read_text())) == manifest["counts"]["train"]
        assert len(json.loads((v1 / "eval.json").read_text())) == manifest["counts"]["eval"]
        for fmt in ("hf", "llamafactory"):
            cli("curate", "export", "v1", "--format", fmt, "--root", rel)
        assert (v1 / "exports" / "hf" / "train.parquet").exists()
        info = json.loads((v1 / "exports" / "llamafactory" / "dataset_info.json").read_text())
        assert info["distillery_v1"]["file_name"] == "train.json"
        lf_train = json.loads((v1 / "exports" / "llamafactory" / "train.json").read_text())
        assert len(lf_train) == manifest["counts"]["train"]

        # provenance: a released record carries its teacher sample's meta and its curation, and the review
        for rec in records.values():
            meta = rec["meta"]
            assert meta["recipe_hash"] == run1[rec["id"]]["meta"]["recipe_hash"] and meta["prompt_id"]
            assert meta["teacher"]["model"] == "deepseek-chat" and meta["provenance"]["source"] == "teacher"
            assert rec["curation"]["verdict"] == "approved" and rec["curation"]["config_hash"]
        assert manifest["recipes"][0]["hash"] == next(iter(run1.values()))["meta"]["recipe_hash"]
        edited = records[to_edit["id"]]
        assert edited["output"] == edit
        assert edited["meta"]["provenance"]["original_output"] == to_edit["output"]
        assert edited["meta"]["provenance"]["review"]["decision"] == "approve-with-edit"
        assert records[to_approve["id"]]["meta"]["provenance"]["review"]["decision"] == "approve"

        # ── run 2 with another plan seed, curated against v1's texts; release v2 (parent v1), diff
        conf = tmp_path / "curate-r2.toml"
        conf.write_text(f'[curate]\ndedup_releases = ["{v1 / "train.json"}"]\n', encoding="utf-8")
        cur2 = tmp_path / "curated" / "r2"
        cli("synth", "run", "--recipe", RECIPE, "--out", tmp_path / "runs" / "r2", "--limit", 30, "--seed", 7)
        cli("curate", "run", tmp_path / "runs" / "r2" / "samples.jsonl", "--out", cur2, "--config", conf)
        files2 = curated_counts(cur2, 30)
        against_v1 = [r for r in files2["rejected"] + files2["doubtful"]
                      if any(str(v1 / "train.json") in x["detail"] for x in r["curation"]["reasons"])]
        assert against_v1   # the held-out pool is small: some answers repeat v1's texts, and are caught
        cli("curate", "release", cur, cur2, "--name", "v2", "--root", rel)
        m2 = json.loads((rel / "v2" / "manifest.json").read_text())
        assert m2["parent"]["name"] == "v1" and m2["parent"]["content_hash"] == manifest["content_hash"]
        new_ids = {x["id"] for x in files2["approved"]} - set(records)
        assert m2["counts"]["total"] == n1 + len(new_ids)
        diff = json.loads(cli("curate", "diff", "v1", "v2", "--root", rel, "--json").stdout)
        assert set(diff["added"]) == new_ids and not diff["removed"]

        # ── train on v1, generate, eval, merge
        tiny = build_tiny(tmp_path / "tiny")
        ad = tmp_path / "adapters" / "v1"
        r = cli("train", "run", "--data", v1, "--model", tiny, "--out", ad, "--cpu", "--max-steps", 2, "--preset", "fast")
        assert "2 steps" in r.stdout
        meta = json.loads((ad / "distillery_train.json").read_text())
        assert meta["global_step"] == 2
        assert meta["manifest_hash"] == canonical_hash(manifest)   # adapter → the release it learned from
        r = cli("train", "generate", "--model", tiny, "--adapter", ad, "--max-new-tokens", 8, "--cpu",
                "祝姐姐生日快乐, 小红书风格")
        assert r.stdout.strip()
        cli("train", "eval", "--model", tiny, "--adapter", ad, "--data", v1, "--limit", 3, "--max-new-tokens", 8,
            "--cpu")
        ev = json.loads((ad / "eval.json").read_text())
        assert ev["n"] == min(3, manifest["counts"]["eval"]) == ev["base"]["n"] == ev["student"]["n"]
        assert len(ev["samples"]) == ev["n"] and {s["id"] for s in ev["samples"]} <= set(records)
        merged = tmp_path / "merged" / "v1"
        cli("train", "merge", "--model", tiny, "--adapter", ad, "--out", merged)
        mm = json.loads((merged / "distillery_merge.json").read_text())
        assert mm["manifest_hash"] == meta["manifest_hash"] and (merged / "config.json").exists()

    print("  ".join(f"{name} {sec:.1f}s" for name, sec in cli.seconds))
    # ── the key: in no command's output and in no file written (Label Studio's data included)
    assert not [o for o in cli.outputs if KEY in o]
    for folder in (tmp_path, Path(cfg.data_dir)):
        leaked = [f for f in folder.rglob("*") if f.is_file() and KEY.encode() in f.read_bytes()]
        assert not leaked, f"API key written to {leaked}"
