"""train eval / merge / release loading / curator judging: real tiny model, real release, real curator."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from tiny_model import RECORDS, build_tiny  # noqa: E402

import train  # noqa: E402
from train import core  # noqa: E402
from train.__main__ import main  # noqa: E402
from train.eval import EMPTY, answer_loss, curate_outputs, eval_curate_config, load_eval_records  # noqa: E402


def _with_meta(records: list[dict]) -> list[dict]:
    """Curated-looking records: meta as synth writes it (derived here from the input), a cap of 50 字."""
    from curate.filters import Context
    ctx = Context(eval_curate_config())
    out = []
    for r in records:
        info = ctx.resolve(r)
        meta = {k: v for k, v in info.items() if v and k != "finish_reason"}
        out.append({**r, "meta": {**meta, "max_chars": 50, "constraint": ""},
                    "curation": {"verdict": "approved", "reasons": [], "config_hash": "t"}})
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model, a real `curate release` folder (train + eval split) and an adapter trained on it."""
    from curate.release import build_release
    d = tmp_path_factory.mktemp("eval")
    build_tiny(d / "model")
    src = d / "approved.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in _with_meta(RECORDS)), encoding="utf-8")
    rel = build_release([str(src)], "t1", d / "releases", eval_fraction=0.3, parent=None).path
    cfg = train.preset_config("fast", cpu=True, batch_size=4, grad_accum=1, logging_steps=1, max_steps=3, lr=1e-2,
                              eval_every=3, cache_dir=str(d / "cache"))
    meta = core.run(rel, d / "model", d / "adapter", cfg)
    return {"dir": d, "model": d / "model", "release": rel, "adapter": d / "adapter", "meta": meta,
            "tok": AutoTokenizer.from_pretrained(d / "model")}


def test_release_folder_trains_on_its_train_split_only(world):
    rel = train.load_release(world["release"])
    train_json = json.loads((world["release"] / "train.json").read_text(encoding="utf-8"))
    eval_inputs = {r["input"] for r in load_eval_records(world["release"])}
    assert rel.path.name == "records.jsonl" and rel.records == train_json  # same texts, same order as train.json
    assert rel.train_records_hash == train.load_release(world["release"] / "train.json").train_records_hash  # cache key
    assert eval_inputs and not eval_inputs & {r["input"] for r in rel.records}


def test_adapter_links_to_its_release_by_the_hash_curate_release_stores(world):
    """The manifest's content_hash (both splits, order-free) is not the hash of the train records the adapter saw;
    the adapter records each under its own name."""
    from curate.release import read_manifest
    from distillery.record import canonical_hash
    man = read_manifest(world["release"])
    meta = json.loads((world["adapter"] / "distillery_train.json").read_text(encoding="utf-8"))
    rel = train.load_release(world["release"])
    assert meta["release_content_hash"] == man["content_hash"] == rel.release_content_hash
    assert meta["manifest_hash"] == canonical_hash(man)
    assert meta["train_records_hash"] == rel.train_records_hash != man["content_hash"]
    assert "release_hash" not in meta
    card = (world["adapter"] / "README.md").read_text(encoding="utf-8")
    assert f"release content hash: `{man['content_hash']}`" in card


def test_old_adapter_release_hash_is_merged_as_train_records_hash(world, tmp_path):
    import shutil
    from train.merge import merge
    old = tmp_path / "old"  # an adapter written before the rename: "release_hash", no release_content_hash
    shutil.copytree(world["adapter"], old, ignore=shutil.ignore_patterns("checkpoint-*"))
    meta = json.loads((old / "distillery_train.json").read_text(encoding="utf-8"))
    meta["release_hash"] = meta.pop("train_records_hash")
    del meta["release_content_hash"]
    (old / "distillery_train.json").write_text(json.dumps(meta), encoding="utf-8")
    mm = json.loads((merge(world["model"], old, tmp_path / "m", "float32") / "distillery_merge.json").read_text())
    assert mm["train_records_hash"] == world["meta"]["train_records_hash"] and mm["release_content_hash"] is None


def test_split_rule_is_shared_by_training_and_eval(tmp_path):
    """Top-level "split" (what `curate release` writes) decides; meta.split is the fallback; no split is train."""
    from train.data import split_of
    recs = [{**RECORDS[0], "split": "eval"}, {**RECORDS[1], "meta": {"split": "eval"}},
            {**RECORDS[2], "split": "train", "meta": {"split": "eval"}}, RECORDS[3]]
    assert [split_of(r) for r in recs] == ["eval", "eval", "train", "train"]
    rel = tmp_path / "rel"
    rel.mkdir()
    (rel / "records.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs),
                                       encoding="utf-8")
    assert [r["input"] for r in train.load_release(rel).records] == [RECORDS[2]["input"], RECORDS[3]["input"]]
    assert [r["input"] for r in load_eval_records(rel)] == [RECORDS[0]["input"], RECORDS[1]["input"]]


def test_a_bad_line_in_the_eval_split_is_one_line_naming_file_and_line(tmp_path):
    rel = tmp_path / "rel"
    rel.mkdir()
    (rel / "records.jsonl").write_text(json.dumps({**RECORDS[0], "split": "eval"}, ensure_ascii=False)
                                       + "\n{not json\n", encoding="utf-8")
    with pytest.raises(train.TrainError) as e:
        load_eval_records(rel)
    assert str(e.value).startswith(f"{rel / 'records.jsonl'}:2: invalid JSON") and "\n" not in str(e.value)


def test_eval_records_keep_meta_and_a_release_without_eval_split_fails_in_one_line(world, tmp_path, capsys):
    recs = load_eval_records(world["release"])
    assert all(r["split"] == "eval" and r["meta"]["max_chars"] == 50 for r in recs)
    only_json = tmp_path / "oj"  # no records.jsonl: eval.json's three keys (the curator derives scene/style)
    only_json.mkdir()
    (only_json / "eval.json").write_text(json.dumps(RECORDS[:2], ensure_ascii=False), encoding="utf-8")
    assert load_eval_records(only_json) == RECORDS[:2]
    plain = tmp_path / "plain"  # a hand-made release: train.json only
    plain.mkdir()
    (plain / "train.json").write_text(json.dumps(RECORDS, ensure_ascii=False), encoding="utf-8")
    empty_eval = tmp_path / "ee"
    empty_eval.mkdir()
    (empty_eval / "records.jsonl").write_text("".join(
        json.dumps({**r, "split": "train"}, ensure_ascii=False) + "\n" for r in RECORDS), encoding="utf-8")
    for rel in (plain, empty_eval, tmp_path / "missing"):
        assert main(["eval", "--model", str(world["model"]), "--adapter", str(world["adapter"]),
                     "--data", str(rel), "--cpu"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err
        assert ("no eval split" in err) if rel.exists() else ("not a release folder" in err)


def test_curator_judges_generated_outputs():
    recs = _with_meta([RECORDS[1]] * 5)  # 赵老师, 元宵节, 严肃: the reference answer passes every filter
    outs = [RECORDS[1]["output"],
            "尊敬的赵老师，祝您元宵佳节阖家团圆🎉",     # emoji in 严肃 style
            "Happy Lantern Festival teacher Zhao",    # English
            "",                                       # nothing at all
            RECORDS[1]["output"]]                     # cut at max_new_tokens (see stopped)
    judged, counts, by_filter = curate_outputs(recs, outs, stopped=[True, True, True, True, False])
    verdicts = [j["curation"]["verdict"] for j in judged]
    named = [{x["filter"] for x in j["curation"]["reasons"]} for j in judged]
    assert verdicts == ["approved", "rejected", "rejected", "rejected", "rejected"]
    assert named == [set(), {"style"}, {"language"}, {EMPTY}, {"truncation"}]
    assert counts["approved"] == 1 and by_filter["truncation"]["rejected"] == 1 and by_filter[EMPTY]["rejected"] == 1
    assert recs[3]["curation"]["config_hash"] == "t" and recs[3]["output"] == RECORDS[1]["output"]  # inputs untouched


def test_answer_loss_is_the_trainers_masked_token_loss(world):
    tok = world["tok"]
    model = AutoModelForCausalLM.from_pretrained(world["model"], dtype=torch.float32).eval()
    recs = RECORDS[:3]
    rows = [train.encode(r, tok, "deepseek") for r in recs]
    with torch.no_grad():
        per = [(model(input_ids=torch.tensor([r["input_ids"]]), labels=torch.tensor([r["labels"]])).loss.item(),
                sum(x != -100 for x in r["labels"][1:])) for r in rows]
    want = sum(l * n for l, n in per) / sum(n for _, n in per)  # token-weighted mean over the answers
    assert answer_loss(model, tok, "deepseek", recs, batch_size=2) == pytest.approx(want, rel=1e-4)


def test_batched_generation_equals_one_at_a_time(world):
    model = AutoModelForCausalLM.from_pretrained(world["model"], dtype=torch.float32)
    prompts = [r["instruction"] + r["input"] for r in RECORDS[:5]]  # different lengths: left padding matters
    one = core.generate_outputs(model, world["tok"], "deepseek", prompts, 6, batch_size=1)
    assert core.generate_outputs(model, world["tok"], "deepseek", prompts, 6, batch_size=5) == one


def test_eval_cli_reports_base_and_student_side_by_side(world, tmp_path, capsys):
    from peft import PeftModel
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(world["model"]), "--adapter", str(world["adapter"]), "--data",
                 str(world["release"]), "--max-new-tokens", "6", "--cpu", "--out", str(out)]) == 0
    assert "pass rate" in capsys.readouterr().out
    rep = json.loads(out.read_text(encoding="utf-8"))
    recs = load_eval_records(world["release"])
    assert rep["n"] == len(recs) == len(rep["samples"])
    for side in ("base", "student"):
        s = rep[side]
        assert 0 <= s["pass_rate"] <= s["pass_or_doubtful_rate"] <= 1
        assert sum(s["verdicts"].values()) == len(recs) and s["length"]["n"] == len(recs)
        assert s["eval_loss"] > 0
    # the tiny model writes 6 tokens of noise: the curator rejects every output, and says why
    assert rep["student"]["pass_rate"] == 0 and any(v["rejected"] for v in rep["student"]["filters"].values())
    # "base" really is the base model, "student" really has the adapter
    tok = world["tok"]
    prompts = [r["instruction"] + r["input"] for r in recs]
    base = AutoModelForCausalLM.from_pretrained(world["model"], dtype=torch.float32)
    assert [s["base"]["output"] for s in rep["samples"]] == train.generate_texts(base, tok, "deepseek", prompts, 6)
    assert rep["base"]["eval_loss"] == pytest.approx(answer_loss(base, tok, "deepseek", recs), rel=1e-5)
    student = PeftModel.from_pretrained(base, str(world["adapter"]))
    assert [s["student"]["output"] for s in rep["samples"]] == train.generate_texts(student, tok, "deepseek",
                                                                                    prompts, 6)
    assert rep["student"]["eval_loss"] != rep["base"]["eval_loss"]


def test_run_logs_the_curators_pass_rate_on_the_release_eval_split(world):
    entries = [h for h in world["meta"]["log_history"] if "pass_rate" in h]
    assert [h["step"] for h in entries] == [3]
    e = entries[0]
    assert 0.0 <= e["pass_rate"] <= e["pass_or_doubtful_rate"] <= 1.0
    assert any(k.startswith("fails/") and v > 0 for k, v in e.items())  # noise fails some named filter


def test_merge_gives_the_adapters_logits_and_never_overwrites(world, tmp_path, capsys):
    from peft import PeftModel
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(world["model"]), "--adapter", str(world["adapter"]), "--out", str(out),
                 "--dtype", "float32"]) == 0
    assert not (out / "adapter_config.json").exists()
    ids = torch.tensor([train.encode(RECORDS[2], world["tok"], "deepseek")["input_ids"]])
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(world["model"], dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, str(world["adapter"])).eval()
    with torch.no_grad():
        a, m = adapted(input_ids=ids).logits, merged(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(world["model"], dtype=torch.float32)(input_ids=ids).logits
    torch.testing.assert_close(m, a, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(m, plain, atol=1e-3)  # the adapter is really folded in
    assert AutoTokenizer.from_pretrained(out)("祝福")["input_ids"] == world["tok"]("祝福")["input_ids"]
    mm = json.loads((out / "distillery_merge.json").read_text())
    assert {k: mm[k] for k in ("release_content_hash", "manifest_hash", "train_records_hash")} == {
        k: world["meta"][k] for k in ("release_content_hash", "manifest_hash", "train_records_hash")}
    capsys.readouterr()
    assert main(["merge", "--model", str(world["model"]), "--adapter", str(world["adapter"]), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not an empty folder" in err and "\n" not in err
